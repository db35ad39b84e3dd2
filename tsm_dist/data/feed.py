"""Plan and read batches on a background thread, ahead of the training thread.

Without it, a loader plans a batch (probing videos not seen before) and reads its encoded bytes
inside ``next(loader)``, i.e. on the training thread after the step's host sync: that time adds to
``data_time``. ``Feeder`` runs ``produce(index)`` for the epoch's batch indices on its own thread,
``depth`` batches ahead; the loader's ``next`` only takes the result. Errors raised by ``produce``
come out of :meth:`Feeder.get` for the batch they belong to, in order.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
_END = object()


class Feeder(Generic[T]):
    def __init__(self, produce: Callable[[int], T], start: int, stop: int, depth: int, *, thread: bool = True):
        """``thread=False`` produces on the caller's thread in :meth:`get` (the former behaviour,
        kept for comparisons such as the I/O study's ``data.feed_thread=false``)."""
        self._produce = produce
        self._next, self._stop = start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="tsm-dist-feed", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for index in range(self._next, self._stop):
            if self._closed.is_set():
                return
            try:
                item = (index, self._produce(index), None)
            except BaseException as err:  # handed to the consumer with the batch it belongs to
                self._put((index, None, err))
                self._put(_END)
                return
            self._put(item)
        self._put(_END)

    def _put(self, item: object) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def get(self) -> tuple[int, T]:
        """The next ``(index, produce(index))``; ``StopIteration`` after the last one."""
        if self._thread is None:
            if self._next >= self._stop:
                raise StopIteration
            index, self._next = self._next, self._next + 1
            return index, self._produce(index)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later get ends too
            raise StopIteration
        index, value, err = item
        if err is not None:
            raise err
        return index, value

    def close(self) -> None:
        """Stop producing and wait for the thread (what it produced ahead is dropped)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
