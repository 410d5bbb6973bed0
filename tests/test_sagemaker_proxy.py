"""The SageMaker contract of a real `serve`: formats, options, bad input, and staying up."""

import base64

import httpx
import numpy as np
import pytest

from speech import FORMATS, encode
from whisper_triton.pipeline.evaluation import word_error_rate

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve


@pytest.fixture(scope="module")
def http(serve):
    with httpx.Client(base_url=serve.url, timeout=60) as client:
        yield client


def check_still_serving(http, clip):
    reply = http.post("/invocations", content=clip.wav_bytes, headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 200
    assert word_error_rate(clip.text, reply.json()["text"]) <= 0.15


def test_ping(http):
    reply = http.get("/ping")
    assert reply.status_code == 200


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_transcribes(http, speech_clips, name):
    container, codec, channels, rate = FORMATS[name]
    clip = speech_clips[3]
    body = encode(clip.samples, 16000, container, codec, channels, rate)
    reply = http.post("/invocations", content=body, headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    payload = reply.json()
    assert word_error_rate(clip.text, payload["text"]) <= 0.15, payload
    assert payload["language"] == "en"
    assert payload["duration"] == pytest.approx(clip.samples.size / 16000, abs=0.15)


def test_json_body_and_text_plain(http, speech_clips):
    clip = speech_clips[4]
    body = {"audio": base64.b64encode(clip.wav_bytes).decode(), "language": "en", "task": "transcribe"}
    reply = http.post("/invocations", json=body, headers={"Accept": "text/plain"})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert word_error_rate(clip.text, reply.text) <= 0.15


def test_options_from_query_and_custom_attributes(http, speech_clips):
    clip = speech_clips[5]
    reply = http.post("/invocations?beam_size=3", content=clip.wav_bytes,
                      headers={"Content-Type": "audio/wav", "X-Amzn-SageMaker-Custom-Attributes": "max_new_tokens=4"})
    assert reply.status_code == 200
    assert 1 <= len(reply.json()["text"].split()) <= 4


def test_silent_audio_is_not_an_error(http):
    silence = encode(np.zeros(16000 * 3, dtype=np.float32), 16000, "wav", "pcm_s16le")
    reply = http.post("/invocations", content=silence, headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 200 and reply.json()["text"] == ""


def _bad_inputs(clip):
    wav = clip.wav_bytes
    b64 = base64.b64encode(wav).decode()
    return {
        "empty body": (b"", {"Content-Type": "audio/wav"}, 400, "audio"),
        "not audio": (b"this is plain text, not audio" * 10, {"Content-Type": "audio/wav"}, 400, "audio"),
        "truncated": (wav[:44], {"Content-Type": "audio/wav"}, 400, "audio"),
        "wrong content type": (wav, {"Content-Type": "text/csv"}, 415, "Content-Type"),
        "malformed json": (b'{"audio": ', {"Content-Type": "application/json"}, 400, "body"),
        "json without audio": (b'{"language": "en"}', {"Content-Type": "application/json"}, 400, "audio"),
        "bad base64": (b'{"audio": "%%%not-base64%%%"}', {"Content-Type": "application/json"}, 400, "audio"),
        "unknown language": (('{"audio": "%s", "language": "xx"}' % b64).encode(),
                             {"Content-Type": "application/json"}, 400, "language"),
        "english-only model asked for german": (('{"audio": "%s", "language": "de"}' % b64).encode(),
                                                 {"Content-Type": "application/json"}, 400, "language"),
        "translate on english-only": (('{"audio": "%s", "task": "translate"}' % b64).encode(),
                                      {"Content-Type": "application/json"}, 400, "task"),
        "unknown option": (('{"audio": "%s", "colour": "red"}' % b64).encode(),
                           {"Content-Type": "application/json"}, 400, "colour"),
        "unsupported accept": (wav, {"Content-Type": "audio/wav", "Accept": "image/png"}, 406, "Accept"),
        "chunk length zero": (('{"audio": "%s", "chunk_length": 0}' % b64).encode(),
                              {"Content-Type": "application/json"}, 400, "chunk_length"),
        "batch size zero": (('{"audio": "%s", "batch_size": 0}' % b64).encode(),
                            {"Content-Type": "application/json"}, 400, "batch_size"),
        "negative threshold": (('{"audio": "%s", "no_speech_threshold": -1}' % b64).encode(),
                               {"Content-Type": "application/json"}, 400, "no_speech_threshold"),
    }


BAD_INPUT_NAMES = ["empty body", "not audio", "truncated", "wrong content type", "malformed json",
                   "json without audio", "bad base64", "unknown language", "english-only model asked for german",
                   "translate on english-only", "unknown option", "unsupported accept", "chunk length zero",
                   "batch size zero", "negative threshold"]


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_gets_a_clear_json_error(http, speech_clips, case):
    body, headers, status, param = _bad_inputs(speech_clips[0])[case]
    reply = http.post("/invocations", content=body, headers=headers)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    check_still_serving(http, speech_clips[0])


@pytest.mark.parametrize("beam_size", [0, 1000])
def test_out_of_range_beam_size(http, speech_clips, beam_size):
    reply = http.post(f"/invocations?beam_size={beam_size}", content=speech_clips[0].wav_bytes,
                      headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "beam_size"


def test_audio_over_30_seconds_is_transcribed_whole(http, speech_clips):
    pause = np.zeros(16000, np.float32)
    audio = np.concatenate([part for clip in speech_clips * 2 for part in (clip.samples, pause)])
    body = encode(audio, 16000, "flac", "flac")
    reply = http.post("/invocations", content=body, headers={"Content-Type": "audio/flac"})
    assert reply.status_code == 200
    payload = reply.json()
    assert payload["duration"] > 30
    assert word_error_rate(" ".join(clip.text for clip in speech_clips * 2), payload["text"]) <= 0.15
    check_still_serving(http, speech_clips[0])


def test_body_over_the_cap_gets_413_before_being_read(http, speech_clips):
    reply = http.post("/invocations", content=b"\0" * (6_291_456 + 1), headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 413 and reply.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: the cap applies while streaming
        for _ in range(7):
            yield b"\0" * 1_000_000

    reply = http.post("/invocations", content=chunks(), headers={"Content-Type": "audio/wav"})
    assert reply.status_code == 413
    check_still_serving(http, speech_clips[0])


def test_unknown_route_is_json(http):
    reply = http.get("/nope")
    assert reply.status_code == 404 and "error" in reply.json()


def test_bad_requests_among_concurrent_good_ones_lose_nothing(serve, speech_clips):
    from concurrent.futures import ThreadPoolExecutor

    good = [(clip.wav_bytes, clip.text) for clip in speech_clips]
    bad = [(b"RIFF\x00\x00garbage that is not audio" * 20, None), (speech_clips[0].wav_bytes[:60], None)]
    jobs = good[:3] + bad[:1] + good[3:] + bad[1:]

    def post(job):
        body, text = job
        with httpx.Client(base_url=serve.url, timeout=120) as client:
            reply = client.post("/invocations", content=body, headers={"Content-Type": "audio/wav"})
            return reply.status_code, reply.json(), text

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(post, jobs))
    for status, payload, text in results:
        if text is None:
            assert status == 400 and payload["error"]["type"] == "invalid_audio"
        else:
            assert status == 200 and word_error_rate(text, payload["text"]) <= 0.15
