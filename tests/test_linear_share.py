"""Each tile's exact share of a linear slide term (``linear_share``), and what the tile attention of a model weighs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs.artifacts import RunFiles
from models import build_model
from models.linear import LinearSurvival
from pipeline.outputs.attribution import attention_role, linear_slide_term, tile_integrated_gradients
from pipeline.outputs.report import _tile_note
from pipeline.training.data import CohortData

D, G, C = 8, 5, 3


def _linear(kind: str, seed: int = 0, tiles: torch.Tensor | None = None) -> LinearSurvival:
    """A linear model with a random fit whose slide term is over the raw standardised mean (``raw``), 3 PCs
    (``pcs``), 4 tile clusters (``composition``) or both; the clusters centred on the scores of ``tiles[:4]``."""
    gen = torch.Generator().manual_seed(seed)
    m = LinearSurvival(D, G, C)
    m.set_slide_norm(torch.randn(D, generator=gen), torch.rand(D, generator=gen) + 0.5)
    if kind != "raw":
        m.set_slide_projection(torch.randn(3, D, generator=gen), torch.randn(3, generator=gen), torch.rand(3) + 0.5)
    if kind in ("composition", "both"):
        assert tiles is not None, "clusters need tiles to centre on"
        b = {k: m.get_buffer(k) for k in ("slide_mean", "slide_scale", "slide_components")}
        cents = ((tiles[:4] - b["slide_mean"]) / b["slide_scale"]) @ b["slide_components"].T  # 4 tiles' scores
        m.set_slide_clusters(cents, torch.rand(4, generator=gen) * 0.3, torch.rand(4, generator=gen) + 0.2,
                             keep_pcs=kind == "both")  # fmt: skip
    width = sum(lin.in_features for lin in m.terms())
    m.set_coefficients(torch.randn(width, generator=gen))
    return m.eval()


def _slide_term(m: LinearSurvival, x: torch.Tensor) -> float:
    """The slide term of one bag ``x [N, D]``: the model's log hazard with omics and clinical absent (0)."""
    out = m(x[None], torch.ones(1, len(x), dtype=torch.bool), torch.zeros(1, G), torch.zeros(1, dtype=torch.bool),
            torch.zeros(1, C), torch.zeros(1, dtype=torch.bool))  # fmt: skip
    return float(out.log_hz[0])


@pytest.mark.parametrize("kind", ["raw", "pcs", "composition", "both"])
def test_tile_shares_sum_to_the_bags_slide_term(kind):
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(1)) * 2
    m = _linear(kind, tiles=x)
    with torch.no_grad():
        share = m.tile_shares(x)
        assert share.shape == (11,)
        assert float(share.sum()) == pytest.approx(_slide_term(m, x), abs=1e-5)
        assert m.tile_shares(x[:0]).shape == (0,)
    if kind == "composition":  # only the cluster counts: tiles in one cluster share one value
        with torch.no_grad():
            f = m.slide_fractions(x[:, None], torch.ones(11, 1, dtype=torch.bool))  # (N, K) one-hot
        filled = [share[f[:, k] > 0.5] for k in range(f.shape[1]) if bool((f[:, k] > 0.5).any())]
        assert len(filled) == 4  # every cluster holds a tile (at least its centre)
        for members in filled:
            torch.testing.assert_close(members, members[:1].expand_as(members))


def test_pc_shares_match_an_independent_computation():
    m = _linear("pcs")
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(2))
    b = {k: m.get_buffer(k).double().numpy() for k in ("slide_mean", "slide_scale", "slide_components",
                                                        "slide_pc_mean", "slide_pc_scale")}  # fmt: skip
    u = ((x.double().numpy() - b["slide_mean"]) / b["slide_scale"]) @ b["slide_components"].T - b["slide_pc_mean"]
    u /= b["slide_pc_scale"]
    want = u @ m.slide_linear.weight.detach().double().numpy()[0] / len(x)
    with torch.no_grad():
        np.testing.assert_allclose(m.tile_shares(x).numpy(), want, rtol=1e-5, atol=1e-6)


