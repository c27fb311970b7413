"""``model.skip=auto`` (the default): the fitted linear offset where it can run, the plain network otherwise.

Resolved once per run (``resolve_skip``) with the reason; the saved config and model file hold the value used; a
deployment resolves it to ``none``; DP, SecAgg+ and the NLL loss still run with the default config; the federated
linear baseline of a run with a fitted offset is that offset's fit, not a second one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from data_specs import load_cohort, resolve_config
from pipeline.training.module import model_kwargs, new_model
from pipeline.training.predict import predict
from pipeline.training.skip_auto import FITTED_RESIDUAL_PENALTY, resolve_skip
from tests.test_lifecycle import CONFIG, _deploy, cohort_path  # noqa: F401  (cohort_path: a fixture)
from tests.test_train import _cfg, _data

FED = ["federated.min_count=5", "federated.rounds=2", "federated.local_epochs=1"]


@pytest.fixture(scope="module")
def data():
    return _data(n=90)[0]


def _with_test(data, n_test: int = 20):
    """``data`` with its first ``n_test`` validation patients as test patients."""
    val = data.splits["val"]
    return replace(data, splits={**data.splits, "val": val[n_test:], "test": val[:n_test]})


@pytest.mark.parametrize("runtime", ["centralised", "embedded"])
def test_auto_is_fitted_where_the_offset_can_run_with_penalty_1(tmp_path, data, runtime, caplog):
    cfg = _cfg(tmp_path, "federated.enabled=" + str(runtime == "embedded").lower())
    assert cfg.model.skip == "auto" and cfg.train.residual_penalty == "auto"  # the defaults
    with caplog.at_level(logging.INFO, logger="pipeline.training.skip_auto"):
        got, rec = resolve_skip(cfg, data)
    assert got.model.skip == "fitted" and got.train.residual_penalty == FITTED_RESIDUAL_PENALTY == 1.0
    assert rec == {"requested": "auto", "used": "fitted", "reason": rec["reason"], "runtime": runtime,
                   "residual_penalty": 1.0}  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [f"model.skip=auto -> fitted: {rec['reason']}"]
    caplog.clear()
    again, rec2 = resolve_skip(got, data)  # a resolved config is returned as it is, silently
    assert again is got and rec2["reason"] == "set in the config" and not caplog.records
    assert got.with_overrides(["model.skip=auto"]).model.skip == "auto"  # only the two fields changed
    assert got.model_copy(update={"model": cfg.model, "train": cfg.train}) == cfg


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["train.loss=nll"], "train.loss=nll"),
        (["train.linear_fit=sgd"], "train.linear_fit=sgd"),
        (["federated.dp_noise=0.5"], "federated.dp_noise=0.5: .*no differential privacy"),
        (["federated.secagg=true"], "federated.secagg=true: .*not masked"),
        (["model.family=linear"], "model.family=linear"),
        (["federated.min_count=40"], "no site has enough non-test patients .*min_count=40.*a 45/"),
    ],
    ids=["nll", "sgd", "dp", "secagg", "linear_family", "small_sites"],
)
def test_auto_is_none_where_fitted_cannot_run_with_one_line_naming_why(tmp_path, data, overrides, reason, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.training.skip_auto"):
        got, rec = resolve_skip(_cfg(tmp_path, *overrides), data)
    assert got.model.skip == "none" and got.train.residual_penalty == 0.0
    assert rec["used"] == "none" and rec["requested"] == "auto"
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("model.skip=auto -> none: ")
    import re

    assert re.search(reason, rec["reason"]) and rec["reason"] in caplog.records[0].getMessage()


def test_centralised_dp_and_secagg_settings_do_not_apply_and_data_is_only_checked_federated(tmp_path, data):
    """DP and SecAgg+ protect federated messages only: a centralised run keeps fitted; the site-size rule is the
    federated fit's."""
    cfg = _cfg(tmp_path, "federated.enabled=false", "federated.dp_noise=0.5", "federated.min_count=40")
    assert resolve_skip(cfg, data)[0].model.skip == "fitted"
    assert resolve_skip(_cfg(tmp_path, "federated.min_count=40"))[0].model.skip == "fitted"  # no data: not checked


