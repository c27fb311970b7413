"""The privacy ledger: one line per message a site sent, describing its form and never its values.

The ClientApp's disclosure mod (``client_app.disclosure_mod``, the one place every reply passes) records each
reply here after the policy check: phase (``statistics.summaries``, ``train``, ``train.secagg.<stage>``,
``evaluate`` ...), round, site, and per record its keys with shapes and dtypes (arrays), types and lengths
(scalars, lists, bytes, strings). :func:`check_no_values` is what a reader (and the tests) rely on: no line
holds a float. Flower-free; the file is ``privacy_ledger.jsonl`` (JSON lines), rewritten whole through
``pipeline.files`` at each new round and at the end, so a reader never sees a half-written line.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.files import write_text


class MessageLedger:
    """Ledger lines kept in memory and written to ``path`` (None: memory only).

    Args:
        path: the JSON-lines file.
        keep: start from the lines already in ``path`` (a resumed run, a restarted node).
        autoflush: rewrite the file after every line (a deployed node, which never learns the run ended);
            otherwise at the first line of each new round and on :meth:`flush`.
    """

    def __init__(self, path: Path | None = None, keep: bool = False, autoflush: bool = False):
        self.path, self.autoflush = path, autoflush
        self.lines: list[dict] = list(read_ledger(path)) if keep and path is not None and path.is_file() else []
        self._written = len(self.lines)

    def record(self, entry: dict) -> None:
        """Add one line; ``entry`` holds only names, ints, bools and strings (checked)."""
        check_no_values(entry)
        if self.lines and self.lines[-1].get("group") != entry.get("group"):
            self.flush()  # the previous round is complete on disk
        self.lines.append(entry)
        if self.autoflush:
            self.flush()

    def flush(self) -> None:
        """Rewrite the file with every line so far (atomically, through ``pipeline.files``)."""
        if self.path is not None and len(self.lines) != self._written:
            write_text(self.path, "".join(json.dumps(x, sort_keys=True) + "\n" for x in self.lines))
            self._written = len(self.lines)


def read_ledger(path: Path) -> Iterator[dict]:
    """The lines of a ledger file."""
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e})") from None


def check_no_values(obj: Any, where: str = "ledger line") -> None:
    """Raise ``ValueError`` if ``obj`` holds a float anywhere (a ledger describes messages, never carries values)."""
    if isinstance(obj, float):
        raise ValueError(f"{where}: holds a float ({obj!r}); the ledger records form, not values")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_no_values(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_no_values(v, f"{where}[{i}]")


def describe_value(v) -> dict:
    """A record entry's form: type and length (lists, bytes, strings), never the value."""
    if isinstance(v, list):
        kinds = sorted({type(x).__name__ for x in v})
        return {"type": f"list[{'|'.join(kinds)}]" if kinds else "list", "len": len(v)}
    if isinstance(v, bytes | str):
        return {"type": type(v).__name__, "len": len(v)}
    return {"type": type(v).__name__}


def describe_array(a) -> dict:
    """An array's shape and dtype (from its header for Flower's legacy ``numpy.ndarray`` bytes), and size."""
    shape, dtype = list(a.shape), str(a.dtype)
    if not shape and not dtype and a.stype == "numpy.ndarray":
        fh = io.BytesIO(a.data)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(fh))
        shp, _, dt = (read or np.lib.format.read_array_header_2_0)(fh)
        shape, dtype = list(shp), str(dt)
    return {"shape": shape, "dtype": dtype, "bytes": len(a.data)}


def ledger_entry(head: dict, reply: Any, error: str | None = None) -> dict:
    """One ledger line for the Flower ``reply`` (a ``Message``) a site sends (``head``: ``client_app.ledger_head``):
    for each record its keys with shapes and dtypes (arrays) or types and lengths (metrics, configs). No value is
    copied."""
    entry = dict(head)
    if error is not None or reply is None or not reply.has_content():
        entry["error"] = error or (f"code {reply.error.code}" if reply is not None else "no reply")
        return entry
    c = reply.content
    records: dict = {}
    for name, rec in c.array_records.items():
        records[name] = {
            "kind": "arrays",
            "keys": {k: describe_array(a) for k, a in rec.items()},
        }
    for kind, group in (("metrics", c.metric_records), ("config", c.config_records)):
        for name, rec in group.items():
            records[name] = {"kind": kind, "keys": {k: describe_value(v) for k, v in rec.items()}}
    entry["records"] = records
    return entry
