"""The `transcribe` model's answer contract, in-process (no server): `execute` returns at once and
every request gets exactly one final response through its sender; beyond the waiting bound a
request is refused at once with 503, and the others are still answered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fake_pb_utils as pb
from speech import encode
from whisper_triton.contract.tensors import decode_error

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm"


@pytest.fixture
def model():
    from whisper_triton.triton_models.transcribe_model import TranscribeModel

    from whisper_triton.contract.capabilities import EngineCapabilities

    instance = TranscribeModel(pb, pb.model_args(REPOSITORY, "transcribe", max_concurrent_files="2"))
    # what whisper_window would declare over BLS (there is no Triton here; no request below reaches the engine)
    instance.decoder._capabilities = EngineCapabilities(engine="ctranslate2", max_batch_size=8, multilingual=False)
    yield instance
    instance.close()


def _wav(samples: np.ndarray) -> bytes:
    return encode(samples, 16000, "wav", "pcm_s16le")


def _request(audio: bytes, options: dict | None = None) -> pb.InferenceRequest:
    return pb.InferenceRequest([pb.Tensor("AUDIO", np.array([audio], dtype=object)),
                                pb.Tensor("OPTIONS", np.array([json.dumps(options or {}).encode()], dtype=object))])


def test_every_request_gets_exactly_one_final_response_and_execute_returns_at_once(model):
    requests = [_request(_wav(np.zeros(16000, np.float32))), _request(b"not audio at all"),
                _request(_wav(np.zeros(8000, np.float32)), {"beam_size": 99})]
    assert model.execute(requests) is None
    for request in requests:
        assert request.sender.done.wait(30)
        assert len(request.sender.sent) == 1 and request.sender.sent[0][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    silent, not_audio, bad_beam = (r.sender.sent[0][0] for r in requests)
    # digital silence never reaches the engine (no BLS needed here): an empty transcript
    assert not silent.has_error()
    assert json.loads(silent.output_tensors()[0].as_numpy()[0])["text"] == ""
    assert decode_error(not_audio.error().message()).param == "audio"
    assert decode_error(bad_beam.error().message()).param == "beam_size"


def test_beyond_the_waiting_bound_a_request_is_refused_at_once_with_503(model, monkeypatch):
    from whisper_triton.triton_models import transcribe_model

    monkeypatch.setattr(transcribe_model, "MAX_WAITING_FILES", 0)
    request = _request(_wav(np.zeros(16000, np.float32)))
    assert model.execute([request]) is None
    assert request.sender.done.is_set()  # answered inside execute, before any thread ran
    error = decode_error(request.sender.sent[0][0].error().message())
    assert error.status == 503 and "busy" in error.message
