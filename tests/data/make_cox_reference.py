"""Regenerates ``cox_reference.json``: Cox fits of lifelines' bundled Rossi recidivism data (49 distinct
weeks for 114 arrests among 432 people: heavy ties) by lifelines (Efron; unstratified and stratified by
``race``) and scikit-survival (Breslow). The tests evaluate histofuse's ``cox_loss`` at these coefficients.

    python tests/data/make_cox_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import lifelines
import numpy as np
import sksurv
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

COVARIATES = ["fin", "age", "wexp", "mar", "paro", "prio"]


def main() -> None:
    d = load_rossi()
    ref: dict = {"data": "lifelines.datasets.load_rossi", "time": "week", "event": "arrest", "covariates": COVARIATES}
    ref["versions"] = {"lifelines": lifelines.__version__, "scikit-survival": sksurv.__version__}
    cph = CoxPHFitter().fit(d[["week", "arrest", *COVARIATES]], "week", "arrest")
    ref["efron"] = {"beta": cph.params_[COVARIATES].tolist(), "log_likelihood": float(cph.log_likelihood_)}
    cph = CoxPHFitter().fit(d[["week", "arrest", "race", *COVARIATES]], "week", "arrest", strata=["race"])
    ref["efron_strata_race"] = {"beta": cph.params_[COVARIATES].tolist(), "log_likelihood": float(cph.log_likelihood_)}
    sk = CoxPHSurvivalAnalysis(ties="breslow").fit(d[COVARIATES].to_numpy(float), Surv.from_arrays(d.arrest, d.week))
    ref["breslow"] = {"beta": np.asarray(sk.coef_).tolist()}
    (Path(__file__).with_name("cox_reference.json")).write_text(json.dumps(ref, indent=2) + "\n")


if __name__ == "__main__":
    main()
