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
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
_END = object()


class Feeder(Generic[T]):
    def __init__(self, produce: Callable[[int], T], start: int, stop: int, depth: int, *, thread: bool = True):
        """``thread=False`` produces on the caller's thread in :meth:`get`, keeping ``depth`` results
        ahead (the former behaviour, kept for comparisons such as ``data.feed_thread=false``)."""
        self._produce = produce
        self._next, self._stop = start, stop
        self._depth = max(1, depth)
        self._ahead: deque = deque()
        self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
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
            while self._next < self._stop and len(self._ahead) < self._depth:
                self._ahead.append((self._next, self._produce(self._next)))
                self._next += 1
            if not self._ahead:
                raise StopIteration
            return self._ahead.popleft()
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
