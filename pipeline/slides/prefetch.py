"""Read ahead of the encoder: a bounded queue filled by one background thread, consumed in order.

Extraction on the CPU is serial by default (``extract.num_workers=0``): reading a batch (OpenSlide decodes
JPEG tiles in C and releases the GIL), the background check and the collate would otherwise leave the encoder
idle. :class:`Prefetcher` runs the reading in a thread at most ``depth`` batches ahead, so memory stays bounded
by ``depth + 2`` batches of tiles whatever the slide's size; items come out in the order the source yields
them, an exception raised while reading is re-raised in the consumer at the point it happened, and closing
the prefetcher early (the consumer failed) stops and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[T]):
    """Iterate ``make_source()`` in a daemon thread, up to ``depth`` items ahead of the consumer.

    Use as a context manager (``with Prefetcher(...) as items: for x in items: ...``) so the thread is stopped
    and joined whatever happens to the consumer.

    Args:
        make_source: called in the thread; returns the iterable to read (e.g. a DataLoader).
        depth: items held in the queue at most (>= 1); the thread blocks when it is full.
        name: the thread's name (in stack dumps and profilers).
        on_start: called first in the thread (e.g. to set its torch thread count).
    """

    def __init__(
        self,
        make_source: Callable[[], Iterable[T]],
        depth: int = 2,
        name: str = "tile-reader",
        on_start: Callable[[], object] | None = None,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._make = make_source
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless asked to stop; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            for item in self._make():
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        self._put(_END)

    def __enter__(self) -> Iterator[T]:
        self._thread.start()
        self._started = True
        return self._iter()

    def _iter(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the item it is reading) and wait for it."""
        self._stop.set()
        if self._started:
            while self._thread.is_alive():
                try:  # unblock a put waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
