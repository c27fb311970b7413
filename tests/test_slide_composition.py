"""The linear family's tile-phenotype composition (``model.linear_slide=composition|both``): Lloyd iterations from site
sums against k-means of the pooled tiles, pooled == federated, the composition's buffers in the model file, the
disclosure checks of the cluster sums, the config check, and the ``model.skip=fitted`` offset carrying it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from models import LinearSurvival
from pipeline.training.data import CohortData

D, G, C = 6, 4, 2
CENTRES = np.array([[8.0, 0, 0, 0, 0, 0], [0, 8.0, 0, 0, 0, 0], [0, 0, 8.0, 0, 0, 0]])  # three tile phenotypes


def phenotypes(n: int = 180, seed: int = 0) -> tuple[CohortData, np.ndarray]:
    """``n`` patients at 3 sites, each with 6-20 tiles drawn from three well-separated phenotypes in proportions
    ``frac [n, 3]`` (Dirichlet); the log hazard is ``3 * frac[:, 0]``; genes and clinical covariates are noise."""
    rng = np.random.default_rng(seed)
    frac = rng.dirichlet(np.ones(3), size=n)
    bags = []
    for i in range(n):
        m = int(rng.integers(6, 21))
        lab = rng.choice(3, size=m, p=frac[i])
        frac[i] = np.bincount(lab, minlength=3) / m  # the realised fractions
        bags.append((CENTRES[lab] + rng.normal(size=(m, D))).astype(np.float32))
    time = rng.exponential(np.exp(-3.0 * frac[:, 0])).astype(np.float32)
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[: n // 2]), "val": np.sort(perm[n // 2 : 3 * n // 4]),
              "test": np.sort(perm[3 * n // 4 :])}  # fmt: skip
    data = CohortData(
        patient_ids=[f"P{i:03d}" for i in range(n)],
        sites=["s0", "s1", "s2"],
        site=np.arange(n) % 3,
        time=time,
        event=rng.random(n) < 0.8,
        splits=splits,
        bags=bags,
        tiles=[[("s", 0, 0)] * len(b) for b in bags],
        feature_dim=D,
        omics=rng.normal(size=(n, G)).astype(np.float32),
        omics_present=np.ones(n, bool),
        genes=[f"G{j}" for j in range(G)],
        clinical=rng.normal(size=(n, C)).astype(np.float32),
        clinical_present=np.ones(n, bool),
        clinical_columns=["c0", "c1"],
    )
    return data, frac


def _cfg(slide: str = "both", k: int = 3, *extra: str, **kw):
    ov = ["model.family=linear", "model.linear_slide_pcs=3", f"model.linear_slide={slide}",
          f"model.linear_slide_clusters={k}", "federated.min_count=10", *extra]  # fmt: skip
    return resolve_config(None, ov, **kw)


def _non_test(data: CohortData) -> np.ndarray:
    return np.sort(np.concatenate([data.splits["train"], data.splits["val"]]))


def _projected(data: CohortData, idx: np.ndarray):
    from pipeline.training.slide_norm import prepare_slide_projection

    m = LinearSurvival(D, G, C)
    prepare_slide_projection(m, data, idx, 3)
    return m


def test_one_lloyd_round_from_site_sums_is_weighted_kmeans_of_the_pooled_tiles():
    from pipeline.training.slide_clusters import cluster_sums, lloyd_step

    data, _ = phenotypes()
    idx = _non_test(data)
    m = _projected(data, idx)
    mean, comps = m.get_buffer("slide_mean").double().numpy(), m.get_buffer("slide_components").double().numpy()
    rng = np.random.default_rng(1)
    cents = rng.normal(size=(4, 3)) * 5
    answers = [cluster_sums(data, g, mean, comps, cents, 2) for g in data.subset_sites(idx).values()]
    got = lloyd_step(answers, cents)
    # reference: every tile of every patient in idx, weighted 1 / N_i, assigned to its nearest centroid
    t = [(data.bags[i].astype(np.float64) - mean) @ comps.T for i in idx]
    scores, w = np.concatenate(t), np.concatenate([np.full(len(x), 1.0 / len(x)) for x in t])
    lab = ((scores[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    for j in range(4):
        sel = lab == j
        want = (w[sel, None] * scores[sel]).sum(0) / w[sel].sum() if sel.any() else cents[j]
        np.testing.assert_allclose(got[j], want, rtol=1e-10, atol=1e-10)
    assert sum(a["mass"].sum() for a in answers) == pytest.approx(len(idx))  # each patient's mass is 1


def test_fitted_phenotypes_recover_the_planted_tile_fractions():
    from pipeline.training.slide_clusters import bag_fractions

    data, frac = phenotypes()
    idx = _non_test(data)
    m = LinearSurvival(D, G, C)
    from pipeline.training.slide_clusters import prepare_slide_term

    info = prepare_slide_term(m, data, idx, 3, slide="composition", clusters=3)
    assert info["slide"] == "composition" and info["clusters"]["converged"] and m.slide_clusters == 3
    assert m.slide_linear.in_features == 3  # composition alone: K inputs, no scores
    f = bag_fractions(m, data.bags)  # (P, 3), rows sum to 1
    np.testing.assert_allclose(f.sum(1), 1.0)
    match = np.abs(np.corrcoef(f.T, frac.T)[:3, 3:])  # fitted cluster x planted phenotype
    assert (match.max(0) > 0.999).all()  # every planted phenotype is one fitted cluster, tile for tile


def _fit(data: CohortData, cfg, federated: bool, ledger=None):
    from pipeline.federated.linear_sites import fit_federated_cv
    from pipeline.training.linear_fit import fit_with_cv, parties_of
    from pipeline.training.module import new_model
    from pipeline.training.slide_clusters import prepare_slide_term

    idx, m = _non_test(data), new_model(data, cfg)
    grid = (0.3, 0.03, 0.003)
    if federated:
        rec = fit_federated_cv(m, data, idx, cfg, ledger, grid)
        return m, rec
    mc = cfg.model
    proj = prepare_slide_term(m, data, idx, 3, "tiles", None, mc.linear_slide, mc.linear_slide_clusters, 10)
    rec = fit_with_cv(m, parties_of(m, data, idx, cfg, True), grid, cfg.train.linear_l1_ratio)
    return m, {**rec, "slide_projection": proj}


@pytest.mark.parametrize("slide", ["composition", "both"])
def test_pooled_and_federated_fit_the_same_composition_and_only_declared_aggregates_leave(slide, tmp_path):
    from pipeline.federated.ledger import check_no_values, read_ledger
    from tests.test_linear import _cindex

    data, _ = phenotypes(n=240)
    cfg = _cfg(slide)
    pooled, rec_p = _fit(data, cfg, False)
    fed, rec_f = _fit(data, cfg, True, tmp_path / "ledger.jsonl")
    assert rec_f["slide_projection"]["clusters"]["lloyd_rounds"] == rec_p["slide_projection"]["clusters"][
        "lloyd_rounds"]  # fmt: skip
    for name in ("slide_centroids", "slide_comp_mean", "slide_comp_scale", "slide_components"):
        torch.testing.assert_close(fed.get_buffer(name), pooled.get_buffer(name))
    torch.testing.assert_close(fed.coefficients(), pooled.coefficients(), atol=1e-6, rtol=0)
    assert fed.slide_linear.in_features == (3 + 3 if slide == "both" else 3)
    assert _cindex(fed, data, "test") > 0.7  # the planted phenotype fraction; noise inputs alone give ~0.5
    lines = list(read_ledger(tmp_path / "ledger.jsonl"))
    phases = {ln["phase"] for ln in lines}
    assert {"linear.slide_clusters", "linear.slide_composition", "linear.slide_moments"} <= phases
    rounds = rec_f["slide_projection"]["clusters"]["lloyd_rounds"]
    assert sum(ln["phase"] == "linear.slide_clusters" for ln in lines) == 3 * rounds  # one answer per site and round
    for ln in lines:
        check_no_values(ln)
    other = replace(data, bags=list(data.bags))
    for i in data.splits["test"]:  # test patients' tiles never enter the phenotypes
        other.bags[i] = other.bags[i] * 0 + 100.0
    again, _ = _fit(other, cfg, True)
    torch.testing.assert_close(again.get_buffer("slide_centroids"), fed.get_buffer("slide_centroids"))


def test_forward_is_the_design_and_the_model_file_reproduces_the_risk(tmp_path):
    from data_specs.artifacts import FeatureAttrs, RunFiles
    from pipeline.training.bundle import load_bundle, save_bundle
    from pipeline.training.linear_fit import design, fit_linear_centralised
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    data, _ = phenotypes()
    data.feature_attrs = FeatureAttrs(encoder="enc", weights=None, feature_kind="imagenet", dim=D, tile_px=224,
                                      target_mpp=0.5)  # fmt: skip
    cfg = _cfg("both", 3, out=tmp_path)
    model = new_model(data, cfg)
    rec = fit_linear_centralised(model, data, _non_test(data), cfg)["linear_fit"]
    assert rec["slide_projection"]["slide"] == "both" and model.slide_clusters == 3
    every = np.arange(len(data.patient_ids))
    want = (design(model, data, every) @ model.coefficients().double()).numpy()
    got = predict(model, data, every).log_hz
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    path = RunFiles(root=tmp_path).model
    save_bundle(path, model.eval(), data, cfg, {"train_info": {"mode": "centralised"}})
    loaded, _ = load_bundle(path)
    assert isinstance(loaded, LinearSurvival) and loaded.slide_clusters == 3 and loaded.slide_pcs == 3
    np.testing.assert_array_equal(predict(loaded, data, every).log_hz, got)
    plain = LinearSurvival(D, G, C)  # a model built without a projection takes the composition's shapes
    plain.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(predict(plain, data, every).log_hz, got)
    bags = [b.copy() for b in data.bags]
    bags[0] = bags[0][:0]  # an empty bag: its slide term is 0
    empty = replace(data, bags=bags)
    x = design(model, empty, np.array([0]))
    assert float(x[0, : model.slide_linear.in_features].abs().max()) == 0.0


def test_cluster_sums_pass_the_disclosure_policy_only_as_declared():
    from pipeline.federated.ledger import MessageLedger
    from pipeline.federated.linear_sites import slide_release
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_cluster_aggregate
    from pipeline.training.slide_clusters import cluster_sums

    data, _ = phenotypes()
    idx = np.arange(180)[data.site == 0]  # 60 patients
    m = _projected(data, idx)
    mean, comps = m.get_buffer("slide_mean").double().numpy(), m.get_buffer("slide_components").double().numpy()
    cents = np.concatenate([(CENTRES - mean) @ comps.T, np.full((1, 3), 1e6)])  # (4, 3): the last one nobody's
    msg = cluster_sums(data, idx, mean, comps, cents, 10)
    facts = SiteFacts("s0", len(idx), 0, 0, 0, (), 10)
    check_cluster_aggregate(facts, msg, 4)
    assert msg["patients"][3] == 0 and msg["mass"][3] == 0
    bad = [
        ({**msg, "extra": 1.0}, "fields"),
        ({**msg, "n_patients": 5}, "patients"),
        ({**msg, "patients": np.where(np.arange(4) == 3, 4.0, msg["patients"])}, "fewer than 10"),
        ({**msg, "mass": msg["mass"] + np.array([0, 0, 0, 0.5])}, "mass"),
        ({**msg, "sum": msg["sum"] + np.eye(4, 3)[::-1]}, "sums"),
        ({**msg, "mass": np.zeros(5)}, "shapes"),
        ({**msg, "n_tiles": 3}, "n_tiles"),
    ]
    for bad_msg, what in bad:
        with pytest.raises(DisclosureError, match=what):
            check_cluster_aggregate(facts, bad_msg, 4)
    # a cluster cell of 1 .. k-1 of the site's patients is sent empty: one patient's outlier tile, a centroid on it
    bags = list(data.bags)
    bags[idx[0]] = np.concatenate([bags[idx[0]], np.full((1, D), 60.0, np.float32)])
    odd = replace(data, bags=bags)
    lone = (np.full((1, D), 60.0) - mean) @ comps.T  # (1, 3)
    small = cluster_sums(odd, idx, mean, comps, np.concatenate([cents[:3], lone]), 10)
    assert small["patients"][3] == 0 and small["mass"][3] == 0 and not small["sum"][3].any()
    assert small["mass"].sum() == pytest.approx(len(idx) - 1 / len(bags[idx[0]]))
    check_cluster_aggregate(facts, small, 4)
    assert cluster_sums(odd, idx, mean, comps, np.concatenate([cents[:3], lone]), 1)["patients"][3] == 1
    ledger = MessageLedger(None)
    release = slide_release(data, idx[:8], _cfg(), ledger)  # 8 patients: withheld at k = 10
    assert release("s0", "slide_clusters", {**msg, "n_patients": 8}) is False and ledger.lines[0]["withheld"]


def test_composition_needs_the_projection_and_a_known_value():
    with pytest.raises(ValueError, match="linear_slide_pcs must be > 0"):
        resolve_config(None, ["model.linear_slide=composition", "model.linear_slide_pcs=0"])
    with pytest.raises(ValueError, match="linear_slide"):
        resolve_config(None, ["model.linear_slide=clusters"])
    assert resolve_config(None, []).model.linear_slide == "pcs"  # the default until the decision


def test_the_fitted_network_offset_carries_the_composition():
    from pipeline.training.module import fit_offset, new_model

    data, _ = phenotypes()
    cfg = _cfg("both", 3, "model.family=network", "model.skip=fitted")
    net = new_model(data, cfg)
    rec = fit_offset(net, data, _non_test(data), cfg)
    assert rec["slide_projection"]["slide"] == "both" and net.offset.slide_clusters == 3
    lin = new_model(data, cfg.with_overrides(["model.family=linear", "model.skip=none"]))
    lin.load_state_dict(net.offset.state_dict())
    x = {"features": torch.from_numpy(np.stack([b[:6] for b in data.bags[:4]])), "mask": torch.ones(4, 6, dtype=bool),
         "omics": torch.from_numpy(data.omics[:4]), "omics_mask": torch.ones(4, dtype=bool),
         "clinical": torch.from_numpy(data.clinical[:4]), "clinical_mask": torch.ones(4, dtype=bool)}  # fmt: skip
    torch.testing.assert_close(net.frozen_offset(*x.values()), lin(**x).log_hz)
