"""``histofuse extract``'s OpenMP threads sleep when they wait (no spinning), unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# CPU seconds the process burns per second it sleeps between short parallel matrix products: libgomp's default
# keeps the worker thread spinning through the sleeps, a passive one sleeps too
PROBE = textwrap.dedent(
    """
    import os, resource, sys, time
    from pipeline.openmp import passive_waits
    applied = passive_waits() if sys.argv[1] == "apply" else None
    import torch
    torch.set_num_threads(2)
    x = torch.randn(256, 256)

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    c0, t0, slept = cpu(), time.perf_counter(), 0.0
    for _ in range(150):
        (x @ x).sum()
        a = time.perf_counter()
        time.sleep(0.002)
        slept += time.perf_counter() - a
    print(applied, os.environ.get("OMP_WAIT_POLICY"), (cpu() - c0) / slept)
    """
)

CLI = textwrap.dedent(
    """
    import os, sys
    import pipeline.cli as cli
    seen = {}

    def record(args, argv):
        seen.update(torch="torch" in sys.modules, policy=os.environ.get("OMP_WAIT_POLICY"))
        return 0

    cli.COMMANDS["extract"] = record
    cli.main(["extract", "slides", "--out", "out"])
    print(seen["torch"], seen["policy"])
    """
)


def _run(code: str, *args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_waiting_threads_sleep_and_stop_burning_cpu():
    applied, policy, passive = _run(PROBE, "apply")
    _, unset, spinning = _run(PROBE, "no")
    assert (applied, policy, unset) == ("True", "PASSIVE", "None")
    assert float(passive) < float(spinning) - 0.3, (passive, spinning)  # a similar probe: 0.4 vs 1.5


def test_a_user_setting_wins_and_loaded_torch_is_left_alone():
    assert _run(PROBE, "apply", OMP_WAIT_POLICY="ACTIVE")[:2] == ["False", "ACTIVE"]
    assert _run(PROBE, "apply", GOMP_SPINCOUNT="1000")[:2] == ["False", "None"]
    late = "import os, torch; from pipeline.openmp import passive_waits as p; print(p(), os.getenv('OMP_WAIT_POLICY'))"
    assert _run(late) == ["False", "None"]


def test_extract_sets_it_before_torch_loads():
    assert _run(CLI) == ["False", "PASSIVE"]