def test_explicit_values_are_kept_and_a_deployment_resolves_auto_to_none_and_refuses_fitted(tmp_path, data):
    for skip in ("none", "linear", "fitted"):
        got, rec = resolve_skip(_cfg(tmp_path, f"model.skip={skip}", "train.residual_penalty=3"), data)
        assert (got.model.skip, got.train.residual_penalty, rec["reason"]) == (skip, 3.0, "set in the config")
    assert resolve_skip(_cfg(tmp_path, "model.skip=linear"))[0].train.residual_penalty == 0.0  # auto: 0 unless fitted
    assert resolve_skip(_cfg(tmp_path, "model.skip=fitted"))[0].train.residual_penalty == 1.0
    got, rec = resolve_skip(_cfg(tmp_path), data, runtime="deployment")
    assert got.model.skip == "none" and "Flower deployment" in rec["reason"]
    with pytest.raises(ValueError, match="model.skip=fitted cannot run in a Flower deployment"):
        resolve_skip(_cfg(tmp_path, "model.skip=fitted"), runtime="deployment")
    with pytest.raises(ValueError, match="unknown runtime 'flower'"):
        resolve_skip(_cfg(tmp_path), runtime="flower")


def test_an_unresolved_auto_builds_the_plain_network(tmp_path, data):
    """Where no run resolved it (a deployment's ClientApp reads the run's YAML), auto cannot build an offset."""
    from pipeline.federated.site import site_clients

    cfg = _cfg(tmp_path, *FED)
    assert model_kwargs(cfg.model, cfg.train)["skip"] == "none"
    assert getattr(new_model(data, cfg), "offset", None) is None
    clients = site_clients(data, cfg)
    assert all(getattr(c.new_model(), "offset", None) is None for c in clients)


def test_a_deployment_with_the_default_config_trains_and_saves_the_plain_network(cohort_path, tmp_path):  # noqa: F811
    from data_specs.artifacts import RunFiles
    from pipeline.training.bundle import load_bundle

    rc = {k: v for k, v in CONFIG.items() if k != "model.skip"} | {"federated.rounds": 1}
    _deploy(cohort_path, tmp_path, rc)
    rf = RunFiles(root=tmp_path)
    model, card = load_bundle(rf.model)
    assert card.config.model.skip == "none" and getattr(model, "offset", None) is None
    assert card.config.train.residual_penalty == 0.0


def test_a_saved_auto_run_holds_the_resolved_value_and_predict_reproduces_its_risks(cohort_path, tmp_path):  # noqa: F811
    from data_specs.artifacts import RunFiles
    from pipeline.stages import stage_predict, stage_train
    from pipeline.training.bundle import load_bundle
    from pipeline.training.data import load_run_data
    from pipeline.training.module import fit_local

    cohort = load_cohort(cohort_path)
    ov = ["federated.enabled=false", "train.epochs=3", "train.batch_size=8", "model.clinical_hidden=4"]
    cfg = resolve_config(None, ov, out=tmp_path / "run").model_copy(update={"cohort": cohort_path})
    data, fdir = load_run_data(cohort, cfg), None
    rf = RunFiles(root=cfg.out)
    model_path = stage_train(cohort, cfg, progress=False, data=data)
    saved = resolve_config(rf.config)
    assert saved.model.skip == "fitted" and saved.train.residual_penalty == 1.0
    model, card = load_bundle(model_path)
    assert card.config.model.skip == "fitted" and getattr(model, "offset", None) is not None
    summary = json.loads(rf.train_summary.read_text())
    assert summary["model_skip"]["requested"] == "auto" and summary["model_skip"]["used"] == "fitted"
    assert card.train_info["model_skip"] == summary["model_skip"]
    risk = stage_predict(model_path, cohort, cfg.out, fdir, data=data)
    import pandas as pd

    table = pd.read_csv(risk).set_index("patient_id").loc[data.patient_ids]
    module, _ = fit_local(data, cfg)  # the same training, in memory (seeded, deterministic)
    want = predict(module.model.eval(), data, np.arange(len(data.patient_ids))).log_hz
    np.testing.assert_allclose(table.log_hz.to_numpy(), want, rtol=1e-5, atol=1e-6)
    from pipeline.outputs.model_card import model_card_html

    card_html = "".join(model_card_html(rf))
    assert "linear start (model.skip)" in card_html and "fitted: the fitted linear family" in card_html
    assert "auto: the fitted offset can run here" in card_html and "residual penalty 1" in card_html


