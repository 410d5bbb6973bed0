"""The cross-file window scheduler of `transcribe` (no Triton): which rows go into which batch."""

from __future__ import annotations

import threading
import time

import pytest

from whisper_triton.triton_models.window_scheduler import (DEADLINE_S_PER_AUDIO_S, WindowScheduler, file_allowance,
                                                            file_deadline)


class Engine:
    """Records each batch; a batch finishes only when the test releases it (no timing involved)."""

    def __init__(self, rows: int = 8):
        self.rows = rows
        self.batches: list[tuple[object, list]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_group: object = None

    def run(self, group, payloads):
        self.batches.append((group, list(payloads)))
        self.started.release()
        assert self.release.acquire(timeout=10), "the test never released the batch"
        if group == self.fail_group:
            raise RuntimeError("engine failed")
        return [f"{group}:{p}" for p in payloads]


@pytest.fixture
def engine():
    return Engine()


@pytest.fixture
def scheduler(engine):
    s = WindowScheduler(engine.run, lambda: engine.rows, in_flight=1)
    yield s
    s.close()


def _wait_started(engine, count=1):
    for _ in range(count):
        assert engine.started.acquire(timeout=10)


def test_rows_come_back_in_their_order_and_batches_hold_at_most_max_batch_size(scheduler, engine):
    engine.rows = 3
    futures = scheduler.submit("g", list(range(7)), deadline=1.0)
    for _ in range(3):
        _wait_started(engine)
        engine.release.release()
    assert [f.result(timeout=10) for f in futures] == [f"g:{i}" for i in range(7)]
    assert [len(p) for _, p in engine.batches] == [3, 3, 1]


def test_a_short_file_goes_into_the_next_batch_ahead_of_a_long_files_remaining_windows(scheduler, engine):
    engine.rows = 2
    long = scheduler.submit("g", ["L0", "L1", "L2", "L3", "L4", "L5"], deadline=file_deadline(0.0, 300.0),
                            slack=file_allowance(300.0))
    _wait_started(engine)  # the long file's first batch runs
    # arrives later, due sooner; its batch is not filled with the long file's rows (due 15 s later)
    short = scheduler.submit("g", ["S0"], deadline=file_deadline(1.0, 4.0), slack=file_allowance(4.0))
    engine.release.release()
    _wait_started(engine)
    assert engine.batches[1][1] == ["S0"]
    engine.release.release()
    assert short[0].result(timeout=10) == "g:S0"
    for _ in range(2):
        _wait_started(engine)
        engine.release.release()
    assert [f.result(timeout=10) for f in long] == [f"g:L{i}" for i in range(6)]
    assert [p for _, p in engine.batches] == [["L0", "L1"], ["S0"], ["L2", "L3"], ["L4", "L5"]]


def test_files_due_together_share_a_batch_and_a_long_file_fills_it_with_its_own_windows(scheduler, engine):
    engine.rows = 4
    blocker = scheduler.submit("g", ["B"], deadline=-1.0, slack=0.0)
    _wait_started(engine)
    shorts = [scheduler.submit("g", [f"S{i}"], deadline=file_deadline(0.01 * i, 4.0), slack=file_allowance(4.0))
              for i in range(3)]
    long = scheduler.submit("g", [f"L{i}" for i in range(6)], deadline=file_deadline(0.0, 300.0),
                            slack=file_allowance(300.0))
    for _ in range(3):
        engine.release.release()
        _wait_started(engine)
    engine.release.release()
    assert [p for _, p in engine.batches] == [["B"], ["S0", "S1", "S2"], ["L0", "L1", "L2", "L3"], ["L4", "L5"]]
    assert blocker[0].result(timeout=10) == "g:B" and [s[0].result(timeout=10) for s in shorts] == ["g:S0", "g:S1", "g:S2"]
    assert [f.result(timeout=10) for f in long][-1] == "g:L5"


def test_a_long_file_is_not_starved_by_a_stream_of_short_ones(scheduler, engine):
    engine.rows = 1
    blocker = scheduler.submit("g", ["B"], deadline=0.0)
    _wait_started(engine)  # the engine is busy; what follows waits for the scheduler's choice
    long = scheduler.submit("g", ["L0"], deadline=file_deadline(0.0, 60.0))  # due at 3.0
    early = scheduler.submit("g", ["S0"], deadline=file_deadline(0.5, 4.0))  # due at 0.7: before the long file
    late = [scheduler.submit("g", [f"S{i}"], deadline=file_deadline(3.0 + i, 4.0)) for i in (1, 2, 3)]  # after it
    for _ in range(5):
        engine.release.release()
        _wait_started(engine)
    engine.release.release()
    order = [payloads[0] for _, payloads in engine.batches]
    assert order == ["B", "S0", "L0", "S1", "S2", "S3"]
    assert blocker[0].result(timeout=10) == "g:B" and long[0].result(timeout=10) == "g:L0"
    assert early[0].result(timeout=10) == "g:S0" and [f[0].result(timeout=10) for f in late] == ["g:S1", "g:S2", "g:S3"]
    assert file_deadline(0.0, 60.0) == pytest.approx(60.0 * DEADLINE_S_PER_AUDIO_S)


def test_rows_of_different_kinds_never_share_a_batch(scheduler, engine):
    first = scheduler.submit("detect", ["d0"], deadline=0.0)
    _wait_started(engine)
    decode = scheduler.submit("decode", ["a", "b"], deadline=1.0)
    detect = scheduler.submit("detect", ["d1"], deadline=2.0)
    for _ in range(3):
        engine.release.release()
        if len(engine.batches) < 3:
            _wait_started(engine)
    assert [(g, p) for g, p in engine.batches] == [("detect", ["d0"]), ("decode", ["a", "b"]), ("detect", ["d1"])]
    assert first[0].result(timeout=10) == "detect:d0" and detect[0].result(timeout=10) == "detect:d1"
    assert [f.result(timeout=10) for f in decode] == ["decode:a", "decode:b"]


def test_no_more_batches_in_flight_than_allowed(engine):
    scheduler = WindowScheduler(engine.run, lambda: 1, in_flight=2)
    try:
        futures = scheduler.submit("g", list(range(4)), deadline=0.0)
        _wait_started(engine, 2)
        time.sleep(0.2)  # give a third batch every chance to start: it must not
        assert len(engine.batches) == 2
        for _ in range(4):
            engine.release.release()
        assert [f.result(timeout=10) for f in futures] == [f"g:{i}" for i in range(4)]
        assert len(engine.batches) == 4
    finally:
        scheduler.close()


def test_a_failed_batch_fails_its_rows_only_and_the_scheduler_goes_on(scheduler, engine):
    engine.fail_group = "bad"
    bad = scheduler.submit("bad", ["x"], deadline=0.0)
    _wait_started(engine)
    good = scheduler.submit("good", ["y"], deadline=1.0)
    engine.release.release()
    with pytest.raises(RuntimeError, match="engine failed"):
        bad[0].result(timeout=10)
    _wait_started(engine)
    engine.release.release()
    assert good[0].result(timeout=10) == "good:y"


def test_closing_fails_what_is_still_waiting(engine):
    scheduler = WindowScheduler(engine.run, lambda: 1, in_flight=1)
    running = scheduler.submit("g", ["a"], deadline=0.0)
    _wait_started(engine)
    waiting = scheduler.submit("g", ["b"], deadline=1.0)
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        waiting[0].result(timeout=10)
    engine.release.release()
    assert running[0].result(timeout=10) == "g:a"
    with pytest.raises(RuntimeError, match="closed"):
        scheduler.submit("g", ["c"], deadline=2.0)


def test_in_flight_must_be_positive(engine):
    with pytest.raises(ValueError, match="in_flight"):
        WindowScheduler(engine.run, lambda: 1, in_flight=0)


def test_an_urgent_slot_runs_only_rows_due_before_every_running_batch(engine):
    scheduler = WindowScheduler(engine.run, lambda: 8, in_flight=1, urgent_slots=1)
    try:
        long = scheduler.submit("g", [f"L{i}" for i in range(12)], deadline=file_deadline(0.0, 300.0),
                                slack=file_allowance(300.0))
        _wait_started(engine)  # L0-L7 run; L8-L11 wait: not more urgent than the running batch
        time.sleep(0.2)
        assert len(engine.batches) == 1
        short = scheduler.submit("g", ["S0"], deadline=file_deadline(1.0, 4.0), slack=file_allowance(4.0))
        _wait_started(engine)  # due before the running batch: it starts beside it
        assert engine.batches[1][1] == ["S0"]
        engine.release.release()
        engine.release.release()
        _wait_started(engine)
        engine.release.release()
        assert short[0].result(timeout=10) == "g:S0" and [f.result(timeout=10) for f in long][-1] == "g:L11"
        assert [p for _, p in engine.batches] == [[f"L{i}" for i in range(8)], ["S0"], ["L8", "L9", "L10", "L11"]]
    finally:
        scheduler.close()
