"""TODO training.splits."""

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
        rng = np.random.default_rng(seed)
        arr = np.empty(n, dtype=object)
        strata: dict[tuple[str, bool], list[int]] = {}
        for i, p in enumerate(cohort.patients):
            strata.setdefault((p.site, p.event), []).append(i)
        for key in sorted(strata):
            idx = np.array(strata[key])[rng.permutation(len(strata[key]))]
            n_test = int(round(test_fraction * len(idx)))
            n_val = int(round(val_fraction * len(idx)))
            arr[idx[:n_test]] = "test"
            arr[idx[n_test : n_test + n_val]] = "val"
            arr[idx[n_test + n_val :]] = "train"
    return {s: np.flatnonzero(arr == s) for s in ("train", "val", "test")}


def _strata(cohort: Cohort, idx: np.ndarray) -> dict[tuple[str, bool], np.ndarray]:
    out: dict[tuple[str, bool], list[int]] = {}
    for i in idx:
        p = cohort.patients[i]
        out.setdefault((p.site, p.event), []).append(int(i))
    return {k: np.array(out[k]) for k in sorted(out)}


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
    for members in _strata(cohort, np.arange(n)).values():
        members = members[rng.permutation(len(members))]
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
    for members in _strata(cohort, rest).values():
        n_val = int(round(val_fraction * len(members)))
        val += members[rng.permutation(len(members))][:n_val].tolist()
    val_arr = np.array(sorted(val), int)
    train = np.setdiff1d(rest, val_arr)
    return {"train": train, "val": val_arr, "test": test}
