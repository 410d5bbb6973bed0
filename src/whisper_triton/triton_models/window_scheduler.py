"""Which windows go to the engine next, across every file `transcribe` decodes at once.

Each file's pipeline (one thread per file) hands its windows here and waits for them. One
dispatcher sends batches of up to the engine's declared `max_batch_size` rows to `whisper_window`,
at most `in_flight` batches at a time, and chooses the rows of the next batch only when a batch
slot is free: earliest deadline first, where a file's deadline is its arrival plus
`DEADLINE_S_PER_AUDIO_S` per second of its audio. A 4 s clip that arrives while a 300 s file is
being decoded therefore goes into the next batch instead of queueing behind the whole file, and a
long file still gets its turn under a stream of short ones (its deadline comes, it is never starved).
A batch led by a file's window takes other rows only when they are due within that file's own
allowance after it: concurrent short files share a batch, but a short file's batch is not filled
with a long file's windows, which on a CPU engine would make it wait for all of them (per-row cost
there falls only from 428 to 291 ms from batch 1 to 8 on tiny.en, so the rows are not free).

`urgent_slots` more batches may be in flight, but only for rows due before every batch running:
with a second `whisper_window` instance, a short file then runs beside a long file's batch instead
of waiting for it (a CPU engine cannot stop a batch it has started), while a file alone never
takes more than `in_flight` slots.

An engine that decodes in flight (TensorRT-LLM's executor: `capabilities.in_flight_windows` > 0) takes
each window as its own request and lets it join the running batch between decoder steps, so the
scheduler then sends rows one by one and keeps up to that many in flight (`in_flight` and `batch_rows`
may be callables, asked when a slot is decided): a short file's window starts at the engine's next
step instead of after a batch. Engines that decode a batch at a time (CTranslate2) keep the above.

A file's rows carry its request's cancellation (`cancelled`): it is asked when their batch is about to
be sent, and the rows of a cancelled file are dropped there (their futures fail with WindowCancelled),
so the windows a dropped file had queued never reach the engine.

Triton's own dynamic batcher cannot do this here: BLS requests carry no priority in this Triton
release, and once a batch is queued there its order is fixed. Holding the choice until a slot is
free is what keeps it late; `in_flight` > 1 keeps a GPU engine busy between batches (the next batch
waits in Triton's queue while one runs) at the price of deciding one batch earlier.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# A file's windows are due this long after it arrived, per second of its audio: RTF 0.05. Only the
# order matters (earliest deadline first); the value sets how much a long file yields to short ones.
DEADLINE_S_PER_AUDIO_S = 0.05
MAX_IN_FLIGHT = 256  # batches (windows, for in-flight engines) one scheduler keeps running at most


def file_allowance(audio_seconds: float) -> float:
    """How long after its arrival a file's windows are due."""
    return DEADLINE_S_PER_AUDIO_S * max(0.0, audio_seconds)


def file_deadline(arrival: float, audio_seconds: float) -> float:
    return arrival + file_allowance(audio_seconds)


@dataclass(order=True)
class _Row:
    deadline: float
    sequence: int  # submission order: a file's windows stay in timeline order
    group: Hashable = field(compare=False)  # rows of one group can share one request
    slack: float = field(compare=False)  # a batch this row leads takes rows due at most this much later
    payload: Any = field(compare=False)
    future: Future = field(compare=False)
    cancelled: Callable[[], bool] | None = field(compare=False, default=None)  # its request's flag

    def is_cancelled(self) -> bool:
        try:
            return self.cancelled is not None and bool(self.cancelled())
        except Exception:  # noqa: BLE001 - a flag that cannot be read is not a cancellation
            return False


class WindowCancelled(Exception):
    """A window was dropped before it was sent: its request was cancelled."""


