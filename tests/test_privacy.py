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

TINY = ["federated.min_count=2"]  # the 12-patient fixture's sites have 2 training patients (default k is 10)


def _cfg(cfg, *ov):
    return resolve_config(None, ["train.batch_size=4", "train.max_tiles=8", *TINY, *ov], out=cfg.out)


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
        else {
            f"{p}.secagg.{s}"
            for p in ("train", "evaluate")
            for s in ("setup", "share_keys", "collect_masked_vectors", "unmask")
        }  # fmt: skip
    )
    assert phases == want
    arrays = [r for x in lines for r in x["records"].values() if r["kind"] == "arrays" and r["keys"]]
    if not extra:
        assert arrays and all(d["dtype"] == "float32" for r in arrays for d in r["keys"].values())
    else:
        assert not arrays  # SecAgg+: masked integer vectors only, never a plain array


def test_a_trained_run_folder_holds_the_ledger(fed_data, tmp_path):
    data, base = fed_data
    cfg = _cfg(base, "federated.rounds=1", "federated.local_epochs=1", "model.skip=none")
    cfg = cfg.model_copy(update={"out": tmp_path})
    run_federated(data, cfg, out=tmp_path / "federated")
    lines = list(read_ledger(tmp_path / "privacy_ledger.jsonl"))
    assert {x["site"] for x in lines} == set(data.sites) & {c.site for c in site_clients(data, cfg)}
    assert all(x["phase"] in ("train", "evaluate") or x["phase"].startswith(("statistics.", "finish.")) for x in lines)


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


def test_model_file_holds_no_patient_id_and_no_training_event_time(fed_data, tiny_features, tmp_path, monkeypatch):
    from safetensors import safe_open

    from pipeline.outputs.predictions import survival_curves
    from pipeline.stages import survival_summary
    from pipeline.training import survival_summary as summary_module
    from pipeline.training.bundle import CARD_KEY, data_for_model, load_bundle, save_bundle
    from pipeline.training.predict import predict

    data, base = fed_data
    cohort_path, _, fdir = tiny_features
    cfg = _cfg(base)
    model = new_model(data, cfg).eval()
    path = tmp_path / "model.safetensors"
    # the fixture's sites have 1-2 training events: under the baseline's k = 10 none sends a summary (no
    # baseline, warned); with k = 2 they do, so the curves below are not trivial
    assert "baseline" not in survival_summary(model, data)
    monkeypatch.setattr(summary_module, "MIN_SITE_EVENTS", 2)
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


def test_a_site_with_fewer_than_k_validation_patients_or_events_sends_no_validation_metrics(fed_data, caplog):
    """The minimum-count rule on evaluate replies, with or without DP; the policy refuses metrics under k."""
    from dataclasses import replace

    from pipeline.federated.policy import DisclosureError, check_evaluate_reply

    data, base = fed_data
    c = next(c for c in site_clients(data, _cfg(base)) if len(c.val_idx) and c.facts().n_val_events)
    f = c.facts()
    for extra, k, suppressed in (((), f.n_val_events + 1, True), (("federated.dp_noise=0.5",), f.n_val_events + 1,
                                 True), ((), min(f.n_val, f.n_val_events), False)):  # fmt: skip
        c.cfg = _cfg(base, *extra)
        c._facts = replace(f, min_count=k, eval_metrics=not extra)
        caplog.clear()
        ev = c.evaluate(c.initial_arrays(), {"round": 0})
        # the patient count travels only when it is at least k, and never under DP
        assert ev.num_examples == (len(c.val_idx) if len(c.val_idx) >= k and not extra else 0)
        check_evaluate_reply(c.facts(), ev.num_examples, {**ev.metrics, "site": c.site})  # the policy accepts it
        if suppressed:
            assert ev.metrics == {}
            c._warned_small_val = False
        else:
            assert {"cindex", "concordant", "comparable", "loss_sum", "events"} <= set(ev.metrics)
            # the same metrics from a site one event short of k are refused by the policy
            with pytest.raises(DisclosureError, match="fewer than the minimum count"):
                check_evaluate_reply(replace(f, min_count=k + 1), 0, ev.metrics)
    c._facts = replace(f, min_count=f.n_val_events + 1)
    caplog.clear()
    c.evaluate(c.initial_arrays(), {"round": 0})
    assert any(c.site in r.getMessage() and "suppressed" in r.getMessage() for r in caplog.records)


