"""Small concurrency helpers: overlap reading with writing without unbounded memory."""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["WriteBehind", "prefetch", "pwrite_all"]

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    pread, pwrite, zlib and zstd release the GIL, so reading the next piece while the caller
    writes this one makes the two overlap. Errors raised by the producer are re-raised in the
    consumer; if the consumer stops early, the producer is told to stop and is joined.
    """
    channel: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                channel.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put((False, exc))

    worker = threading.Thread(target=produce, name="imgbridge-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = channel.get()
            if not ok:
                assert isinstance(item, BaseException)
                raise item
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


class WriteBehind:
    """pwrite in worker threads, a bounded number of pieces in flight.

    The kernel's copy into the page cache is a large share of a conversion; doing it in
    threads (pwrite releases the GIL) lets it overlap with reading and with the next piece.
    Errors surface at the next ``write`` or at ``close``. Use as a context manager.
    """

    def __init__(self, fd: int, *, threads: int = 2, in_flight: int = 3) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self._fd = fd
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgbridge-write")
        self._pending: deque[Future[None]] = deque()
        self._in_flight = in_flight

    def write(self, offset: int, data: bytes) -> None:
        while len(self._pending) >= self._in_flight:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(pwrite_all, self._fd, data, offset))

    def close(self) -> None:
        """Wait for every write; raise the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: wait for the workers, keep the first error
            try:
                self.close()
            except Exception:
                pass


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