class WindowScheduler:
    """Rows in, replies out: `run(group, payloads)` sends one batch (one request) and returns one
    reply per payload; `batch_rows()` says how many rows a batch may hold (asked per batch)."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], batch_rows: Callable[[], int],
                 in_flight: int | Callable[[], int] = 1, urgent_slots: int = 0,
                 group_rows: Callable[[Hashable], int] | None = None):
        """`group_rows`, when given, says the rows of a batch per group instead of `batch_rows` (several
        engine models behind one scheduler, each with its own declared batch)."""
        fixed = in_flight if isinstance(in_flight, int) else None
        if (fixed is not None and fixed < 1) or urgent_slots < 0:
            raise ValueError(f"in_flight must be at least 1 and urgent_slots at least 0, got {in_flight}, {urgent_slots}")
        self._run, self._urgent = run, urgent_slots
        self._batch_rows: Callable[[Hashable], int] = group_rows or (lambda group: batch_rows())
        self._slots = (lambda: fixed) if fixed is not None else in_flight
        workers = fixed if fixed is not None else MAX_IN_FLIGHT
        self._pending: list[_Row] = []
        self._running: list[float] = []  # the head deadline of each batch in flight
        self._closed = False
        self._sequence = itertools.count()
        self._changed = threading.Condition()
        self._workers = ThreadPoolExecutor(max_workers=workers + urgent_slots, thread_name_prefix="window-batch")
        self.batches: list[int] = []  # rows per batch sent, for tests and logs (bounded below)
        self.dropped = 0  # rows of cancelled requests dropped before they were sent
        self._dispatcher = threading.Thread(target=self._dispatch, name="window-scheduler", daemon=True)
        self._dispatcher.start()

    def submit(self, group: Hashable, payloads: list[Any], deadline: float, slack: float = float("inf"),
               cancelled: Callable[[], bool] | None = None) -> list[Future]:
        futures = [Future() for _ in payloads]
        with self._changed:
            if self._closed:
                raise RuntimeError("the window scheduler is closed")
            for payload, future in zip(payloads, futures):
                heapq.heappush(self._pending, _Row(deadline, next(self._sequence), group, slack, payload, future,
                                                   cancelled))
            self._changed.notify_all()
        return futures

    def run(self, group: Hashable, payloads: list[Any], deadline: float, slack: float = float("inf"),
            cancelled: Callable[[], bool] | None = None) -> list[Any]:
        """Submit and wait: the replies in the order of `payloads` (the first failure is raised; a
        cancelled request's rows not yet sent raise WindowCancelled and are never sent)."""
        return [future.result() for future in self.submit(group, payloads, deadline, slack, cancelled)]

    def queued(self) -> int:
        """Rows waiting plus batches running: 0 once every row handed in has been sent or dropped."""
        with self._changed:
            return len(self._pending) + len(self._running)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            pending, self._pending = self._pending, []
            self._changed.notify_all()
        for row in pending:
            row.future.set_exception(RuntimeError("the window scheduler was closed before this window was decoded"))
        self._workers.shutdown(wait=False, cancel_futures=True)

    # ---- dispatcher -------------------------------------------------------------------------
    def _take(self) -> tuple[Hashable, list[_Row]]:
        """The most urgent row, and the next most urgent rows of its group due within its slack, up to a batch."""
        head = heapq.heappop(self._pending)
        batch, others = [head], []
        limit = max(1, self._batch_rows(head.group))
        while self._pending and len(batch) < limit and self._pending[0].deadline <= head.deadline + head.slack:
            row = heapq.heappop(self._pending)
            (batch if row.group == head.group else others).append(row)
        for row in others:
            heapq.heappush(self._pending, row)
        return head.group, batch

    def _may_start(self) -> bool:
        if not self._pending:
            return False
        in_flight = self.in_flight()
        if len(self._running) < in_flight:
            return True
        return len(self._running) < in_flight + self._urgent and self._pending[0].deadline < min(self._running)

    def in_flight(self) -> int:
        """Batches that may run at once now (the engine may declare it only once it is asked)."""
        return max(1, min(MAX_IN_FLIGHT, int(self._slots())))

    def _dispatch(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not self._may_start():
                    self._changed.wait()
                if self._closed:
                    return
                group, batch = self._take()
                self._running.append(batch[0].deadline)
                self.batches = (self.batches + [len(batch)])[-1000:]
            self._workers.submit(self._execute, group, batch)

    def _live(self, batch: list[_Row]) -> list[_Row]:
        """The rows of `batch` whose request still wants them; the others fail now, unsent."""
        live = []
        for row in batch:
            if row.is_cancelled():
                row.future.set_exception(WindowCancelled())
            else:
                live.append(row)
        if len(live) < len(batch):
            with self._changed:
                self.dropped += len(batch) - len(live)
        return live

    def _execute(self, group: Hashable, batch: list[_Row]) -> None:
        rows = batch
        try:
            batch = self._live(batch)
            if not batch:
                return
            replies = self._run(group, [row.payload for row in batch])
            if len(replies) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} windows got {len(replies)} replies")
            for row, reply in zip(batch, replies):
                row.future.set_result(reply)
        except BaseException as exc:  # every waiting file learns of the failure; the dispatcher goes on
            for row in batch:
                if not row.future.done():
                    row.future.set_exception(exc)
        finally:
            with self._changed:
                self._running.remove(rows[0].deadline)
                self._changed.notify_all()