def _site_clinical(n_rare: int = 3):
    """One site's clinical table: 30 patients, a 3-category column (20/7/n_rare), a column with one patient in
    its second category, a 0/1 column with a single 1, a numeric column and a column missing for 2 patients."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 30
    return pd.DataFrame(
        {
            "grade": ["a"] * 20 + ["b"] * (n - 20 - n_rare) + ["c"] * n_rare,
            "stage": ["x"] * (n - 1) + ["y"],
            "brca1": [1.0] + [0.0] * (n - 1),
            "age": rng.normal(60, 10, n),
            "er": ["pos"] * 18 + ["neg"] * 10 + [None] * 2,
        },
        index=[f"P{i}" for i in range(n)],
    )


def test_site_summary_cells_under_k_are_suppressed_with_a_warning_and_the_policy_refuses_them(caplog):
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_summaries
    from pipeline.omics.normalise import site_summaries

    df = _site_clinical()
    ids = list(df.index)
    facts = SiteFacts("hosp_a", len(ids), 0, 0, 0, (), 10)
    raw = site_summaries("hosp_a", ids, clinical=df)["clinical"]  # a centralised run: nothing suppressed
    assert raw.categorical["grade"]["c"] == 3 and raw.categorical["stage"]["y"] == 1
    with pytest.raises(DisclosureError, match="fewer than 10 patients"):
        check_summaries(facts, {"clinical": raw.to_wire()})
    caplog.clear()
    s = site_summaries("hosp_a", ids, clinical=df, min_count=10)["clinical"]
    check_summaries(facts, {"clinical": s.to_wire()})  # what the site sends passes the policy
    # grade: b (7) and c (3) suppressed together (10 >= k); stage: y (1) alone would follow from x = n - 1, so
    # x is suppressed too; er: the 2 missing + the next smallest (neg, 10) so the suppressed total is >= k
    assert s.categorical["grade"] == {"a": 20}
    assert s.categorical["stage"] == {}
    assert s.categorical["er"] == {"pos": 18} and s.missing["er"] == 0
    num = dict(zip(s.numeric.columns, zip(s.numeric.n, s.numeric.sum, strict=True), strict=True))
    assert num["brca1"] == (0, 0.0)  # a 0/1 column with one 1: its count of ones is a cell of 1
    assert num["age"][0] == 30 and num["age"][1] == pytest.approx(df["age"].sum())
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "site hosp_a" in text and "grade[c]" in text and "stage[y]" in text and "brca1" in text


def test_a_site_of_5_patients_sends_no_summary_and_no_update(caplog):
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_fit_reply, check_summaries
    from pipeline.omics.normalise import site_summaries

    df = _site_clinical().iloc[:5]
    caplog.clear()
    assert site_summaries("tiny_site", list(df.index), clinical=df, min_count=10) == {}
    assert any("tiny_site" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    wire = site_summaries("tiny_site", list(df.index), clinical=df)["clinical"].to_wire()
    facts = SiteFacts("tiny_site", 5, 2, 0, 0, ((3,),), 10)
    with pytest.raises(DisclosureError, match="n_patients"):
        check_summaries(facts, {"clinical": wire})
    for weight in (5, 1):  # plain, and DP's weight 1: an update over 5 patients does not leave either way
        with pytest.raises(DisclosureError, match="5 training patients, fewer than the minimum count 10"):
            check_fit_reply(facts, weight, {}, [(3,)])
    with pytest.raises(DisclosureError, match="train_events"):  # 12 patients but 2 events: no event count
        check_fit_reply(SiteFacts("s", 12, 2, 0, 0, ((3,),), 10), 12, {"train_events": 2.0}, [(3,)])


def test_sites_under_k_training_patients_are_left_out_of_the_federation(fed_data, caplog):
    data, base = fed_data
    tr = data.subset_sites(data.splits["train"])
    k = max(len(v) for v in tr.values())
    caplog.clear()
    kept = [c.site for c in site_clients(data, _cfg(base, f"federated.min_count={k}"))]
    assert kept == [s for s in data.sites if len(tr[s]) >= k] and len(kept) < len(data.sites)
    left = [s for s in data.sites if 0 < len(tr[s]) < k]
    assert all(any(s in r.getMessage() and "left out" in r.getMessage() for r in caplog.records) for s in left)
    with pytest.raises(ValueError, match=f"no site has federated.min_count={k + 1} training patients"):
        site_clients(data, _cfg(base, f"federated.min_count={k + 1}"))


@pytest.mark.parametrize("loss", ["cox", "nll"])
def test_a_federated_model_file_holds_no_training_time_and_no_patient_risk(fed_data, tmp_path, loss):
    """Cut-points from summed site histograms of log hazards, discrete-time bins from summed site histograms
    of event times ending at the rounded-up follow-up: no number in the card is a training patient's time or
    log hazard."""
    from safetensors import safe_open

    from pipeline.stages import survival_summary
    from pipeline.training.bundle import CARD_KEY, save_bundle
    from pipeline.training.predict import predict

    data, base = fed_data
    cfg = _cfg(base, f"train.loss={loss}", "train.n_bins=3", "federated.rounds=1", "federated.local_epochs=1")
    model, info = run_federated(data, cfg)
    path = tmp_path / "model.safetensors"
    save_bundle(path, model, data, cfg, {"train_info": info, **survival_summary(model, data)})
    with safe_open(str(path), "np") as f:
        card = json.loads(f.metadata()[CARD_KEY])
    numbers = np.array(sorted(set(_numbers(card))), float)
    tr = data.splits["train"]
    times = {float(t) for t in data.time[tr]}
    assert not sorted(times & set(numbers)), "training times in the model file"
    lh = predict(model, data, tr).log_hz.astype(float)
    near = [x for x in lh if np.any(np.abs(numbers - x) < 1e-7)]
    assert not near, f"training log hazards in the model file: {near}"
    if loss == "nll":
        edges = card["time_bins"]
        assert len(edges) == 4 and edges[0] == 0.0 and edges[-1] > edges[-2]
    cut = card["cutpoints"]
    assert min(lh) <= cut["median"] <= max(lh) and cut["tertiles"][0] <= cut["median"] <= cut["tertiles"][1]


def test_histogram_quantiles_merge_small_bins_and_match_pooled_quantiles():
    from pipeline.stats.curves import RISK_EDGES, histogram_quantiles, pooled_histogram, site_histogram

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 600)
    site = rng.integers(0, 3, 600)
    h = site_histogram(x[site == 0], RISK_EDGES, 10)
    assert h.sum() == (site == 0).sum() and not np.any((h > 0) & (h < 10))
    assert np.array_equal(site_histogram(x[:7], RISK_EDGES, 10), np.zeros(len(RISK_EDGES) - 1))  # 7 < k: nothing
    q = histogram_quantiles(RISK_EDGES, pooled_histogram(x, site, RISK_EDGES, 10), [1 / 3, 0.5, 2 / 3])
    np.testing.assert_allclose(q, np.quantile(x, [1 / 3, 0.5, 2 / 3]), atol=0.1)  # within a merged bin
    # empty bins between filled ones: quantiles stay inside the filled bins (linear within each)
    np.testing.assert_allclose(histogram_quantiles(np.arange(6.0), [0, 0, 4, 0, 4], [0, 0.25, 0.5, 0.75, 1]),
                               [2.0, 2.5, 3.0, 4.5, 5.0])  # fmt: skip


def test_the_report_shows_the_ledger_by_phase_and_site(tmp_path):
    from pipeline.outputs.report import build_report

    ledger = MessageLedger(tmp_path / "privacy_ledger.jsonl")
    arrays = {"fitres.parameters": {"kind": "arrays", "keys": {"0": {"shape": [3], "dtype": "float32", "bytes": 12}}}}
    metrics = {"evaluateres.metrics": {"kind": "metrics", "keys": {"cindex": {"type": "float"}}}}
    for rnd in (0, 1):
        for site in ("north", "south"):
            ledger.record({"phase": "train", "group": str(rnd), "round": rnd, "site": site, "records": arrays})
            ledger.record({"phase": "evaluate", "group": str(rnd), "round": rnd, "site": site, "records": metrics})
    ledger.record({"phase": "evaluate", "group": "1", "round": 1, "site": "south", "error": "DisclosureError"})
    ledger.flush()
    (tmp_path / "config.yaml").write_text("federated:\n  min_count: 10\n  secagg: true\n")
    page = build_report(tmp_path).read_text()
    assert "What left each site (privacy ledger)" in page and "minimum count k = 10" in page and "SecAgg+ on" in page
    section = page.split("What left each site")[1]
    for text in ("fitres.parameters[1 arrays]", "evaluateres.metrics.cindex", "0-1", "north", "south"):
        assert text in section, text
    import pandas as pd

    from pipeline.outputs.privacy_report import ledger_table

    t = ledger_table(list(read_ledger(tmp_path / "privacy_ledger.jsonl"))).set_index(["phase", "site"])
    assert t.loc[("evaluate", "south"), "refused"] == 1 and t.loc[("evaluate", "south"), "replies"] == 3
    assert t.loc[("train", "north"), "array bytes"] == 24 and isinstance(t, pd.DataFrame)


def test_local_dp_noises_each_update_at_the_site_and_the_server_adds_none(fed_data):
    from pipeline.federated.protocol import Update, clip_l2

    data, base = fed_data
    sigma, clip = 0.7, 0.05
    dp = ("federated.dp_noise=0.7", "federated.dp_clip=0.05", "federated.rounds=1", "federated.local_epochs=1")
    local = _cfg(base, *dp, "federated.dp_local=true")
    c = site_clients(data, local)[0]
    server = FederatedServer(local, c.initial_arrays())
    config = server.fit_config(0)
    assert config["dp_local_std"] == pytest.approx(sigma * 2 * clip)
    noised = c.fit(c.initial_arrays(), config)
    plain = c.fit(c.initial_arrays(), {**config, "dp_local_std": 0.0})  # same seed: the clipped update itself
    resid = np.concatenate([(noised.arrays[k] - plain.arrays[k]).ravel() for k in plain.arrays])
    assert noised.num_examples == 1 and noised.metrics == {}
    assert resid.std() == pytest.approx(sigma * 2 * clip, rel=0.1) and abs(resid.mean()) < 0.01
    # the server adds nothing on top: its step is the optimizer on the plain mean of what the sites sent
    ups = [Update(clip_l2({k: np.full_like(v, 0.01) for k, v in plain.arrays.items()}, clip)[0], 1) for _ in range(3)]
    ref = FederatedServer(_cfg(base, "federated.rounds=1"), c.initial_arrays())  # no DP at all
    got = server.aggregate(0, ups, [])
    want = ref.aggregate(0, ups, [])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    central = FederatedServer(_cfg(base, *dp), c.initial_arrays())
    assert central.fit_config(0)["dp_local_std"] == 0.0
    assert any(not np.array_equal(central.aggregate(0, ups, [])[k], want[k]) for k in want)


def test_a_patient_time_smuggled_in_a_histogram_or_a_follow_up_ceiling_is_refused():
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_follow_up, check_histogram

    facts = SiteFacts("s", 40, 12, 0, 0, (), 10)
    check_histogram(facts, "histogram.counts", [0, 10, 0, 2 + 10, 0], 12 + 10)
    for counts, what in (([0, 3, 9], "fewer than 10"), ([0, 12.5], "not a histogram"), ([20, 20], "not a histogram")):
        with pytest.raises(DisclosureError, match=what):
            check_histogram(facts, "histogram.counts", counts, 12)
    check_follow_up(facts, 3700.0)
    check_follow_up(facts, 0.0)
    with pytest.raises(DisclosureError, match="two significant digits"):
        check_follow_up(facts, 3652.25)  # an exact time instead of the rounded k-th largest follow-up


@pytest.mark.parametrize(
    "n, shares, threshold, want",
    [(3, None, None, (3, 2)), (6, None, None, (6, 4)), (10, None, None, (10, 6)), (6, 3, None, (3, 2)),
     (6, None, 5, (6, 5)), (2, None, None, (2, 2))],
)  # fmt: skip
def test_secagg_default_threshold_is_a_strict_majority_of_every_site(n, shares, threshold, want):
    from pipeline.federated.server_app import secagg_shares_threshold

    got = secagg_shares_threshold(shares, threshold, n)
    assert got == want
    s, t = got
    if shares is None and threshold is None and n > 2:
        assert t > s / 2 and t < s  # colluders need more than half of the shares; a dropout is tolerated


def test_a_column_suppressed_at_every_site_is_left_out_not_fatal(caplog):
    from pipeline.omics.normalise import fit_normalisers, site_summaries

    sites = []
    for k in range(3):  # three sites of 30, each with 3 patients carrying a rare 0/1 marker: 9 in all, 3 a site
        df = _site_clinical(n_rare=3 + k).drop(columns=["stage"])
        df["rare"] = [1.0] * 3 + [0.0] * (len(df) - 3)
        df.index = [f"S{k}-{i}" for i in range(len(df))]
        sites.append(site_summaries(f"site{k}", list(df.index), clinical=df, min_count=10))
    caplog.clear()
    _, norm = fit_normalisers(sites)
    assert "rare" not in norm.numeric and "brca1" not in norm.numeric and "age" in norm.numeric
    assert any("rare" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_risk_cutpoints_from_merged_histograms_fit_any_offset_and_scale():
    """A Cox log hazard can sit anywhere (here mean 10, sd 0.2, beyond the fixed grid); with k = 10 and
    ~24 training patients per site the median cut-point still splits the training patients about in half."""
    from pipeline.stats.curves import risk_cutpoints

    rng = np.random.default_rng(1)
    for loc, scale in ((10.0, 0.2), (-30.0, 5.0), (0.0, 1.0)):
        lh = rng.normal(loc, scale, 72)
        site = np.repeat(["a", "b", "c"], 24)
        cut = risk_cutpoints(lh, site, 10)
        assert 0.35 <= (lh > cut["median"]).mean() <= 0.65, (loc, scale, (lh > cut["median"]).mean())
        lo, hi = cut["tertiles"]
        assert lo < cut["median"] < hi


def test_a_merged_run_is_reported_at_its_middle_patient():
    from pipeline.stats.curves import site_histogram

    edges = np.arange(11.0)
    values = np.array([0.5] * 2 + [3.5] * 5 + [6.5] * 3)  # one run of 10 over bins 0..6 (the last run)
    h = site_histogram(values, edges, 10)
    assert h.sum() == 10 and h[3] == 10  # the 5th/6th patients are in bin 3, not the run's end bin 9


@pytest.mark.parametrize(
    "extra, sent",
    [
        (("federated.dp_noise=0.5",), False),
        (("federated.secagg=true",), False),
        (("federated.secagg=true", "federated.secagg_eval_plain=true"), True),
        ((), True),
    ],
    ids=["dp", "secagg", "secagg_eval_plain", "plain"],
)
def test_dp_and_secagg_sites_send_no_evaluation_metric_unless_asked(fed_data, caplog, extra, sent):
    """Evaluation replies are covered neither by the DP accountant nor by the SecAgg+ masks: under DP none
    is sent; under SecAgg+ none unless federated.secagg_eval_plain. The policy refuses a reply that sends one."""
    from dataclasses import replace

    from pipeline.federated.policy import DisclosureError, check_evaluate_reply

    data, base = fed_data
    c = next(c for c in site_clients(data, _cfg(base)) if len(c.val_idx) and c.facts().n_val_events)
    k = min(c.facts().n_val, c.facts().n_val_events)  # a k the site's validation passes: only the mode decides
    c.cfg, c._facts = _cfg(base, *extra), None  # the site's facts follow its config
    c._facts = replace(c.facts(), min_count=k)
    caplog.clear()
    ev = c.evaluate(c.initial_arrays(), {"round": 0})
    check_evaluate_reply(c.facts(), ev.num_examples, {**ev.metrics, "site": c.site})
    if sent:
        assert {"cindex", "concordant", "comparable", "loss_sum", "events"} <= set(ev.metrics)
        assert ev.num_examples == len(c.val_idx)
        return
    assert ev.metrics == {} and ev.num_examples == 0
    assert any(c.site in r.getMessage() and "not sent" in r.getMessage() for r in caplog.records)
    # a modified site that sends them anyway (or its count) is stopped by the policy
    plain = site_clients(data, _cfg(base))[0]
    plain.val_idx, plain._facts = c.val_idx, replace(c.facts(), eval_metrics=True)
    m = plain.evaluate(plain.initial_arrays(), {"round": 0})
    assert m.metrics
    with pytest.raises(DisclosureError, match="in a run that sends none"):
        check_evaluate_reply(c.facts(), 0, m.metrics)
    with pytest.raises(DisclosureError, match="num_examples"):
        check_evaluate_reply(c.facts(), len(c.val_idx), {})


def test_a_dp_server_ignores_evaluation_metrics_and_keeps_the_last_round(fed_data, caplog):
    from pipeline.federated.protocol import Evaluation

    data, base = fed_data
    cfg = _cfg(base, "federated.dp_noise=0.5", "federated.rounds=3")
    server = FederatedServer(cfg, trainable_arrays(new_model(data, cfg)))
    good = {"cindex": 0.9, "concordant": 9.0, "comparable": 10.0, "loss_sum": 1.0, "events": 10.0}
    bad = {"cindex": 0.1, "concordant": 1.0, "comparable": 10.0, "loss_sum": 50.0, "events": 10.0}
    caplog.clear()
    for rnd, m in enumerate((good, bad, bad)):  # without DP round 0 would be kept (best loss and C-index)
        server.finish_round(rnd, {"a": Evaluation(20, m)}, {})
    assert server.best is not None and server.best[1] == 2
    assert all(np.isnan(h["val_cindex"]) and np.isnan(h["val_loss"]) for h in server.history)
    assert server.summary()["select"] == "last"
    assert sum("keeping the last round" in r.getMessage() for r in caplog.records) == 1
    plain = FederatedServer(_cfg(base, "federated.rounds=3"), trainable_arrays(new_model(data, cfg)))
    for rnd, m in enumerate((good, bad, bad)):
        plain.finish_round(rnd, {"a": Evaluation(20, m)}, {})
    assert plain.best is not None and plain.best[1] == 0
    with pytest.raises(ValueError, match="train.without_validation=error"):
        FederatedServer(_cfg(base, "federated.dp_noise=0.5", "train.without_validation=error"), server.global_arrays)


def test_central_discrete_time_edges_are_no_training_time_and_follow_the_federated_grid_rule():
    """A centrally trained discrete-time model keeps no training time in its bin edges (issue 12): the edges
    come from the event times' histogram on the pre-agreed grid, as a federation computes them with k = 1."""
    import torch

    from models.losses import discrete_time_edges, nice_ceiling
    from pipeline.stats.curves import bins_from_histogram, nice_ceil, pooled_histogram, time_edges

    rng = np.random.default_rng(4)
    time = rng.exponential(900.0, 80)
    event = rng.random(80) < 0.6
    edges = discrete_time_edges(torch.from_numpy(time), torch.from_numpy(event), 4).numpy()
    assert not np.isin(edges, time).any()  # not the largest time (as before), not an inner quantile either
    assert edges[-1] == nice_ceil(float(time.max())) > time.max()
    grid = time_edges(nice_ceil(float(time.max())))
    fed = bins_from_histogram(grid, pooled_histogram(time[event], np.zeros(int(event.sum())), grid, 1), 4)
    np.testing.assert_allclose(edges, fed, rtol=1e-12)  # the federated rule with one site and no merging
    # the edges depend on the times only through their grid bins: moving every time within its bin changes nothing
    step = grid[1]
    moved = np.floor(time / step) * step + rng.uniform(0.01, 0.99, 80) * step
    assert nice_ceil(float(moved.max())) == edges[-1]
    np.testing.assert_allclose(
        discrete_time_edges(torch.from_numpy(moved), torch.from_numpy(event), 4).numpy(), edges, rtol=1e-12
    )
    for x in (0.0, 3652.3, 99.0, 100.0, 0.0123, 1e7 + 1):
        assert nice_ceiling(x) == nice_ceil(x)


