"""Fault injection in a real deployment: a SuperNode killed with SIGKILL in the middle of a round."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_specs import load_cohort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "flower"))

from test_flower import clinical_omics_cohort  # noqa: E402, F401  (the fixture: 3 sites of 4 patients)

ROUNDS = 2


def kill_in_round(site: str, rnd: int):
    """A ``fault`` for ``run_loopback``: SIGKILL ``site``'s SuperNode as soon as it has received the training
    message of Flower round ``rnd`` (1-based), i.e. while its ClientApp starts and trains, before it answers."""
    state = {"done": False}

    def fault(nodes) -> None:
        if not state["done"] and nodes.log_text(site).count("Receiving: train message") >= rnd:
            nodes.kill(site)
            state["done"] = True

    return fault


@pytest.mark.slow  # a SuperLink, 3 SuperNodes and a fresh ClientApp process per message: ~3-6 min on 2 cores
def test_a_supernode_killed_mid_round_is_dropped_and_the_run_completes_within_min_sites(
    clinical_omics_cohort,  # noqa: F811
    tmp_path,
):
    from loopback import run_loopback

    sites = load_cohort(clinical_omics_cohort).sites
    assert len(sites) == 3
    victim = sites[1]
    settings = {"train.batch_size": 4, "federated.rounds": ROUNDS, "federated.local_epochs": 1}
    settings["federated.min_sites"] = 2  # one site may be lost
    settings["federated.min_count"] = 2  # sites of 3 training patients (default k is 10)
    res = run_loopback(clinical_omics_cohort, sites, tmp_path, settings, timeout=580, fault=kill_in_round(victim, 2))
    assert res["killed"] == [victim], "the run finished before the SuperNode could be killed"
    assert res["rounds"] == ROUNDS  # the run completed: every round aggregated
    h = res["history"]
    assert h[0]["dropped"] == [] and all(np.isfinite(r["train_loss"]) for r in h)
    assert victim in h[1]["dropped"] and set(h[1]["dropped"]) == {victim}  # killed in the second round
    info = json.loads((tmp_path / "federated" / "federated_history.json").read_text())
    assert {"round": 1, "site": victim} in info["dropped"] and info["min_sites"] == 2
    assert {"round": 1, "site": victim} in info["retried"]  # asked once more before being dropped
    state = json.loads((tmp_path / "federated" / "server_state.json").read_text())
    assert state["round"] == ROUNDS - 1 and (tmp_path / "federated" / state["arrays_file"]).is_file()
