"""MIL poolings, fusions and heads: gradients, masks, missing modalities, invariances, factories."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import FUSIONS, MIL_POOLINGS, TransMIL, build_fusion, build_mil, build_model, cox_loss, nll_loss

D, G, C = 12, 10, 3
COMBOS = list(itertools.product(sorted(FUSIONS), sorted(MIL_POOLINGS), [0, 4]))


def _batch(b: int = 6, n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded bags, one empty bag, one patient without omics, one without clinical data."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0] = False  # no slides
    mask[1, 3:] = False  # padded
    omics_mask = torch.ones(b, dtype=torch.bool)
    omics_mask[2] = False
    clinical_mask = torch.ones(b, dtype=torch.bool)
    clinical_mask[3] = False
    return {
        "features": torch.randn(b, n, D, generator=g),
        "mask": mask,
        "omics": torch.randn(b, G, generator=g),
        "omics_mask": omics_mask,
        "clinical": torch.randn(b, C, generator=g),
        "clinical_mask": clinical_mask,
    }


def _model(fusion: str, mil: str, n_bins: int, **kw):
    torch.manual_seed(0)
    kw |= {"hidden": 16, "omics_hidden": 8, "clinical_hidden": 4}
    return build_model(D, G, C, fusion=fusion, mil=mil, n_bins=n_bins, **kw)


def _loss(out, n_bins: int) -> torch.Tensor:
    event = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    if n_bins:
        return nll_loss(out.logits, event, torch.tensor([0, 1, 2, 3, 3, 1]))
    return cox_loss(out.log_hz, event, torch.arange(1.0, 7.0))


@pytest.mark.parametrize(("fusion", "mil", "n_bins"), COMBOS)
def test_every_parameter_gets_a_finite_gradient(fusion, mil, n_bins):
    m = _model(fusion, mil, n_bins)
    out = m(**_batch())
    loss = _loss(out, n_bins)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.log_hz).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    if n_bins:
        assert out.hazards is not None and out.survival is not None and out.hazards.shape == (6, n_bins)
        torch.testing.assert_close(out.survival, torch.cumprod(1 - out.hazards, dim=1))
        torch.testing.assert_close(out.log_hz, -out.survival.sum(1))


@pytest.mark.parametrize(("fusion", "mil", "n_bins"), COMBOS)
def test_masked_values_never_matter(fusion, mil, n_bins):
    """Garbage (even NaN) in padded tiles, an empty bag, absent omics or clinical rows changes nothing."""
    m = _model(fusion, mil, n_bins).eval()
    b = _batch()
    ref = m(**b)
    junk = dict(b)
    junk["features"] = b["features"].masked_fill(~b["mask"].unsqueeze(-1), float("nan"))
    junk["omics"] = b["omics"].masked_fill(~b["omics_mask"].unsqueeze(1), float("nan"))
    junk["clinical"] = b["clinical"].masked_fill(~b["clinical_mask"].unsqueeze(1), 1e4)
    out = m(**junk)
    torch.testing.assert_close(out.log_hz, ref.log_hz)
    assert ref.attn is not None and out.attn is not None
    torch.testing.assert_close(out.attn, ref.attn)
    assert torch.all(ref.attn[0] == 0) and torch.all(ref.attn[1, 3:] == 0)
    torch.testing.assert_close(ref.attn[1:].sum(1), torch.ones(5))


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
@settings(max_examples=6, deadline=None)
@given(pad=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_model_padding_changes_nothing(fusion, pad, seed):
    m = _model(fusion, "transmil", 0).eval()
    b = _batch(seed=seed)
    g = torch.Generator().manual_seed(seed)
    padded = dict(b)
    padded["features"] = torch.cat([b["features"], 1e3 * torch.randn(6, pad, D, generator=g)], dim=1)
    padded["mask"] = torch.cat([b["mask"], torch.zeros(6, pad, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(m(**padded).log_hz, m(**b).log_hz, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_model_is_tile_permutation_invariant(fusion):
    m = _model(fusion, "transmil", 0).eval()
    b = _batch()
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    shuffled = dict(b, features=b["features"][:, perm], mask=b["mask"][:, perm])
    o1, o2 = m(**b), m(**shuffled)
    torch.testing.assert_close(o1.log_hz, o2.log_hz, atol=1e-5, rtol=1e-5)
    assert o1.attn is not None and o2.attn is not None
    torch.testing.assert_close(o1.attn[:, perm], o2.attn, atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), pad=st.integers(0, 8), seed=st.integers(0, 10_000))
def test_transmil_permutation_and_padding_invariance(n, pad, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mil = TransMIL(8, 16, dropout=0.0, layers=2, heads=4).eval()
    x = torch.randn(2, n, 8, generator=g)
    ones = torch.ones(2, n, dtype=torch.bool)
    z1, a1 = mil(x, ones)
    perm = torch.randperm(n, generator=g)
    z2, a2 = mil(x[:, perm], ones)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1[:, perm], a2, atol=1e-6, rtol=1e-5)
    xp = torch.cat([x, 1e3 * torch.randn(2, pad, 8, generator=g)], dim=1)
    mp = torch.cat([ones, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
    z3, a3 = mil(xp, mp)
    torch.testing.assert_close(z1, z3, atol=1e-5, rtol=1e-5)
    assert torch.all(a3[:, n:] == 0) and torch.allclose(a3.sum(1), torch.ones(2))


def test_transmil_empty_bag_is_zero():
    mil = TransMIL(4, 8, dropout=0.0, heads=2)
    with torch.no_grad():
        z, a = mil(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False, False, False]]))
    assert torch.all(z[1] == 0) and torch.all(a[1] == 0) and torch.isfinite(z).all()
    assert float(a[0, 0]) == pytest.approx(1.0)


def test_patient_without_any_modality_but_clinical_still_gets_a_risk():
    m = _model("bilinear", "gated_attention", 0).eval()
    b = _batch()
    b["mask"][4] = False
    b["omics_mask"][4] = False
    out = m(**b)
    assert torch.isfinite(out.log_hz).all()
    b2 = dict(b, features=b["features"] * 3, omics=b["omics"] + 5)  # only patient 4 is unaffected
    assert m(**b2).log_hz[4] == out.log_hz[4]


def test_linear_omics_only_model_is_a_linear_cox_model():
    m = build_model(0, G, 0, omics_encoder="linear")
    assert [n for n, _ in m.named_parameters()] == ["omics_linear.weight"]
    x = torch.randn(5, G)
    present = torch.tensor([True, True, True, True, False])
    out = m(omics=x, omics_mask=present)
    torch.testing.assert_close(out.log_hz[:4], x[:4] @ m.omics_linear.weight[0])  # type: ignore[union-attr]
    assert out.log_hz[4] == 0  # a missing (standardised) profile sits at the training mean
    nll = build_model(0, G, 0, omics_encoder="linear", n_bins=3)
    assert sorted(n for n, _ in nll.named_parameters()) == ["bin_bias", "omics_linear.weight"]


def test_factories_list_valid_names_and_reject_impossible_models():
    with pytest.raises(ValueError, match=r"valid names are \['bilinear', 'coattention', 'concat'\]"):
        build_fusion("kron", [4, 4], 8, 0.0)
    with pytest.raises(ValueError, match=r"valid names are \['gated_attention', 'gated_attention_mean', 'transmil'\]"):
        build_mil("clam", 8)
    with pytest.raises(ValueError, match="coattention' needs tile features and omics"):
        build_model(0, G, C, fusion="coattention")
    with pytest.raises(ValueError, match="omics_encoder"):
        build_model(D, G, 0, fusion="coattention", omics_encoder="linear")
    with pytest.raises(ValueError, match="not divisible"):
        build_model(D, 0, 0, mil="transmil", hidden=10, mil_heads=4)
    with pytest.raises(ValueError, match="unknown omics_encoder"):
        build_model(0, G, 0, omics_encoder="pca")


def test_bilinear_missing_modality_keeps_only_the_others_terms():
    """With the omics modality missing, its gated vector is [0.., 1]: the output depends only on the rest."""
    f = build_fusion("bilinear", [6, 5], 8, 0.0).eval()
    a, o = torch.randn(3, 6), torch.randn(3, 5)
    present = [torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    torch.testing.assert_close(f([a, o], present), f([a, o * 100], present))
    assert f([a, o], [present[0], present[0]]).shape == (3, 8)


def test_bilinear_form_equals_torch_bilinear():
    from models.fusion import BilinearForm

    torch.manual_seed(0)
    ref, mine = torch.nn.Bilinear(7, 5, 3), BilinearForm(7, 5, 3)
    with torch.no_grad():
        mine.weight.copy_(ref.weight)
        mine.bias.copy_(ref.bias)
    x1, x2 = torch.randn(4, 7), torch.randn(4, 5)
    torch.testing.assert_close(mine(x1, x2), ref(x1, x2))
