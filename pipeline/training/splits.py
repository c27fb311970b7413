"""Patient splits: train/val/test for one run, K folds for cross-validation, both stratified by (site, event).

:func:`shuffled_strata` is the one stratifier: every (site, event) stratum's patients, in sorted stratum
order, each shuffled by the caller's generator. :func:`assign_splits` keeps the splits the user gave (the
manifest's ``split`` cells, test-only sites) and cuts each stratum of the blank ones by fraction,
:func:`assign_folds` deals them round-robin, :func:`site_folds` makes one fold per site (leave-site-out),
:func:`fold_splits` carves each fold's validation set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from data_specs.cohort import Cohort

log = logging.getLogger(__name__)


def check_test_sites(cohort: Cohort, test_sites: Sequence[str]) -> list[str]:
    """The named test-only sites, checked against the cohort's sites.

    Raises ``ValueError`` naming an unknown site and listing the cohort's sites, or when every site is named
    (nothing would be left to train on).
    """
    names = list(dict.fromkeys(str(s).strip() for s in test_sites if str(s).strip()))
    unknown = [s for s in names if s not in cohort.sites]
    if unknown:
        raise ValueError(
            f"train.test_sites: unknown site(s) {', '.join(unknown)}; the cohort's sites are {', '.join(cohort.sites)}"
        )
    if names and set(names) == set(cohort.sites):
        raise ValueError(f"train.test_sites: every site ({', '.join(names)}) is test only: no site is left to train on")
    return names


def given_splits(cohort: Cohort, test_sites: Sequence[str] = ()) -> np.ndarray:
    """``[P]`` object array: each patient's split from the manifest's ``split`` column (None when blank), and
    ``"test"`` for every patient of a test-only site.

    Raises ``ValueError`` naming the patient when a test-only site's patient is marked ``train`` or ``val``.
    """
    sites = set(check_test_sites(cohort, test_sites))
    arr = np.array([p.split for p in cohort.patients], dtype=object)
    for i, p in enumerate(cohort.patients):
        if p.site in sites:
            if p.split not in (None, "test"):
                raise ValueError(
                    f"patient {p.patient_id}: split column says '{p.split}' but site {p.site} is in "
                    "train.test_sites (test only); leave the cell blank or mark it test"
                )
            arr[i] = "test"
    return arr


def assign_splits(
    cohort: Cohort, val_fraction: float, test_fraction: float, seed: int, test_sites: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` cohort indices: what the user gave is kept, blanks are assigned.

    Given: the manifest's ``split`` cells, and every patient of a ``test_sites`` site as test only (never
    trained on, never in the federation). Blank cells are assigned per (site, event) stratum, deterministic
    from ``seed`` (:func:`shuffled_strata`): when any patient is already test (marked, or of a test site),
    blanks go to train/val only (``round(val_fraction * n)`` val per stratum), so a held-out set the user chose
    is never diluted; otherwise blanks are cut into test/val/train by ``test_fraction`` and ``val_fraction``.
    """
    arr = given_splits(cohort, test_sites)
    blank = np.flatnonzero(np.array([s is None for s in arr], bool))
    if len(blank):
        held_out = bool((arr == "test").any())
        tf = 0.0 if held_out else test_fraction
        if len(blank) < len(arr):
            log.info("split given for %d of %d patients; the %d blank ones are assigned to %s (seed %d)",
                     len(arr) - len(blank), len(arr), len(blank), "train/val" if held_out else "train/val/test",
                     seed)  # fmt: skip
        for idx in shuffled_strata(cohort, blank, np.random.default_rng(seed)):
            n_test = int(round(tf * len(idx)))
            n_val = int(round(val_fraction * len(idx)))
            arr[idx[:n_test]] = "test"
            arr[idx[n_test : n_test + n_val]] = "val"
            arr[idx[n_test + n_val :]] = "train"
    return {s: np.flatnonzero(arr == s) for s in ("train", "val", "test")}


def split_counts(cohort: Cohort, splits: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Patients per site in each split: ``{site: {"train": n, "val": n, "test": n}}`` (sites in cohort order)."""
    site = np.array([p.site for p in cohort.patients])
    return {s: {k: int((site[np.asarray(v, int)] == s).sum()) for k, v in splits.items()} for s in cohort.sites}


def split_lines(cohort: Cohort, splits: dict[str, np.ndarray], test_sites: Sequence[str] = ()) -> list[str]:
    """The final split per site as console lines (what ``histofuse validate`` prints)."""
    lines = []
    for s, c in split_counts(cohort, splits).items():
        tag = " (test-only site: not trained on, not in the federation)" if s in test_sites else ""
        lines.append(f"  site {s}: train {c['train']}, val {c['val']}, test {c['test']}{tag}")
    return lines


def site_folds(cohort: Cohort) -> np.ndarray:
    """``fold [P]``: each patient's site index in ``cohort.sites`` (leave-one-site-out, one fold per site).

    Raises ``ValueError`` for a cohort with fewer than 2 sites.
    """
    if len(cohort.sites) < 2:
        raise ValueError(f"leave-site-out needs at least 2 sites; the cohort has {len(cohort.sites)} ({cohort.sites})")
    return np.array([cohort.sites.index(p.site) for p in cohort.patients], int)


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
