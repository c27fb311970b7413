from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub look-up in tests

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 12-patient demo cohort (real tissue, planted truth), built once per test session."""
    from pipeline.cohorts.demo import DemoSize, build_demo

    return build_demo(
        tmp_path_factory.mktemp("demo") / "cohort", DemoSize(patients=12, cols=5, rows=4, genes=40), seed=3
    )


@pytest.fixture(scope="session")
def tiny_features(tiny_demo, tmp_path_factory):
    """Features for the tiny demo with the real ImageNet encoder: (cohort path, run config, features dir)."""
    from data_specs import load_cohort, resolve_config
    from pipeline.slides.features import features_dir
    from pipeline.stages import stage_extract

    out = tmp_path_factory.mktemp("run")
    cfg = resolve_config(None, ["extract.batch_size=32"], out=out)
    stage_extract(load_cohort(tiny_demo), cfg, progress=False)
    return tiny_demo, cfg, features_dir(out, cfg.extract)


@pytest.fixture(scope="session")
def he_rgb():
    """Real carcinoma H&E on a near-white canvas (background on the right and bottom): ``[896, 1120, 3]`` uint8."""
    from importlib import resources

    import numpy as np
    from PIL import Image

    assets = Path(str(resources.files("pipeline.cohorts.demo_assets")))
    he = np.asarray(Image.open(assets / "tumor_target_he.png").convert("RGB"))[:672, :672]
    canvas = np.full((896, 1120, 3), 243, np.uint8)
    canvas[:672, :672] = he
    canvas.setflags(write=False)  # shared by every test of the session: copy before changing it
    return canvas


@pytest.fixture(scope="module")
def fed_data(tiny_features):
    """The tiny demo cohort built as one CohortData (all sites), with its run config."""
    from data_specs import load_cohort
    from pipeline.training.data import build_data

    cohort_path, cfg, fdir = tiny_features
    return build_data(load_cohort(cohort_path), fdir, seed=0), cfg
