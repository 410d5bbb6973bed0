"""`whisper_window` request handling in-process (no server): only the requested outputs are computed,
language outputs alone run detection and not `generate`, CAPABILITIES alone calls no engine."""

import json
from pathlib import Path

import numpy as np
import pytest

import fake_pb_utils as pb
from whisper_triton.contract.capabilities import EngineCapabilities
from whisper_triton.contract.tensors import decode_error

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm"


@pytest.fixture(scope="module")
def model():
    from whisper_triton.triton_models.window_model import WindowModel

    window = WindowModel(pb, pb.model_args(REPOSITORY, "whisper_window", cpu_threads="2"))
    engine = window.short.decoder.engine
    window.calls = []
    for name in ("generate", "detect_language", "encode"):
        real = getattr(engine, name)
        setattr(engine, name, (lambda real, name: lambda *a, **k: window.calls.append(name) or real(*a, **k))(real, name))
    return window


def request(audio: np.ndarray | None, outputs: list[str], **extra) -> pb.InferenceRequest:
    tensors = [] if audio is None else [pb.Tensor("WAV", audio.reshape(1, -1).astype(np.float32))]
    tensors += [pb.Tensor(name, value) for name, value in extra.items()]
    return pb.InferenceRequest(tensors, outputs)


def outputs(response) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def test_capabilities_alone_call_no_engine(model):
    model.calls.clear()
    reply = outputs(model.execute([request(np.zeros(1), ["CAPABILITIES"])])[0])
    assert set(reply) == {"CAPABILITIES"}
    capabilities = EngineCapabilities.from_json(reply["CAPABILITIES"].reshape(-1)[0])
    assert capabilities.engine == "ctranslate2" and capabilities.word_timestamps and model.calls == []


def test_language_alone_runs_detection_not_generate(model, speech_clips):
    model.calls.clear()
    reply = outputs(model.execute([request(speech_clips[0].samples, ["LANGUAGE_PROBS", "LANGUAGE"])])[0])
    assert set(reply) == {"LANGUAGE_PROBS", "LANGUAGE"}
    assert json.loads(reply["LANGUAGE_PROBS"].reshape(-1)[0]) == {"en": 1.0}
    assert "generate" not in model.calls


def test_only_requested_outputs_come_back(model, speech_clips):
    model.calls.clear()
    reply = outputs(model.execute([request(speech_clips[0].samples, ["TRANSCRIPTS"])])[0])
    assert set(reply) == {"TRANSCRIPTS"} and reply["TRANSCRIPTS"].reshape(-1)[0].decode().strip()
    assert model.calls.count("generate") == 1 and model.calls.count("encode") == 1


def test_one_batch_mixes_detection_and_decoding(model, speech_clips):
    model.calls.clear()
    replies = model.execute([request(speech_clips[0].samples, ["LANGUAGE"]),
                             request(speech_clips[1].samples, ["TRANSCRIPTS", "TOKENS"])])
    assert set(outputs(replies[0])) == {"LANGUAGE"} and set(outputs(replies[1])) == {"TRANSCRIPTS", "TOKENS"}


def test_bad_rows_get_errors_the_other_side_reads(model, speech_clips):
    nan = speech_clips[0].samples.copy()
    nan[100] = np.nan
    too_long = np.zeros(16000 * 31, np.float32)
    bad_options = request(speech_clips[0].samples, ["TRANSCRIPTS"],
                          DECODE_OPTIONS=np.array([[b'{"beam_size": 99}']], dtype=object))
    replies = model.execute([request(nan, ["TRANSCRIPTS"]), request(too_long, ["TRANSCRIPTS"]), bad_options,
                             request(speech_clips[0].samples, ["TRANSCRIPTS"])])
    errors = [decode_error(r.error().message()) for r in replies[:3]]
    assert [(e.status, e.param) for e in errors] == [(400, "WAV"), (413, "WAV"), (400, "beam_size")]
    assert outputs(replies[3])["TRANSCRIPTS"].reshape(-1)[0]  # the good request in the same batch is served
