"""What is wrong with a cohort spec: :class:`Problem` locates one thing (file, row, field, value) and
:class:`CohortError` carries every problem found, so that validation can collect them all before raising.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the cohort, located precisely."""

    file: str
    message: str
    row: int | None = None  # 1-based data row (header excluded) in CSV manifests / list index in YAML
    field: str | None = None
    value: Any = None

    def __str__(self) -> str:
        where = self.file + (f", row {self.row}" if self.row is not None else "")
        what = f" field '{self.field}'" if self.field else ""
        val = f" = {self.value!r}" if self.value is not None else ""
        return f"{where}:{what}{val}: {self.message}" if what or val else f"{where}: {self.message}"


class CohortError(ValueError):
    """Raised when a cohort spec is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in cohort:\n{lines}")
