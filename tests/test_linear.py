"""The linear model family: its formula, missing inputs, the slide standardisation from site summaries, and
training through the same centralised and federated code as the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_specs import resolve_config
from models import LinearSurvival, build_model, cox_loss
from pipeline.training.data import CohortData
from pipeline.training.slide_norm import prepare_linear, slide_norm_from_summaries, slide_site_summary

D, G, C = 6, 8, 3


def synthetic(n: int = 180, seed: int = 0, n_sites: int = 3) -> CohortData:
    """``n`` patients at ``n_sites`` sites: bags of 3-10 tiles (D=6, feature 0 on a large scale, offset 5) whose
    mean carries the log hazard ``1.5 u`` in feature 0; genes and clinical covariates are noise."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=n)
    bags = []
    for i in range(n):
        b = rng.normal(size=(int(rng.integers(3, 11)), D)).astype(np.float32)  # (N_i, D)
        b[:, 0] = 5.0 + 10.0 * (b[:, 0] * 0.3 + u[i])
        bags.append(b)
    time = rng.exponential(np.exp(-1.5 * u)).astype(np.float32)
    perm = rng.permutation(n)
    splits = {"train": np.sort(perm[: n // 2]), "val": np.sort(perm[n // 2 : 3 * n // 4]),
              "test": np.sort(perm[3 * n // 4 :])}  # fmt: skip
    return CohortData(
        patient_ids=[f"P{i:03d}" for i in range(n)],
        sites=[f"s{k}" for k in range(n_sites)],
        site=np.arange(n) % n_sites,
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
        clinical_columns=["a", "b", "c"],
    )


def _random_model(n_bins: int = 0, seed: int = 0, grad: bool = False) -> LinearSurvival:
    torch.manual_seed(seed)
    m = LinearSurvival(D, G, C, n_bins=n_bins)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.set_slide_norm(torch.randn(D), torch.rand(D) + 0.5)
    return m.requires_grad_(grad)


def _inputs(b: int = 4, n: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:] = False
    return {
        "features": torch.randn(b, n, D, generator=g),
        "mask": mask,
        "omics": torch.randn(b, G, generator=g),
        "omics_mask": torch.ones(b, dtype=torch.bool),
        "clinical": torch.randn(b, C, generator=g),
        "clinical_mask": torch.ones(b, dtype=torch.bool),
    }


def test_log_hz_is_the_linear_formula():
    m, x = _random_model(), _inputs()
    out = m(**x)
    mean = torch.stack([x["features"][i][x["mask"][i]].mean(0) for i in range(4)])  # (B, D)
    z = (mean - m.slide_mean) / m.slide_scale
    want = (
        z @ m.slide_linear.weight[0]
        + x["omics"] @ m.omics_linear.weight[0]
        + x["clinical"] @ m.clinical_linear.weight[0]
    )
    torch.testing.assert_close(out.log_hz, want)
    assert out.attn is not None and out.attn.shape == (4, 5)
    torch.testing.assert_close(out.attn[1], torch.tensor([1 / 3] * 3 + [0.0] * 2))  # uniform over real tiles


def test_missing_inputs_contribute_nothing_and_padding_changes_nothing():
    m, x = _random_model(), _inputs()
    full = m(**x).log_hz
    padded = {**x, "features": torch.cat([x["features"], 99 * torch.ones(4, 3, D)], 1),
              "mask": torch.cat([x["mask"], torch.zeros(4, 3, dtype=torch.bool)], 1)}  # fmt: skip
    torch.testing.assert_close(m(**padded).log_hz, full)
    no_tiles = {**x, "mask": torch.zeros_like(x["mask"])}
    torch.testing.assert_close(
        m(**no_tiles).log_hz, full - m.slide_linear(m.slide_z(x["features"], x["mask"])[0])[:, 0]
    )
    no_omics = {**x, "omics_mask": torch.tensor([True, False, True, True])}
    diff = full - m(**no_omics).log_hz
    assert diff[[0, 2, 3]].abs().max() == 0 and diff[1] == pytest.approx(float(m.omics_linear(x["omics"][1])))


def test_every_parameter_gets_a_gradient_and_the_discrete_time_head_works():
    for n_bins in (0, 4):
        m, x = _random_model(n_bins, grad=True), _inputs()
        out = m(**x)
        if n_bins:
            assert out.logits is not None and out.logits.shape == (4, 4) and out.survival is not None
            loss = out.logits.sum()
        else:
            loss = cox_loss(out.log_hz, torch.tensor([1, 0, 1, 1]).bool(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_factory_and_bad_arguments():
    assert isinstance(build_model(D, 0, 0, family="linear", mil="transmil", hidden=32), LinearSurvival)
    assert not isinstance(build_model(D, G, 0), LinearSurvival)  # the network stays the default
    with pytest.raises(ValueError, match="valid names are \\['linear', 'network'\\]"):
        build_model(D, G, C, family="ridge")
    with pytest.raises(ValueError, match="at least one modality"):
        LinearSurvival(0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        LinearSurvival(D, 0, 0).set_slide_norm(torch.zeros(D + 1), torch.ones(D + 1))
    with pytest.raises(ValueError, match="scale must be > 0"):
        LinearSurvival(D, 0, 0).set_slide_norm(torch.zeros(D), torch.zeros(D))
    with pytest.raises(ValueError, match="model.family"):
        resolve_config(None, ["model.family=ridge"])


def test_slide_norm_from_site_summaries_is_the_training_slides_statistics():
    data = synthetic()
    tr = data.splits["train"]
    means = np.stack([data.bags[i].astype(np.float64).mean(0) for i in tr])
    sums = [slide_site_summary(data, idx) for idx in data.subset_sites(tr).values()]
    mean, scale = slide_norm_from_summaries(sums, D)
    np.testing.assert_allclose(mean, means.mean(0), rtol=1e-10)
    np.testing.assert_allclose(scale, means.std(0), rtol=1e-8)
    assert slide_site_summary(data, tr[:1]) is None  # one patient's summary is that patient's values
    m = LinearSurvival(D, G, C)
    before = data.bags[data.splits["test"][0]].copy()
    data.bags[data.splits["test"][0]][:] = 1e6  # test patients never enter the statistics
    prepare_linear(m, data)
    np.testing.assert_allclose(m.slide_mean.numpy(), means.mean(0), rtol=1e-5)
    data.bags[data.splits["test"][0]][:] = before


def _cindex(model, data: CohortData, split: str) -> float:
    from pipeline.stats.metrics import harrell_cindex
    from pipeline.training.predict import predict

    idx = data.splits[split]
    return harrell_cindex(data.time[idx], data.event[idx], predict(model, data, idx).log_hz)


@pytest.mark.parametrize("federated", [False, True])
def test_linear_family_learns_the_slide_signal_centralised_and_federated(federated):
    from pipeline.federated.embedded import run_federated
    from pipeline.training.module import fit_local, new_model

    data = synthetic()
    ov = ["model.family=linear", "train.lr=0.05", "train.epochs=15", "train.batch_size=32",
          "federated.rounds=6", "federated.local_epochs=2"]  # fmt: skip
    cfg = resolve_config(None, ov)
    model = run_federated(data, cfg)[0] if federated else fit_local(data, cfg)[0].model
    assert isinstance(model, LinearSurvival)
    assert _cindex(model, data, "test") > 0.75  # the planted slide signal; noise inputs alone give ~0.5
    w = model.slide_linear.weight[0].detach().abs()
    assert int(w.argmax()) == 0 and float(model.slide_scale[0]) > 5  # feature 0, standardised from its scale
    assert float(new_model(data, cfg).slide_mean[0]) == pytest.approx(float(model.slide_mean[0]))


def test_model_file_round_trip_keeps_the_slide_standardisation(tmp_path):
    from data_specs.artifacts import FeatureAttrs, RunFiles
    from pipeline.training.bundle import load_bundle, save_bundle
    from pipeline.training.module import new_model
    from pipeline.training.predict import predict

    data = synthetic(n=60)
    data.feature_attrs = FeatureAttrs(encoder="enc", weights=None, feature_kind="imagenet", dim=D, tile_px=224,
                                      target_mpp=0.5)  # fmt: skip
    cfg = resolve_config(None, ["model.family=linear"], out=tmp_path)
    model = new_model(data, cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    path = RunFiles(root=tmp_path).model
    save_bundle(path, model, data, cfg, {"train_info": {"mode": "centralised"}})
    loaded, card = load_bundle(path)
    assert isinstance(loaded, LinearSurvival) and card.config.model.family == "linear"
    torch.testing.assert_close(loaded.slide_mean, model.slide_mean)
    torch.testing.assert_close(loaded.slide_scale, model.slide_scale)
    idx = np.arange(60)
    np.testing.assert_array_equal(predict(loaded, data, idx).log_hz, predict(model, data, idx).log_hz)
