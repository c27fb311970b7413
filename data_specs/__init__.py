from data_specs.cohort import Cohort, CohortError, Patient, Problem, load_cohort
from data_specs.config import ConfigError, RunConfig, resolve_config

__all__ = ["Cohort", "CohortError", "ConfigError", "Patient", "Problem", "RunConfig", "load_cohort", "resolve_config"]
