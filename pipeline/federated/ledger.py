"""The privacy ledger: one line per message a site sent, describing its form and never its values.

The ClientApp's disclosure mod (``client_app.disclosure_mod``, the one place every reply passes) records each
reply here after the policy check: phase (``statistics.summaries``, ``train``, ``train.secagg.<stage>``,
``evaluate`` ...), round, site, and per record its keys with shapes and dtypes (arrays), types and lengths
(scalars, lists, bytes, strings). :func:`check_no_values` is what a reader (and the tests) rely on: no line
holds a float. Flower-free; the file is ``privacy_ledger.jsonl`` (JSON lines), rewritten whole through
``pipeline.files`` at each new round and at the end, so a reader never sees a half-written line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
