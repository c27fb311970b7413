"""The ``histofuse`` command line's failures: which ones a user can cause and fix, and their one-line message.

:func:`expected_errors` are reported by :func:`pipeline.cli.main` as ``error: <describe(e)>`` with exit 2;
anything else is a bug and keeps its traceback. :data:`EXTRAS` maps optional packages to the pyproject
extra that installs them, for a command run without it. :func:`setup_logging` sets the CLI's log format.
"""

from __future__ import annotations

import argparse
import logging
import warnings

# optional packages (pyproject extras) a command may need: module name -> extra
EXTRAS = {"tifffile": "demo", "imagecodecs": "demo", "opacus": "dp"}


def expected_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can cause and fix (bad input, paths, permissions, memory), reported in one line."""
    import pickle

    import torch

    return (ValueError, OSError, pickle.UnpicklingError, EOFError, torch.cuda.OutOfMemoryError)


def describe(e: BaseException, args: argparse.Namespace) -> str:
    """One line for an expected failure, naming the path where there is one and what to do."""
    import pickle

    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of GPU memory: lower train.batch_size / extract.batch_size (--set ...) or free the GPU"
    model = getattr(args, "model", None)
    if isinstance(e, pickle.UnpicklingError | EOFError):
        where = f"{model}: " if model is not None else ""
        return f"{where}not a readable model file (truncated or not written by `histofuse train`): {e}"
    if isinstance(e, OSError):
        path = e.filename or (model if e.errno is None else None)
        what = e.strerror or str(e) or type(e).__name__
        hint = {PermissionError: " (check the permissions or choose another --out)",
                IsADirectoryError: " (a folder where a file was expected)",
                FileExistsError: " (a file is in the way; choose another --out)"}.get(type(e), "")  # fmt: skip
        return f"{path}: {what}{hint}" if path else f"{what}{hint}"
    return str(e)


def setup_logging(verbose: bool) -> None:
    """INFO (DEBUG with ``-v``) lines ``LEVEL name: message``; third-party chatter at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "numexpr", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)  # Lightning on this torch