def _three_site_baseline_cohort():
    """Sites of 80 (many events), 30 (12 events) and 15 (4 events) patients: ``(time, event, log_hz, site)``."""
    rng = np.random.default_rng(7)
    n_ev = {0: None, 1: 12, 2: 4}
    parts = []
    for s, n in ((0, 80), (1, 30), (2, 15)):
        lh = rng.normal(0, 0.5, n)
        t = rng.exponential(1000.0 * np.exp(-lh))
        e = rng.random(n) < 0.6 if n_ev[s] is None else np.arange(n) < n_ev[s]
        parts.append((t, e, lh, np.full(n, s)))
    return tuple(np.concatenate(x) for x in zip(*parts, strict=True))


def test_a_released_baseline_step_never_reveals_fewer_than_k_events(caplog):
    """Per-site Breslow summaries on the coarse grid: each released step holds >= k events or none, the risk sum
    changes only where >= k patients left, a site of fewer than k events sends nothing (issue 12)."""
    from pipeline.stats.curves import BreslowBaseline, coarse_grid, combine, site_summary

    time, event, lh, site = _three_site_baseline_cohort()
    grid, k = coarse_grid(float(time.max())), 10
    for s in range(3):
        t, e, x = time[site == s], event[site == s], lh[site == s]
        raw, merged = site_summary(grid, t, e, x, True), site_summary(grid, t, e, x, True, min_events=k)
        assert ((raw.events > 0) & (raw.events < k)).any()  # unmerged, this site's steps reveal 1..k-1 events
        released = merged.events[merged.events > 0]
        assert (released >= k).all()
        if e.sum() < k:
            assert not merged.events.any() and not merged.risk_sum.any()
            continue
        assert released.sum() == e.sum() - (t[e] > grid[-1]).sum()
        # one risk sum per run of >= k events; at each run's end the site's own hazard is the unmerged one
        # the risk sum: exact only at anchors, each a sum over >= k patients at risk with >= k gone since the
        # previous one; between anchors the log-linear interpolation of the anchors (a function of them alone)
        at_risk = np.array([(t > g).sum() for g in np.concatenate([[-np.inf], grid[:-1]])])  # at each start
        exact = np.flatnonzero(np.isclose(merged.risk_sum, raw.risk_sum, rtol=1e-12) & (merged.risk_sum > 0))
        assert exact[0] == 0 and (at_risk[exact] >= k).all() and (-np.diff(at_risk[exact]) >= k).all()
        assert len(exact) < np.count_nonzero(np.diff(raw.risk_sum)) + 1  # fewer exact values than raw changes
        upto = np.arange(exact[-1] + 1)
        interp = np.exp(np.interp(upto, exact, np.log(raw.risk_sum[exact])))
        np.testing.assert_allclose(merged.risk_sum[upto], interp, rtol=1e-12)
        tail = merged.risk_sum[exact[-1] + 1 :]
        assert np.all((tail == 0) | (tail == raw.risk_sum[exact[-1]]))  # held after the last anchor, then 0
        assert np.all(merged.risk_sum[merged.events > 0] > 0)  # every released step has its risk set
    caplog.clear()
    base = BreslowBaseline.fit(time, event, lh, site, ["a", "b", "c"], grid, k, True)
    assert set(base.cumhaz_by_site) == {"a", "b"}  # c: 4 events, pooled baseline, summary not sent
    assert any("['c']" in r.getMessage() and "no summary sent" in r.getMessage() for r in caplog.records)
    assert len(np.unique(base.cumhaz_by_site["b"])) <= 2  # 12 events: one step (0, then one value)
    assert np.all(np.diff(base.cumhaz) >= 0) and base.cumhaz[-1] > 0
    exact = combine([site_summary(grid, time[site == s], event[site == s], lh[site == s], True) for s in range(3)])
    seen = np.exp(-exact) >= 0.2  # where the survival curve is read
    print(np.abs(np.exp(-base.cumhaz) - np.exp(-exact))[seen].max(), seen.sum())


