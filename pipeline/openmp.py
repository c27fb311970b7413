"""OpenMP threads that sleep at a barrier instead of spinning, for ``histofuse extract``.

On the CPU, ``extract`` runs the encoder on torch's OpenMP threads (one per core) while a reader thread decodes
the next batches. With libgomp's default, an encoder thread that reaches a barrier spins for a while before it
sleeps, so on a small machine it takes the core the reader needs and the encoder then waits for the reader.
``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at once. Measured on 2 cores with efficientnet-lite0
(docs/benchmarks.md, separate runs): end to end 68.4 and 63.1 against 58.2 tiles/s, 35-42 against 46 ms of CPU
per tile, with the encoder alone as fast. Training is not given the setting: there it cost ~20% per epoch
(small models, many short parallel regions). libgomp reads the variable once, when torch loads it, so it is set
before torch is imported; a user who set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keeps their own choice.
"""

from __future__ import annotations

import os
import sys

VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def passive_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process and its children; False where the user chose (either
    variable set) or torch is already loaded (too late for libgomp to read it)."""
    if any(v in os.environ for v in VARS) or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
