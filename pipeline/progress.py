"""Progress reporting shared by extraction, federated training and attribution.

:class:`Progress` is a tqdm bar when its stream is a terminal and plain newline-terminated lines otherwise (a
run piped to a file gets one readable line every few percent or seconds, never a line of carriage returns).
:class:`RoundClock` times repeated rounds and gives the elapsed time and an ETA; :class:`StepLog` logs the
named steps of a long stage with their durations. :func:`fmt_seconds` formats a duration.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def fmt_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``isatty()`` true); False for files, pipes, buffers."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts work done out of ``total``: a tqdm bar on a terminal, plain lines elsewhere.

    Plain mode writes ``desc: n/total unit (p%), elapsed, ETA`` when at least ``every_pct`` percent or
    ``every_s`` seconds passed since the last line, and a closing line. Use as a context manager.

    Args:
        total: units of work expected (None when unknown: no percentage or ETA).
        desc: what is counted, first on each line.
        unit: the unit's name (``tile``, ``slide``).
        stream: where to write; ``sys.stderr`` at construction when None.
        enabled: False writes nothing.
        leave: on a terminal, keep the finished bar (False for an inner bar that restarts per item).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        leave: bool = True,
        every_pct: float = 10.0,
        every_s: float = 10.0,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.every_pct, self.every_s = enabled, every_pct, every_s
        self.postfix = ""
        self._t0 = self._last_t = time.perf_counter()
        self._last_n = 0
        self._closed = False
        self.bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=leave, dynamic_ncols=True)

    @property
    def plain(self) -> bool:
        """True when writing plain lines (enabled, stream not a terminal)."""
        return self.enabled and self.bar is None

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Add ``n`` units done; ``postfix`` (e.g. ``slide 3/10``) is shown after the count."""
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
        elif self.plain and (self.total is None or self.n < self.total) and self._due():  # the last: by close()
            self._line()

    def _due(self) -> bool:
        now = time.perf_counter()
        if now - self._last_t >= self.every_s:
            return True
        total = self.total or 0
        return total > 0 and 100.0 * (self.n - self._last_n) / total >= self.every_pct

    def _line(self, done: bool = False) -> None:
        now = time.perf_counter()
        el = now - self._t0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{fmt_seconds(el)} elapsed")
        if not done and self.total and self.n:
            parts.append(f"ETA {fmt_seconds(el / self.n * (self.total - self.n))}")
        if self.postfix:
            parts.append(self.postfix)
        self.stream.write(", ".join(parts) + ("  done" if done else "") + "\n")
        self.stream.flush()
        self._last_t, self._last_n = now, self.n

    def close(self) -> None:
        """Finish the bar, or write the closing line (plain mode, when anything was counted)."""
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.plain and self.n:
            self._line(done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RoundClock:
    """Elapsed time and ETA over repeated rounds: ETA = rounds left x mean round time in this process."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self.rounds = 0

    def start(self) -> None:
        """Start the clock at the first round's start (later calls do nothing)."""
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def lap(self, rounds_left: int) -> tuple[float, float]:
        """One more round done: ``(elapsed seconds, ETA seconds)``."""
        self.start()
        self.rounds += 1
        el = time.perf_counter() - self._t0  # type: ignore[operator]
        return el, el / self.rounds * max(0, rounds_left)

    def text(self, rounds_left: int) -> str:
        """:meth:`lap` as ``elapsed 12 s, ETA 40 s``."""
        el, eta = self.lap(rounds_left)
        return f"elapsed {fmt_seconds(el)}, ETA {fmt_seconds(eta)}"


class StepLog:
    """Logs the numbered steps of a long stage (``attribute 2/5: genes IG (40 patients)``) with durations.

    Logs to ``logger``, by default the stage's own ``pipeline.<name>`` logger.
    """

    def __init__(self, name: str, total: int, logger: logging.Logger | None = None) -> None:
        self.name, self.total, self.k = name, total, 0
        self.log = logger or logging.getLogger(f"pipeline.{name}")
        self._t0 = time.perf_counter()

    def run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Log ``what`` as the next step, run ``fn(*args, **kwargs)``, log its duration; returns its result."""
        self.k += 1
        self.total = max(self.total, self.k)
        self.log.info("%s %d/%d: %s ...", self.name, self.k, self.total, what)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        now = time.perf_counter()
        self.log.info(
            "%s %d/%d: %s done in %s (stage %s)",
            self.name, self.k, self.total, what, fmt_seconds(now - t), fmt_seconds(now - self._t0),
        )  # fmt: skip
        return out
