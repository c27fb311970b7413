"""A real Flower deployment on one machine: SuperLink + one SuperNode per site as processes, then `flwr run`.

    python scripts/flower/loopback.py --cohort COHORT.yaml --sites A B C --out DIR \
        [--run-config 'federated.rounds=3 federated.strategy="fedadam"'] [--timeout 600]

Every process gets its own FLWR_HOME under DIR/flwr/ and free loopback ports; they run without TLS
(`--insecure`, loopback only; see README "Across hospitals" for TLS and node authentication). Prints the
start-up time (processes launched -> run accepted), the training wall time, the mean round time and the
post-training query rounds' time (model file, metrics and each site's risk scores written), writes
DIR/loopback.json and (from the command line) builds DIR/report.html from the run folder, as ``histofuse
report DIR`` does. The run is submitted once every SuperNode has connected (so a run with
``federated.min_sites`` below the number of sites still starts with all of them). Every process started here
is stopped before the script returns.

Fault injection (tests): ``run_loopback(..., fault=f)`` calls ``f(nodes)`` every half second while the run goes;
``nodes.kill(site)`` SIGKILLs that site's SuperNode and its ClientApp processes, and a SuperNode killed so is
not an error; the sites killed are in the result's ``killed``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import write_json

ROOT = Path(__file__).resolve().parents[2]
# the roles start helper processes (flower-superexec, flwr-serverapp, flwr-clientapp) found on PATH
PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def run_config_arg(settings: dict, out: Path) -> str:
    """``flwr run --run-config`` text: histofuse SECTION.KEY settings (TOML values) plus the run folder."""
    return " ".join([*(f"{k}={json.dumps(v)}" for k, v in settings.items()), f"out={json.dumps(str(out))}"])


def _submit(user: Path, link_port: int, run_config: str) -> None:
    """``flwr run`` of this project against the loopback SuperLink (retried while the SuperLink starts)."""
    user.mkdir(parents=True, exist_ok=True)
    (user / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    env = {**os.environ, "FLWR_HOME": str(user), "PATH": PATH}
    submit_by = time.perf_counter() + 30.0
    while True:
        sub = subprocess.run(
            [_bin("flwr"), "run", str(ROOT), "loopback", "--run-config", run_config],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if sub.returncode == 0:
            return
        if time.perf_counter() > submit_by:
            raise RuntimeError(f"flwr run failed: {sub.stdout}\n{sub.stderr}")
        time.sleep(1.0)


@dataclass
class Nodes:
    """The SuperNodes of a loopback run, by site, with their log files; what a ``fault`` callback acts on."""

    procs: dict[str, subprocess.Popen]
    logs: dict[str, Path]
    killed: list[str] = field(default_factory=list)

    def log_text(self, site: str) -> str:
        return self.logs[site].read_text(errors="replace") if self.logs[site].is_file() else ""

    def kill(self, site: str) -> None:
        """SIGKILL the site's SuperNode and the ClientApp processes it started (one process group)."""
        os.killpg(self.procs[site].pid, signal.SIGKILL)
        self.procs[site].wait()
        self.killed.append(site)


def _wait_connected(nodes: Nodes, deadline: float, out: Path) -> None:
    """Until every SuperNode logged its node id (it registered with the SuperLink)."""
    while not all("SuperNode ID:" in nodes.log_text(s) for s in nodes.procs):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not every SuperNode connected by the deadline; see the logs in {out}")
        for s, p in nodes.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"the SuperNode of {s} exited with {p.returncode}; see the logs in {out}")
        time.sleep(0.5)


