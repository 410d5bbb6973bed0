"""Cancellation that stops work early (issue 21, item 4): a request whose client left stops within a
bounded amount of work, counted here in engine windows and VAD blocks, not in time.

In-process (tests/fake_pb_utils.py, whose request flag a test sets): the `transcribe` and
`transcribe_stream` models with a counting stand-in for `whisper_window` behind their BLS calls; the
request is cancelled from inside the engine (or VAD) after a given count, and the counts must stop
there. The serving test at the end drops a real streamed request on the session's `serve`."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import fake_pb_utils as pb
from speech import encode
from whisper_triton.contract.capabilities import EngineCapabilities
from whisper_triton.contract.tensors import decode_error

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm"
SLOTS = 2  # windows the stand-in engine decodes at once (an in-flight engine: one window a request)
# 16 fixed windows of 5 s in one batch of 16: on main the batch ran to its end after the client left
MANY_WINDOWS = {"vad": False, "chunk_length": 5, "batch_size": 16, "without_timestamps": True, "temperature": 0}


class CountingEngine:
    """`whisper_window` behind the decoder's BLS call: counts the windows it decodes and cancels the
    request (`on`) once it has decoded `cancel_after` of them."""

    def __init__(self, tokenizer, cancel_after: int | None = None):
        self.windows = 0
        self.cancel_after = cancel_after
        self.on: pb.InferenceRequest | None = None
        self._lock = threading.Lock()
        self._tokens = tokenizer.encode(" Hello there.") + [tokenizer.eot]

    def __call__(self, request) -> dict[str, np.ndarray]:
        rows = request.inputs[0].as_numpy().shape[0]
        with self._lock:
            self.windows += rows
            if self.cancel_after is not None and self.windows >= self.cancel_after and self.on is not None:
                self.on.sender.cancel()  # the client leaves while this window is being decoded
        replies = {"TOKENS": np.array([self._tokens] * rows, dtype=np.int32),
                   "AVG_LOGPROB": np.full((rows, 1), -0.2, dtype=np.float32),
                   "NO_SPEECH_PROB": np.full((rows, 1), 0.01, dtype=np.float32),
                   "ENGINE_SECONDS": np.array([[b"{}"]] * rows, dtype=object)}
        return {name: replies[name] for name in request.requested_output_names()}


def _model(kind: str):
    from whisper_triton.triton_models.transcribe_model import TranscribeModel
    from whisper_triton.triton_models.transcribe_stream_model import TranscribeStreamModel

    cls, name = (TranscribeModel, "transcribe") if kind == "transcribe" else (TranscribeStreamModel, "transcribe_stream")
    instance = cls(pb, pb.model_args(REPOSITORY, name, window_batches_in_flight="1"))
    # what an in-flight engine declares over BLS (no Triton here): one window a request, SLOTS at once
    instance.decoder._capabilities = EngineCapabilities(engine="tensorrt_llm", max_batch_size=8, multilingual=False,
                                                        in_flight_windows=SLOTS)
    return instance


@pytest.fixture(params=["transcribe", "transcribe_stream"])
def served(request):
    """(model, engine): either model, its BLS calls answered by a CountingEngine."""
    instance = _model(request.param)
    engine = CountingEngine(instance.tokenizer)
    instance.decoder._exec = engine
    yield instance, engine
    instance.close()


def _noise(seconds: float) -> bytes:
    samples = np.random.default_rng(3).normal(0, 0.1, int(seconds * 16000)).astype(np.float32)
    return encode(samples, 16000, "wav", "pcm_s16le")


def _request(audio: bytes, options: dict | None = None) -> pb.InferenceRequest:
    return pb.InferenceRequest([pb.Tensor("AUDIO", np.array([audio], dtype=object)),
                                pb.Tensor("OPTIONS", np.array([json.dumps(options or {}).encode()], dtype=object))])


def _settled(model, request: pb.InferenceRequest) -> None:
    """Waits (bounded) for the final response and for the scheduler to have sent or dropped every row."""
    assert request.sender.done.wait(60), "no final response within 60 s"
    for _ in range(600):
        if model.router.scheduler.queued() == 0:
            return
        threading.Event().wait(0.05)
    raise AssertionError("the window scheduler still holds rows 30 s after the answer")


def _cancelled_quietly(model, request: pb.InferenceRequest) -> None:
    """The answer to a cancelled request: a 499 error (transcribe) or the stream closed (transcribe_stream)."""
    last, flags = request.sender.sent[-1]
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    if model.__class__.__name__ == "TranscribeModel":
        assert decode_error(last.error().message()).status == 499
    else:
        assert last is None  # the stream closed without another chunk or an error


def test_the_engine_stops_getting_windows_of_a_cancelled_request(served):
    model, engine = served
    engine.cancel_after = 2
    request = _request(_noise(80), MANY_WINDOWS)  # 16 windows
    engine.on = request
    model.execute([request])
    _settled(model, request)
    # the windows already running finish; those queued are dropped unsent (on main: all 16, then it stopped)
    assert engine.windows <= 2 + SLOTS, f"{engine.windows} of 16 windows decoded after the cancellation"
    assert model.router.scheduler.dropped >= 16 - 2 - SLOTS - 1  # the stream's first chunk is one window
    _cancelled_quietly(model, request)


def test_vad_stops_within_a_block_of_a_cancelled_request(served, monkeypatch):
    from whisper_triton.pipeline import vad

    model, engine = served
    real = vad._session()
    runs: list[int] = []
    request = _request(_noise(300), {"batch_size": 16})  # 300 s: about 25 VAD blocks, in sections

    class Counting:
        def run(self, *args, **kwargs):
            runs.append(1)
            if len(runs) >= 2:
                request.sender.cancel()  # the client leaves during the second block
            return real.run(*args, **kwargs)

    monkeypatch.setattr(vad, "_session", lambda: Counting())
    model.execute([request])
    _settled(model, request)
    assert len(runs) <= 2 + vad.THREADS, f"{len(runs)} VAD blocks scored after the cancellation (about 25 in all)"
    assert engine.windows == 0
    _cancelled_quietly(model, request)


def test_a_stream_dropped_while_waiting_is_never_decoded_and_the_stream_queue_is_bounded(monkeypatch):
    from whisper_triton.triton_models import transcribe_stream_model as stream_module

    monkeypatch.setattr(stream_module, "MAX_WAITING_STREAMS", 2, raising=False)
    decoded: list[int] = []
    real_decode = stream_module.decode_audio
    monkeypatch.setattr(stream_module, "decode_audio", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    model = _model("transcribe_stream")
    model.decoder._exec = CountingEngine(model.tokenizer)
    model._streams.shutdown(wait=True)
    model._streams = ThreadPoolExecutor(max_workers=1)  # one stream at a time, held busy below
    gate = threading.Event()
    try:
        model._streams.submit(gate.wait, 30)
        waiting = [_request(_noise(1)) for _ in range(2)]
        refused = _request(_noise(1))
        model.execute(waiting + [refused])
        # the third is refused at once: 503, while the two before it wait for the thread
        assert refused.sender.done.is_set() and not any(r.sender.done.is_set() for r in waiting)
        error = decode_error(refused.sender.sent[0][0].error().message())
        assert error.status == 503 and "busy" in error.message
        for request in waiting:
            request.sender.cancel()  # their clients leave while they wait
        gate.set()
        for request in waiting:
            assert request.sender.done.wait(30)
            assert request.sender.sent == [(None, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]
        assert decoded == []  # neither was decoded: no audio work for a stream nobody reads
        again = _request(_noise(1))  # the queue has room again
        model.execute([again])
        assert again.sender.done.wait(60) and again.sender.sent[-1][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        assert json.loads(again.sender.sent[-1][0].output_tensors()[0].as_numpy()[0])["done"] is True
    finally:
        gate.set()
        model.close()
