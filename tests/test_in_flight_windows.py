"""Windows keep flowing into an engine that decodes in flight (capabilities.in_flight_windows > 0), without
changing how a batch-at-a-time engine (CTranslate2) is fed: the scheduler of `transcribe` and the
`whisper_window` model, in-process."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

import fake_pb_utils as pb
from whisper_triton.contract.capabilities import EngineCapabilities
from whisper_triton.triton_models import window_model
from whisper_triton.triton_models.transcribe_model import TritonWindowDecoder
from whisper_triton.triton_models.window_scheduler import WindowScheduler

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm"


def test_the_scheduler_asks_how_many_may_run_when_it_decides():
    slots, started, release = [1], threading.Semaphore(0), threading.Event()

    def run(group, payloads):
        started.release()
        assert release.wait(10)
        return payloads

    scheduler = WindowScheduler(run, lambda: 1, in_flight=lambda: slots[0])
    try:
        slots[0] = 3  # the engine declared its windows in flight after the scheduler was made
        futures = scheduler.submit("g", list(range(5)), deadline=0.0)
        for _ in range(3):
            assert started.acquire(timeout=10)
        assert not started.acquire(timeout=0.2)  # a fourth must wait for a slot
        release.set()
        assert [f.result(timeout=10) for f in futures] == list(range(5))
    finally:
        scheduler.close()


@pytest.mark.parametrize("in_flight_windows, rows, slots", [(0, 8, 2), (24, 1, 24)])
def test_transcribe_sends_single_windows_to_in_flight_engines_only(in_flight_windows, rows, slots):
    decoder = TritonWindowDecoder(pb, tokenizer=None, in_flight=2)
    try:
        decoder._capabilities = EngineCapabilities(max_batch_size=8, in_flight_windows=in_flight_windows)
        assert (decoder._batch_rows(), decoder._slots()) == (rows, slots)
    finally:
        decoder.close()


class GatedEngine:
    """The CPU engine declaring in-flight decoding; its first generate waits at a gate."""

    def __init__(self, engine):
        self.engine, self.gate, self.entered, self.lock = engine, threading.Event(), threading.Event(), threading.Lock()
        self.capabilities = dataclasses.replace(engine.capabilities, in_flight_windows=2)
        for name in ("n_mels", "is_multilingual", "max_batch_size", "name"):
            setattr(self, name, getattr(engine, name))

    def generate(self, *args, **kwargs):
        with self.lock:
            gated = not self.entered.is_set()
            self.entered.set()
        if gated:
            assert self.gate.wait(60)
        return self.engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_whisper_window_answers_each_request_as_it_finishes(monkeypatch):
    real = window_model.load_engine
    monkeypatch.setattr(window_model, "load_engine", lambda *a, **k: GatedEngine(real(*a, **k)))
    model = window_model.WindowModel(pb, pb.model_args(REPOSITORY, "whisper_window", cpu_threads="2"))
    try:
        audio = (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32).reshape(1, -1)
        first, second = (pb.InferenceRequest([pb.Tensor("WAV", audio)], ["TRANSCRIPTS"]) for _ in range(2))
        assert model.execute([first]) is None  # answered through its sender
        # The second is sent only once the first holds the engine: the workers may start in either order.
        assert model.short.decoder.engine.entered.wait(60)
        assert model.execute([second]) is None
        assert second.sender.done.wait(60) and not first.sender.done.is_set()  # the later one did not wait
        model.short.decoder.engine.gate.set()
        assert first.sender.done.wait(60)
        for request in (first, second):
            ((response, flags),) = request.sender.sent
            assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL and not response.has_error()
    finally:
        model.short.decoder.engine.gate.set()
        model.close()
