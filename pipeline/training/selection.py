"""Which epoch (centralised) or round (federated) is kept: one rule for both modes.

After every epoch / round the validation C-index and loss are reported to a :class:`Selector`
(``train.select``):

- ``loss`` (default): the lowest validation loss, averaged over the last ``train.select_window`` epochs /
  rounds (a trailing mean: the kept weights are those at the end of the best window); exact ties go to
  the higher validation C-index, then to the later epoch.
- ``cindex``: the highest validation C-index (same window); exact ties go to the lower validation loss,
  then to the later epoch. In a federated run the C-index is the pooled one (concordant over comparable
  pairs summed across sites: aggregates only).

The validation Cox loss measures the scale of the log hazards as much as their ranking and often keeps
an early epoch; the C-index measures the ranking a survival model is judged on but is coarse on a small
validation set. On the demo neither was better on held-out folds by more than noise (docs/benchmarks.md).

Without usable validation (no validation patients, or none with a comparable pair / an event):
``train.without_validation=last`` keeps the last epoch / round with a warning; ``error`` raises
:class:`NoValidationError`. A step whose score is NaN is never kept while a finite one exists.
"""

from __future__ import annotations

import logging
import math
from collections import deque

log = logging.getLogger(__name__)

SELECT = ("cindex", "loss")
WITHOUT_VALIDATION = ("last", "error")


class NoValidationError(ValueError):
    """``train.without_validation=error`` and the run has no usable validation data."""


def no_validation_message(where: str) -> str:
    """What a run without usable validation data is told (centralised and federated alike)."""
    return (
        f"{where}: no validation data to select the epoch/round by (no validation patients, or none with an "
        "event and a comparable pair)"
    )


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class Selector:
    """Tracks validation scores per step and says when a step becomes the one to keep.

    Args:
        select: ``cindex`` or ``loss``.
        window: trailing window (steps) the score is averaged over (1: the step alone).
        without_validation: ``last`` or ``error`` (see the module docstring).
        where: names the run in messages (``centralised training``, ``federated server``).
    """

    def __init__(self, select: str = "loss", window: int = 1, without_validation: str = "last", where: str = ""):
        if select not in SELECT:
            raise ValueError(f"unknown train.select {select!r}: valid names are {list(SELECT)}")
        if without_validation not in WITHOUT_VALIDATION:
            raise ValueError(
                f"unknown train.without_validation {without_validation!r}: valid names are {list(WITHOUT_VALIDATION)}"
            )
        if window < 1:
            raise ValueError(f"train.select_window must be >= 1, got {window}")
        self.select, self.window, self.policy, self.where = select, window, without_validation, where or "training"
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        self.best: tuple[float, float, int] | None = None  # (primary, tie-break, step), higher is better
        self.best_cindex = self.best_loss = float("nan")
        self.warned = False

    def check_available(self, has_validation: bool) -> None:
        """Before training: raise under ``error`` when it is already known that there is no validation."""
        if not has_validation:
            self.no_validation()

    def no_validation(self) -> None:
        """Apply the policy for a step without a usable score: raise (``error``) or warn once (``last``)."""
        if self.policy == "error":
            raise NoValidationError(
                f"{no_validation_message(self.where)}; give validation patients (train.val_fraction > 0, or 'val' "
                "in the split column) or set train.without_validation=last to keep the last epoch/round"
            )
        if not self.warned:
            msg = no_validation_message(self.where)
            log.warning("%s; keeping the last epoch/round (train.without_validation=last; 'error' refuses)", msg)
            self.warned = True

    def update(self, step: int, cindex: float, loss: float) -> bool:
        """Report step ``step``'s validation ``cindex`` and ``loss`` (NaN when absent). True: keep this step's
        weights (it is the best so far, or there is no usable validation yet and it is the latest step)."""
        usable = _finite(cindex) if self.select == "cindex" else _finite(loss)
        if not usable:
            if self.best is None:
                self.no_validation()
                return True  # nothing better known: the latest step (``last``)
            self.recent.clear()  # a gap breaks the window
            return False
        self.recent.append((cindex, loss))
        c = sum(x[0] for x in self.recent) / len(self.recent)
        lo = [x[1] for x in self.recent if _finite(x[1])]
        mean_loss = sum(lo) / len(lo) if lo else float("nan")
        score = (c, -mean_loss if _finite(mean_loss) else -math.inf) if self.select == "cindex" else (-mean_loss, c)
        if self.select == "loss" and not _finite(c):
            score = (score[0], -math.inf)
        if self.best is None or (score[0], score[1]) >= self.best[:2]:
            self.best = (score[0], score[1], step)
            self.best_cindex, self.best_loss = c, mean_loss
            return True
        return False

    @property
    def has_score(self) -> bool:
        """Whether a step was kept on a validation score (False: the latest step kept for lack of one)."""
        return self.best is not None

    def state(self) -> dict:
        """JSON-able state (a federated checkpoint)."""
        return {
            "recent": [list(x) for x in self.recent],
            "best": list(self.best) if self.best is not None else None,
            "best_cindex": self.best_cindex,
            "best_loss": self.best_loss,
            "warned": self.warned,
        }

    def load_state(self, s: dict) -> None:
        self.recent = deque((tuple(x) for x in s["recent"]), maxlen=self.window)  # type: ignore[misc]
        b = s["best"]
        self.best = (float(b[0]), float(b[1]), int(b[2])) if b is not None else None
        self.best_cindex, self.best_loss = float(s["best_cindex"]), float(s["best_loss"])
        self.warned = bool(s["warned"])
