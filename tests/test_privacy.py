"""What leaves a site and what the consortium keeps: the privacy ledger and the model file (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_specs import load_cohort, resolve_config
from pipeline.federated.embedded import run_embedded, run_federated
from pipeline.federated.ledger import MessageLedger, check_no_values, read_ledger
from pipeline.federated.protocol import trainable_arrays
from pipeline.federated.server import FederatedServer
from pipeline.federated.site import site_clients
from pipeline.training.module import new_model


def _cfg(cfg, *ov):
    return resolve_config(None, ["train.batch_size=4", "train.max_tiles=8", *ov], out=cfg.out)


def _content_keys(msg) -> dict[str, set[str]]:
    c = msg.content
    recs = {**dict(c.array_records), **dict(c.metric_records), **dict(c.config_records)}
    return {name: set(rec.keys()) for name, rec in recs.items()}


@pytest.mark.parametrize("extra", [(), ("federated.secagg=true",)], ids=["plain", "secagg"])
def test_every_reply_a_site_sends_has_its_ledger_line_and_no_line_holds_a_value(fed_data, tmp_path, extra):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=2", "federated.local_epochs=1", *extra)
    clients = site_clients(data, cfg)
    server = FederatedServer(cfg, trainable_arrays(new_model(data, cfg)))
    path = tmp_path / "privacy_ledger.jsonl"
    grids: list = []
    run_embedded(clients, server, grid_out=grids, ledger=MessageLedger(path))
    lines = list(read_ledger(path))
    for line in lines:
        check_no_values(line)  # shapes, dtypes, types, lengths: never a float
    by_id = {(x["site"], x["reply_to"]): x for x in lines}
    sent = grids[0].sent
    assert sent and len(by_id) == len(lines) == len(sent)  # one line per reply, none extra
    phases = set()
    for site, msg in sent:
        line = by_id[(site, msg.metadata.reply_to_message_id)]
        assert {k: set(v["keys"]) for k, v in line["records"].items()} == _content_keys(msg)
        phases.add(line["phase"])
        if line["phase"] in ("train", "evaluate"):
            assert line["round"] in (0, 1) or line["group"] in ("1", "2")  # absolute round, else Flower's
    want = (
        {"train", "evaluate"}
        if not extra
        else {"evaluate"} | {f"train.secagg.{s}" for s in ("setup", "share_keys", "collect_masked_vectors", "unmask")}
    )
    assert phases == want
    arrays = [r for x in lines for r in x["records"].values() if r["kind"] == "arrays" and r["keys"]]
    if not extra:
        assert arrays and all(d["dtype"] == "float32" for r in arrays for d in r["keys"].values())
    else:
        assert not arrays  # SecAgg+: masked integer vectors only, never a plain array


def test_a_trained_run_folder_holds_the_ledger(fed_data, tmp_path):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1").model_copy(update={"out": tmp_path})
    run_federated(data, cfg, out=tmp_path / "federated")
    lines = list(read_ledger(tmp_path / "privacy_ledger.jsonl"))
    assert {x["site"] for x in lines} == set(data.sites) & {c.site for c in site_clients(data, cfg)}
    assert all(x["phase"] in ("train", "evaluate") for x in lines)


def test_ledger_refuses_a_value():
    led = MessageLedger()
    with pytest.raises(ValueError, match="float"):
        led.record({"phase": "train", "records": {"m": {"keys": {"loss": 0.25}}}})
    led.record({"phase": "train", "group": "1", "records": {}})
    assert json.dumps(led.lines)


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_model_file_holds_no_patient_id_and_no_training_event_time(fed_data, tiny_features, tmp_path):
    from safetensors import safe_open

    from pipeline.outputs.predictions import survival_curves
    from pipeline.stages import survival_summary
    from pipeline.training.bundle import CARD_KEY, data_for_model, load_bundle, save_bundle
    from pipeline.training.predict import predict

    data, base = fed_data
    cohort_path, _, fdir = tiny_features
    cfg = _cfg(base)
    model = new_model(data, cfg).eval()
    path = tmp_path / "model.safetensors"
    save_bundle(path, model, data, cfg, {"train_info": {"mode": "centralised"}, **survival_summary(model, data)})
    with safe_open(str(path), "np") as f:
        raw = f.metadata()[CARD_KEY]
    for pid in data.patient_ids:
        assert pid not in raw, pid
    tr = data.splits["train"]
    times = {float(t) for t in data.time[tr]}  # event and censoring times of every training patient
    leaked = sorted(times & set(_numbers(json.loads(raw))))
    assert not leaked, f"training times in the model file: {leaked}"

    # prediction on the same cohort re-derives the training splits and still gives survival curves
    model2, card = load_bundle(path)
    assert card.baseline is not None and len(card.baseline["grid"]) == 40 and not card.splits
    data2 = data_for_model(load_cohort(cohort_path), card, fdir)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(data2.splits[s], data.splits[s])
    idx = np.arange(len(data2.patient_ids))
    pred = predict(model2, data2, idx)
    times_out, surv = survival_curves(pred, card.baseline, [data2.sites[k] for k in data2.site[idx]])
    assert surv.shape == (len(idx), len(times_out)) and np.all(np.diff(surv, axis=1) <= 1e-12)
    assert np.all((surv >= 0) & (surv <= 1)) and surv[:, -1].max() < 1


def test_model_card_refuses_patient_ids(fed_data):
    from pipeline.training.bundle import make_card

    data, base = fed_data
    cfg = _cfg(base)
    with pytest.raises(ValueError, match="patient ids"):
        make_card(new_model(data, cfg).eval(), data, cfg, splits={data.patient_ids[0]: "train"})


def test_under_dp_a_site_with_too_few_validation_events_sends_no_validation_metrics(fed_data, caplog):
    from dataclasses import replace

    from pipeline.federated.policy import check_evaluate_reply

    data, base = fed_data
    for extra, suppressed in ((("federated.dp_noise=0.5",), True), ((), False)):
        c = next(c for c in site_clients(data, _cfg(base, *extra)) if len(c.val_idx))
        f = c.facts()
        c._facts = replace(f, min_count=f.n_val_events + 1)  # the site now has one event fewer than k
        caplog.clear()
        ev = c.evaluate(c.initial_arrays(), {"round": 0})
        assert ev.num_examples == len(c.val_idx)
        check_evaluate_reply(c.facts(), ev.num_examples, {**ev.metrics, "site": c.site})  # the policy accepts it
        if suppressed:
            assert ev.metrics == {}
            assert any(c.site in r.getMessage() and "suppressed" in r.getMessage() for r in caplog.records)
        else:
            assert {"cindex", "concordant", "comparable", "loss_sum", "events"} <= set(ev.metrics)
