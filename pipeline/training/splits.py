"""Patient splits: train/val/test for one run, K folds for cross-validation, both stratified by (site, event).

:func:`shuffled_strata` is the one stratifier: every (site, event) stratum's patients, in sorted stratum
order, each shuffled by the caller's generator. :func:`assign_splits` cuts each stratum by fraction,
:func:`assign_folds` deals them round-robin, :func:`fold_splits` carves each fold's validation set.
"""

from __future__ import annotations

import logging

import numpy as np

from data_specs.cohort import Cohort

log = logging.getLogger(__name__)


def assign_splits(cohort: Cohort, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The manifest's ``split`` column when every patient has one; otherwise a split stratified by
    site and event, deterministic from ``seed``."""
    n = len(cohort.patients)
    given = [p.split for p in cohort.patients]
    if all(s is not None for s in given):
        arr = np.array(given)
    else:
        if any(s is not None for s in given):
            log.warning("split given for some patients only: ignoring it and splitting by seed %d", seed)
        arr = np.empty(n, dtype=object)
        for idx in shuffled_strata(cohort, np.arange(n), np.random.default_rng(seed)):
            n_test = int(round(test_fraction * len(idx)))
            n_val = int(round(val_fraction * len(idx)))
            arr[idx[:n_test]] = "test"
            arr[idx[n_test : n_test + n_val]] = "val"
            arr[idx[n_test + n_val :]] = "train"
    return {s: np.flatnonzero(arr == s) for s in ("train", "val", "test")}


def shuffled_strata(cohort: Cohort, idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The patients ``idx`` grouped by (site, event), strata in sorted order, each shuffled by ``rng``.

    Returns one int array of cohort indices per stratum; ``rng`` draws one permutation per stratum, in
    that order (so the same seed gives the same split everywhere this is used).
    """
    out: dict[tuple[str, bool], list[int]] = {}
    for i in idx:
        p = cohort.patients[i]
        out.setdefault((p.site, p.event), []).append(int(i))
    return [np.array(out[k])[rng.permutation(len(out[k]))] for k in sorted(out)]


def assign_folds(cohort: Cohort, k: int, seed: int) -> np.ndarray:
    """``fold [P]`` int in ``0..k-1`` for the cohort's patients (cohort order), stratified by site and event.

    Deterministic from ``seed``; fold sizes differ by at most one. Raises ``ValueError`` for ``k < 2`` or
    more folds than patients, and warns when a site has fewer patients than folds.
    """
    n = len(cohort.patients)
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got folds={k}")
    if k > n:
        raise ValueError(f"folds={k} is more than the cohort's {n} patients")
    for s in cohort.sites:
        m = sum(p.site == s for p in cohort.patients)
        if m < k:
            log.warning("site %s has %d patient(s), fewer than %d folds: some test folds lack the site", s, m, k)
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1, int)
    offset = 0
    for members in shuffled_strata(cohort, np.arange(n), rng):
        fold[members] = (offset + np.arange(len(members))) % k
        offset = (offset + len(members)) % k
    assert (fold >= 0).all()
    return fold


def fold_splits(cohort: Cohort, folds: np.ndarray, f: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` index arrays for fold ``f``: test = fold ``f``; validation carved from the
    rest per (site, event) stratum (``round(val_fraction * n)`` each, seeded)."""
    test = np.flatnonzero(folds == f)
    rest = np.flatnonzero(folds != f)
    rng = np.random.default_rng([seed, f])
    val: list[int] = []
    for members in shuffled_strata(cohort, rest, rng):
        n_val = int(round(val_fraction * len(members)))
        val += members[:n_val].tolist()
    val_arr = np.array(sorted(val), int)
    train = np.setdiff1d(rest, val_arr)
    return {"train": train, "val": val_arr, "test": test}