def test_dp_secagg_and_nll_runs_with_the_default_config_still_run(tmp_path, data):
    from pipeline.federated.embedded import run_federated
    from pipeline.training.module import fit_local

    for extra in (["federated.dp_noise=0.3"], ["federated.secagg=true"]):
        model, info = run_federated(data, _cfg(tmp_path, *FED, *extra))
        assert getattr(model, "offset", None) is None and "offset_fit" not in info
        assert len(info["history"]) == 2
    module, info = fit_local(data, _cfg(tmp_path, "train.loss=nll", "train.n_bins=3", "train.epochs=2"))
    assert getattr(module.model, "offset", None) is None and "offset_fit" not in info


def test_the_federated_baseline_of_a_fitted_run_is_its_offset_not_a_second_fit(tmp_path, data, monkeypatch):
    from pipeline.federated import linear_sites
    from pipeline.federated.embedded import run_federated
    from pipeline.outputs import baselines as bl
    from pipeline.outputs import federated_linear as fl
    from pipeline.outputs.scoring import BaselineSettings
    from pipeline.training.bundle import save_bundle

    data, cfg, s = _with_test(data), _cfg(tmp_path, *FED), BaselineSettings(n_boot=0)
    resolved, rec = resolve_skip(cfg, data)
    model, info = run_federated(data, resolved)
    test = data.splits["test"]
    _, fresh_model, _, _ = fl._fit_cv(data, cfg, None)  # the baseline's own fit, done anew: the offset's
    np.testing.assert_array_equal(predict(fresh_model, data, test).log_hz, predict(model.offset, data, test).log_hz)
    fresh = fl.fit_federated_linear(data, cfg, settings=s)
    card = SimpleNamespace(config=resolved, train_info={"mode": "federated", "offset_fit": info["offset_fit"]})
    offset = fl.run_offset(model, card, cfg)
    assert offset is not None and offset[0] is model.offset

    def no_second_fit(*a, **k):
        raise AssertionError("the baseline was fitted again")

    with monkeypatch.context() as mp:
        mp.setattr(linear_sites, "fit_federated_cv", no_second_fit)
        reused = fl.fit_federated_linear(data, cfg, settings=s, offset=offset)
    assert "is this fit, reused" in reused["choice"] and reused["choice"].startswith(fresh["choice"])
    assert {k: v for k, v in reused.items() if k != "choice"} == {k: v for k, v in fresh.items() if k != "choice"}
    # other linear settings, a non-default penalty grid, or a centralised run: the baseline is fitted anew
    assert fl.run_offset(model, card, cfg.with_overrides(["train.linear_cv_folds=3"])) is None
    central = SimpleNamespace(config=resolved, train_info={**card.train_info, "mode": "centralised"})
    assert fl.run_offset(model, central, cfg) is None
    with monkeypatch.context() as mp:
        mp.setattr(fl, "GRID", (1.0,))
        assert fl.run_offset(model, card, cfg) is None
    # add_to_run takes it from the run's model file; metrics.json says which model.skip was used and why
    save_bundle(tmp_path / "model.safetensors", model, data, resolved,
                {"train_info": {"mode": "federated", **info, "model_skip": rec}})  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps({"split": "test"}))
    with monkeypatch.context() as mp:
        mp.setattr(linear_sites, "fit_federated_cv", no_second_fit)
        bl.add_to_run(tmp_path, data, lambda d, i: predict(model, d, i).log_hz, n_boot=0, cfg=cfg)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["model_skip"] == rec
    got = m["baselines"]["federated_linear"]
    assert got["cindex"] == fresh["cindex"] and got["weight_decay"] == fresh["weight_decay"]
    assert "reused" in got["choice"] and not (tmp_path / "federated_linear").exists()
