"""``model.skip=fitted``: the fitted linear family as a frozen offset plus a gated, penalised residual branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model, cox_loss
from models.linear import LinearSurvival
from pipeline.training.bundle import load_bundle, save_bundle
from pipeline.training.linear_fit import fit_linear_centralised
from pipeline.training.module import fit_local, new_model, offset_config
from pipeline.training.predict import predict
from tests.test_models import _skip_inputs
from tests.test_train import _cfg, _data


def _fitted(d: int = 8, g: int = 5, c: int = 3):
    torch.manual_seed(0)
    m = build_model(d, g, c, skip="fitted", hidden=16, omics_hidden=8, clinical_hidden=4, dropout=0.0)
    assert isinstance(m.offset, LinearSurvival)
    m.offset.set_slide_norm(torch.randn(d), torch.rand(d) + 0.5)
    m.offset.set_coefficients(torch.randn(d + g + c))
    return m


def test_with_the_gate_at_zero_the_network_is_its_offset_and_the_offset_gets_no_gradient():
    m = _fitted().eval()
    x = _skip_inputs()
    want = m.offset(**x).log_hz.detach()
    torch.testing.assert_close(m(**x).log_hz, want)
    with torch.no_grad():  # the residual branch has no say while the gate is 0
        for name, p in m.named_parameters():
            if not name.startswith(("offset.", "residual_gate")):
                p.add_(torch.randn_like(p))
    torch.testing.assert_close(m(**x).log_hz, want)
    m.train()
    x["omics"].requires_grad_(True)
    event, time = torch.tensor([1, 0, 1, 1, 0, 1]), torch.arange(1.0, 7.0)
    cox_loss(m(**x).log_hz, event, time).backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.startswith("offset."))
    assert float(m.residual_gate.grad.abs()) > 0  # at init only the gate moves
    assert float(x["omics"].grad.abs().sum()) > 0  # inputs see the offset (attributions)
    with torch.no_grad():
        m.residual_gate.fill_(0.5)
    out = m(**x)
    torch.testing.assert_close(out.log_hz - out.residual, m.offset(**x).log_hz)
    assert float(out.residual.detach().abs().sum()) > 0


def test_fitted_needs_an_offset_and_a_cox_head():
    with pytest.raises(ValueError, match="unknown skip 'ridge'.*'fitted'"):
        build_model(8, 5, 0, skip="ridge")
    with pytest.raises(ValueError, match="Cox head"):
        build_model(8, 5, 0, skip="fitted", n_bins=3)
    from models.survival import MultimodalSurvival

    with pytest.raises(ValueError, match="needs an offset"):
        MultimodalSurvival(8, 5, 0, skip="fitted")


def test_centralised_offset_is_the_linear_fit_frozen_and_the_penalty_closes_the_residual(tmp_path):
    data, _ = _data(n=90)
    cfg = _cfg(tmp_path, "model.skip=fitted", "train.epochs=4")
    idx = np.concatenate([data.splits["train"], data.splits["val"]])
    lin_cfg = offset_config(cfg)
    linear = new_model(data, lin_cfg)
    fit_linear_centralised(linear, data, idx, lin_cfg)
    module, info = fit_local(data, cfg)
    model = module.model.eval()
    torch.testing.assert_close(model.offset.coefficients(), linear.coefficients())  # fitted first, then frozen
    for k, v in linear.state_dict().items():
        torch.testing.assert_close(model.offset.state_dict()[k], v)
    assert info["offset_fit"]["penalty"] > 0
    assert float(model.residual_gate.detach().abs()) > 0  # the residual was trained
    te = data.splits["val"]
    lin_lh = predict(linear, data, te).log_hz
    assert not np.allclose(predict(model, data, te).log_hz, lin_lh)
    # a very large penalty on the gated residual keeps the network at its linear part
    pen, _ = fit_local(data, cfg.with_overrides(["train.residual_penalty=1e4"]))
    gap = np.abs(predict(pen.model.eval(), data, te).log_hz - lin_lh).max()
    assert gap < 0.05 * np.abs(lin_lh).max()


def test_skip_fitted_needs_the_full_batch_cox_fit(tmp_path):
    data, _ = _data()
    with pytest.raises(ValueError, match="model.skip=fitted needs train.loss=cox"):
        fit_local(data, _cfg(tmp_path, "model.skip=fitted", "train.linear_fit=sgd"))


def test_federated_offset_is_the_federated_linear_fit_unchanged_by_the_rounds(tmp_path):
    from pipeline.federated.embedded import run_federated
    from pipeline.federated.linear_sites import train_linear_federated

    data, _ = _data(n=90)
    cfg = _cfg(tmp_path, "model.skip=fitted", "federated.enabled=true", "federated.rounds=2",
               "federated.local_epochs=1", "federated.min_count=5")  # fmt: skip
    linear, _ = train_linear_federated(data, offset_config(cfg))
    model, info = run_federated(data, cfg)
    np.testing.assert_array_equal(model.offset.coefficients().numpy(), linear.coefficients().numpy())
    assert info["offset_fit"]["rounds"] > 0 and float(model.residual_gate.detach().abs()) > 0
    with pytest.raises(ValueError, match="no DP or SecAgg"):
        run_federated(data, cfg.with_overrides(["federated.secagg=true"]))


def test_the_model_file_carries_the_offset(tmp_path):
    data, _ = _data(n=90)
    cfg = _cfg(tmp_path, "model.skip=fitted", "train.epochs=2")
    module, info = fit_local(data, cfg)
    model = module.model.eval()
    save_bundle(tmp_path / "model.safetensors", model, data, cfg, {"train_info": info})
    back, _ = load_bundle(tmp_path / "model.safetensors")
    assert any(k.startswith("offset.") for k in back.state_dict())
    idx = np.arange(len(data.patient_ids))
    np.testing.assert_allclose(predict(back, data, idx).log_hz, predict(model, data, idx).log_hz, rtol=1e-6)
    torch.testing.assert_close(back.offset.get_buffer("slide_mean"), model.offset.get_buffer("slide_mean"))