def _wait_for(
    history: Path,
    procs: list[subprocess.Popen],
    deadline: float,
    out: Path,
    nodes: Nodes | None = None,
    fault: Callable[[Nodes], None] | None = None,
) -> None:
    """Until the ServerApp wrote ``history``; an exited role (not killed by ``fault``) or the deadline is an
    error naming the logs."""
    while not history.is_file():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no {history} by the deadline; see the logs in {out}")
        if fault is not None and nodes is not None:
            fault(nodes)
        killed = {nodes.procs[s].pid for s in nodes.killed} if nodes is not None else set()
        for p in procs:
            if p.pid not in killed and p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see the logs in {out}")
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen], logs: list) -> None:
    """SIGTERM every process group started here, SIGKILL after 10 s, close the logs."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    for fh in logs:
        fh.close()


def run_loopback(
    cohort: Path,
    sites: list[str],
    out: Path,
    settings: dict | None = None,
    timeout: float = 600.0,
    fault: Callable[[Nodes], None] | None = None,
) -> dict:
    """``settings``: histofuse run-config keys (``{"federated.rounds": 3}``), as in ``[tool.flwr.app.config]``;
    ``fault``: see the module docstring."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flwr"
    link_port = free_port()
    procs: list[subprocess.Popen] = []
    logs = []

    def start(cmd: list[str], flwr_home: Path, name: str) -> None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        fh = (out / f"{name}.log").open("w")
        logs.append(fh)
        env = {**os.environ, "FLWR_HOME": str(flwr_home), "HF_HUB_OFFLINE": "1", "PATH": PATH}
        procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True))

    t0 = time.perf_counter()
    history = out / "federated" / "federated_history.json"
    done = out / "train_summary.json"  # written last, after the post-training query rounds
    for stale in (history, done, out / "model.safetensors", out / "metrics.json"):
        stale.unlink(missing_ok=True)
    try:
        start(
            [_bin("flower-superlink"), "--insecure", "--port", str(link_port), "--database", str(home / "link.db"),
             "--disable-runtime-dependency-installation"],
            home / "link",
            "superlink",
        )  # fmt: skip
        nodes = Nodes({}, {})
        for k, site in enumerate(sites):
            start(
                [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                 "--port", str(free_port()), "--node-config",
                 f"site='{site}' cohort='{cohort.resolve()}' rank={k} out='{out}'"],
                home / f"node_{k}",
                f"supernode_{site}",
            )  # fmt: skip
            nodes.procs[site], nodes.logs[site] = procs[-1], out / f"supernode_{site}.log"
        deadline = time.perf_counter() + timeout
        _wait_connected(nodes, deadline, out)
        _submit(home / "user", link_port, run_config_arg(settings or {}, out))
        t_start = time.perf_counter() - t0
        _wait_for(history, procs, deadline, out, nodes, fault)
        t_total = time.perf_counter() - t0
        t_finish = None  # a run that lost a site (fault injection) is not waited for after training
        if not nodes.killed:
            _wait_for(done, procs, deadline, out, nodes, fault)
            t_finish = time.perf_counter() - t0 - t_total
        info = json.loads(history.read_text())
        rounds = [r["seconds"] for r in info["history"]]
        res = {
            "sites": sites,
            "startup_seconds": t_start,
            "total_seconds": t_total,
            "rounds": len(rounds),
            "mean_round_seconds": sum(rounds) / len(rounds),
            "finish_seconds": t_finish,
            "best_round": info["best_round"],
            "history": info["history"],
            "killed": nodes.killed,
        }
        write_json(out / "loopback.json", res)
        return res
    finally:
        _stop(procs, logs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True, help="cohort spec every node reads (its own site only)")
    ap.add_argument("--sites", nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-config", default="", help="space-separated SECTION.KEY=VALUE (TOML values)")
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args()
    from flwr.common.config import parse_config_args

    r = run_loopback(a.cohort, a.sites, a.out, parse_config_args([a.run_config]), a.timeout)
    print(
        f"{len(a.sites)} SuperNodes: start-up {r['startup_seconds']:.1f} s, {r['rounds']} rounds in "
        f"{r['total_seconds']:.1f} s total, mean round {r['mean_round_seconds']:.1f} s, best round {r['best_round']}; "
        f"post-training query rounds {r['finish_seconds'] or 0:.1f} s"
    )
    if r["finish_seconds"] is not None:  # the run folder holds what the report needs (model, metrics, ledgers)
        from pipeline.outputs.report import build_report

        print(f"report: {build_report(a.out, f'histofuse deployment: {a.cohort.stem}')}")


if __name__ == "__main__":
    main()