def _one_patient(x: np.ndarray) -> CohortData:
    n = 2
    return CohortData(
        patient_ids=["P0", "P1"], sites=["a"], site=np.zeros(n, int), time=np.array([3.0, 5.0], np.float32),
        event=np.array([True, False]), splits={"train": np.arange(n), "val": np.zeros(0, int), "test": np.arange(n)},
        bags=[x, x[:3] + 1], tiles=[[("S0", 224 * j, 0) for j in range(len(x))], [("S1", 0, 0)] * 3],
        feature_dim=D, omics=np.zeros((n, G), np.float32), omics_present=np.ones(n, bool), genes=list("abcde"),
        clinical=np.zeros((n, C), np.float32), clinical_present=np.ones(n, bool),
    )  # fmt: skip


def test_captum_tile_ig_of_a_fitted_network_at_gate_zero_is_the_offsets_share_less_the_baselines():
    """A linear slide term makes IG exact per tile: IG_i = share(x_i) - share(baseline), with the network's residual
    gate at 0 (the network is its offset). A reference from captum for the closed form."""
    torch.manual_seed(0)
    net = build_model(D, G, C, skip="fitted", hidden=16, omics_hidden=8, clinical_hidden=4, dropout=0.0).eval()
    src = _linear("pcs")
    net.offset.load_state_dict(src.state_dict())
    assert float(net.residual_gate.detach()) == 0.0
    x = np.random.default_rng(3).normal(size=(6, D)).astype(np.float32)
    base = np.random.default_rng(4).normal(size=D).astype(np.float32)
    data = _one_patient(x)
    ig = tile_integrated_gradients(net, data, np.array([0]), base, n_steps=8)[0]
    lin = linear_slide_term(net)
    assert lin is net.offset
    with torch.no_grad():
        share = lin.tile_shares(torch.as_tensor(x)).numpy()
        base_share = float(lin.tile_shares(torch.as_tensor(base)[None])[0]) / len(x)  # one baseline tile of N
    np.testing.assert_allclose(ig, share - base_share, rtol=1e-4, atol=1e-5)


def test_attention_role_and_linear_term_per_model_kind():
    plain = build_model(D, G, C, hidden=16, omics_hidden=8, clinical_hidden=4)
    assert attention_role(plain) == "pooling" and linear_slide_term(plain) is None
    fitted = build_model(D, G, C, skip="fitted", hidden=16, omics_hidden=8, clinical_hidden=4)
    assert attention_role(fitted) == "residual" and linear_slide_term(fitted) is fitted.offset
    skip = build_model(D, G, C, skip="linear", hidden=16, omics_hidden=8, clinical_hidden=4)
    assert attention_role(skip) == "residual" and linear_slide_term(skip) is None  # its skip term: not covered
    lin = LinearSurvival(D, G, C)
    assert attention_role(lin) == "uniform" and linear_slide_term(lin) is lin
    assert linear_slide_term(LinearSurvival(D, G, C, n_bins=4)) is None  # discrete time: risk not a tile sum
    assert linear_slide_term(LinearSurvival(0, G, C)) is None  # no slide term
    with pytest.raises(ValueError, match="Cox head only"):
        LinearSurvival(D, G, C, n_bins=4).tile_shares(torch.zeros(2, D))


def test_report_reads_ig_first_where_attention_is_not_the_slide_pathway(tmp_path):
    rf = RunFiles(root=tmp_path)
    pooling, residual = _tile_note(rf, "pooling"), _tile_note(rf, "residual", linear_share=True)
    assert pooling.index("attention (x number") < pooling.index("integrated gradients")
    assert residual.index("integrated gradients") < residual.index("attention")
    assert "gated residual branch only" in residual and "linear_share" in residual and "linear_share" not in pooling
    assert "linear_share" not in _tile_note(rf, "residual")  # model.skip=linear: no such column to point at
    assert "is uniform" in _tile_note(rf, "uniform", linear_share=True)
