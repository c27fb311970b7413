"""The model file: safetensors + JSON card round trip, pickles refused unexecuted, tampering and truncation named."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from data_specs.artifacts import FeatureAttrs, ModelCard, RunFiles
from data_specs.config import ConfigError, resolve_config
from pipeline.training.bundle import ModelFileError, PickleModelError, load_bundle, read_card, save_bundle
from pipeline.training.data import CohortData
from pipeline.training.module import new_model
from pipeline.training.predict import predict


def _data(n: int = 24, d: int = 5, g: int = 3) -> CohortData:
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(int(rng.integers(1, 7)), d)).astype(np.float32) for _ in range(n)]
    idx = rng.permutation(n)
    return CohortData(
        [f"P{i:02d}" for i in range(n)],
        ["a", "b"],
        np.arange(n) % 2,
        rng.exponential(1.0, n).astype(np.float32),
        rng.random(n) < 0.6,
        {"train": np.sort(idx[:16]), "val": np.sort(idx[16:]), "test": np.zeros(0, int)},
        bags=bags,
        tiles=[[("s", 0, 0)] * len(b) for b in bags],
        feature_dim=d,
        feature_attrs=FeatureAttrs(
            encoder="enc", weights=None, feature_kind="imagenet", dim=d, tile_px=224, target_mpp=0.5
        ),  # fmt: skip
        omics=rng.normal(size=(n, g)).astype(np.float32),
        omics_present=np.ones(n, bool),
        genes=[f"G{k}" for k in range(g)],
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, CohortData, np.ndarray]:
    tmp = tmp_path_factory.mktemp("bundle")
    data = _data()
    cfg = resolve_config(None, ["model.hidden=8", "model.omics_hidden=8", "train.loss=nll", "train.n_bins=3"], out=tmp)
    model = new_model(data, cfg).eval()
    path = RunFiles(root=tmp).model
    save_bundle(path, model, data, cfg, {"train_info": {"mode": "centralised"}})
    return path, data, predict(model, data, np.arange(24), attention=True).log_hz


def test_round_trip_gives_identical_predictions_and_the_card(saved):
    path, data, lh = saved
    assert path.name == "model.safetensors" and not list(path.parent.glob(".*.tmp"))
    model, card = load_bundle(path)
    pred = predict(model, data, np.arange(24), attention=True)
    np.testing.assert_array_equal(pred.log_hz, lh)  # bit-identical
    assert pred.attn is not None and [len(a) for a in pred.attn] == [len(b) for b in data.bags]
    assert isinstance(card, ModelCard) and card.config.train.n_bins == 3 and card.features == data.feature_attrs
    assert not card.splits and len(card.split_digest) == 64 and card.train_info == {"mode": "centralised"}
    assert card.time_bins is not None and len(card.time_bins) == 4
    assert read_card(path) == card


class _Payload:
    """Unpickling this writes the marker file: the proof that a pickle ran code."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    _Payload.marker = str(marker)
    for name, data in (("model.pt", pickle.dumps(_Payload(), protocol=2)), ("zip.pt", None)):
        path = tmp_path / name
        if data is None:
            import torch

            torch.save({"x": _Payload()}, path)  # torch's zip container, pickle inside
        else:
            path.write_bytes(data)
        with pytest.raises(PickleModelError, match=str(path)):
            load_bundle(path)
        with pytest.raises(PickleModelError):
            read_card(path)
    assert not marker.exists()


def test_truncated_file_names_the_path(saved, tmp_path):
    path, _, _ = saved
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match=str(bad)):
            load_bundle(bad)


def test_tampered_weights_are_caught(saved, tmp_path):
    path, _, _ = saved
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last tensor's data
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=rf"{bad}.*SHA-256"):
        load_bundle(bad)


def test_a_file_that_is_not_a_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    junk = tmp_path / "notes.txt"
    junk.write_text("hello, this is not a model file at all")
    with pytest.raises(ModelFileError, match=str(junk)):
        load_bundle(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match="without a histofuse model card"):
        load_bundle(plain)


def test_with_overrides_keeps_every_other_section(tmp_path):
    cfg = resolve_config(None, ["train.epochs=7", "model.hidden=32", "evaluate.bootstrap=5"], out=tmp_path)
    new = cfg.with_overrides(["evaluate.risk_groups=tertiles", "attribute.ig_steps=4"])
    assert new.evaluate.risk_groups == "tertiles" and new.evaluate.bootstrap == 5 and new.attribute.ig_steps == 4
    assert new.train.epochs == 7 and new.model.hidden == 32 and new.out == tmp_path
    assert cfg.evaluate.risk_groups == "median"  # frozen: the original is unchanged
    assert cfg.with_overrides([]) is cfg
    with pytest.raises(ConfigError, match="evaluate.risk_groups"):
        cfg.with_overrides(["evaluate.risk_groups=quartiles"])
    with pytest.raises(ConfigError, match="section.key=value"):
        cfg.with_overrides(["evaluate"])


def test_feature_attrs_from_h5_attrs_keeps_what_it_knows():
    raw = {"encoder": "e", "weights": None, "feature_kind": "k", "dim": 4, "tile_px": 224, "target_mpp": 0.5,
           "size0": 448, "complete": True}  # fmt: skip
    a = FeatureAttrs.from_h5_attrs(raw)
    assert a.identity() == {"encoder": "e", "weights": None, "tile_px": 224, "target_mpp": 0.5}
    with pytest.raises(ValueError, match="dim"):
        FeatureAttrs.from_h5_attrs({**raw, "dim": -1})


def test_weights_of_another_shape_are_caught(saved, tmp_path):
    """A file whose tensors were swapped for others (same names, other shapes) under the original card."""
    import json

    import torch
    from safetensors.torch import load_file, save

    path, _, _ = saved
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    state = load_file(path)
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    bad = tmp_path / "swapped.safetensors"
    bad.write_bytes(save(state, metadata=meta))
    with pytest.raises(ModelFileError, match=rf"{bad}.*shapes"):
        load_bundle(bad)


def test_a_model_file_whose_header_length_starts_with_a_pickle_byte_loads(tmp_path):
    """safetensors starts with its header length: when its low byte is 0x80 (a pickle's first byte), still a model."""
    data = _data()
    cfg = resolve_config(None, ["model.hidden=8", "model.omics_hidden=8"], out=tmp_path)
    model = new_model(data, cfg).eval()
    path = tmp_path / "model.safetensors"
    for k in range(0, 512, 8):  # the header is padded to 8 bytes: one of these lengths is 128 mod 256
        save_bundle(path, model, data, cfg, {"train_info": {"mode": "centralised", "pad": "x" * k}})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    loaded, card = load_bundle(path)
    assert card.train_info["pad"] == "x" * k