def test_a_numeric_missing_count_under_k_is_not_derivable_from_the_observed_count(caplog):
    """A numeric column's missing count is n_patients - n: when it is 1..k-1 the site coarsens n to n_patients - k
    (its mean and mean square kept) and sends no missing count; a warning names the site and column."""
    from data_specs.summaries import drop_empty_columns, small_cells
    from pipeline.federated.policy import DisclosureError, SiteFacts, check_summaries
    from pipeline.omics.clinical import ClinicalNormaliser
    from pipeline.omics.normalise import site_summaries

    df = _site_clinical()
    df.loc[["P3", "P7"], "age"] = np.nan  # 2 missing of 30
    df["bmi"] = np.where(np.arange(30) < 27, np.nan, 25.0 + np.arange(30))  # 3 observed: suppressed, n and missing
    ids, facts = list(df.index), SiteFacts("hosp_a", 30, 0, 0, 0, (), 10)
    raw = site_summaries("hosp_a", ids, clinical=df)["clinical"]
    assert "clinical.n_patients - numeric.n[age] (missing)" in small_cells(raw, 10)
    assert "clinical.missing[bmi]" in small_cells(raw, 10) or "clinical.numeric.n[bmi]" in small_cells(raw, 10)
    with pytest.raises(DisclosureError, match="missing"):
        check_summaries(facts, {"clinical": raw.to_wire()})
    caplog.clear()
    s = site_summaries("hosp_a", ids, clinical=df, min_count=10)["clinical"]
    check_summaries(facts, {"clinical": s.to_wire()})  # what the site sends passes the policy
    num = {c: i for i, c in enumerate(s.numeric.columns)}
    i, j = num["age"], num["bmi"]
    assert s.numeric.n[i] == 30 - 10 and s.missing["age"] == 0  # 30 - n = 10: not the 2 missing
    age = df["age"].dropna()
    assert s.numeric.sum[i] / s.numeric.n[i] == pytest.approx(age.mean())  # the site's mean is kept
    assert s.numeric.sumsq[i] / s.numeric.n[i] == pytest.approx((age**2).mean())
    assert s.numeric.n[j] == 0 and s.missing["bmi"] == 0  # 27 missing would give n = 3
    assert any("hosp_a" in r.getMessage() and "age" in r.getMessage() for r in caplog.records)
    norm = ClinicalNormaliser.from_summaries(drop_empty_columns([s])[0])  # brca1 and bmi: suppressed everywhere
    k = list(norm.numeric).index("age")
    assert norm.mean[k] == pytest.approx(age.mean()) and norm.std[k] == pytest.approx(age.std(ddof=0), rel=1e-6)
