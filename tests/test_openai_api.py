"""OpenAI's audio API on a real `serve`, with the unmodified `openai` SDK as the client: every
response format, both endpoints, word timestamps, streaming (SSE), /v1/models, and errors raised
as the SDK's own exception classes. Also /metrics scraped after these requests."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from jiwer import wer

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def client(serve):
    # max_retries=0: a 429/5xx must surface here, not be retried away
    return openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def clip(speech_clips):
    return speech_clips[0]


def normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_models_lists_the_served_model_and_the_alias(client):
    ids = [model.id for model in client.models.list()]
    assert "whisper-1" in ids and ids[0] == "whisper-tiny.en"
    assert client.models.retrieve("whisper-1").id == "whisper-1"


def test_json_and_text(client, clip):
    with clip.wav_path.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert wer(normalized(clip.text), normalized(result.text)) < 0.2
    with clip.wav_path.open("rb") as f:
        text = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, response_format="text")
    assert isinstance(text, str) and normalized(text) == normalized(result.text)


def test_verbose_json_with_segments_and_words(client, clip):
    with clip.wav_path.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                    timestamp_granularities=["word", "segment"], language="en")
    assert result.language == "english" and result.task == "transcribe"
    assert 3.0 < result.duration < 6.0 and result.segments and result.words
    segment = result.segments[0]
    assert segment.tokens and all(isinstance(t, int) for t in segment.tokens)
    assert 0.0 <= segment.start < segment.end <= result.duration + 0.1 and segment.seek == round(segment.start * 100)
    assert segment.avg_logprob <= 0.0 and 0.0 <= segment.no_speech_prob <= 1.0 and segment.compression_ratio > 0
    words = result.words
    assert normalized(" ".join(w.word for w in words)) == normalized(result.text)
    assert all(w.start <= w.end for w in words) and all(a.start <= b.start for a, b in zip(words, words[1:]))
    with clip.wav_path.open("rb") as f:  # words only: no segments, as OpenAI answers
        words_only = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="verbose_json",
                                                        timestamp_granularities=["word"])
    assert words_only.words and not words_only.segments


def test_subtitles(client, clip):
    with clip.wav_path.open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S", srt)
    with clip.wav_path.open("rb") as f:
        vtt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:0") and "-->" in vtt


def test_stream_sends_deltas_then_done(client, clip):
    with clip.wav_path.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    kinds = [event.type for event in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"} and len(kinds) >= 2
    assert "".join(event.delta for event in events[:-1]).strip() == events[-1].text
    assert wer(normalized(clip.text), normalized(events[-1].text)) < 0.2


def test_translation_on_an_english_only_model_is_refused(client, clip):
    with clip.wav_path.open("rb") as f, pytest.raises(openai.BadRequestError) as caught:
        client.audio.translations.create(model="whisper-1", file=f)
    error = caught.value.body
    assert error["param"] == "model" and "translate" in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("kwargs, param", [
    ({"model": "whisper-large-v9"}, "model"),
    ({"response_format": "mp3"}, "response_format"),
    ({"response_format": "json", "timestamp_granularities": ["word"]}, "timestamp_granularities"),
    ({"response_format": "verbose_json", "timestamp_granularities": ["sentence"]}, "timestamp_granularities"),
    ({"response_format": "srt", "stream": True}, "response_format"),
    ({"language": "xx"}, "language"),
    ({"language": "de"}, "language"),  # the English-only model cannot
    ({"temperature": 3.5}, "temperature"),
    ({"extra_body": {"beam_size": 99}}, "beam_size"),
    ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
])
def test_bad_fields_are_refused_naming_them(client, clip, kwargs, param):
    expected = openai.NotFoundError if param == "model" else openai.BadRequestError
    with clip.wav_path.open("rb") as f, pytest.raises(expected) as caught:
        client.audio.transcriptions.create(file=f, **{"model": "whisper-1", **kwargs})
    assert caught.value.body["param"] == param, caught.value.body
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_bad_audio_and_forms(serve, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio at all" * 10))
    assert caught.value.body["code"] == "invalid_audio"
    url = serve.url + "/v1/audio/transcriptions"
    missing = httpx.post(url, data={"model": "whisper-1"}, files={"other": ("a.txt", b"")}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    none = httpx.post(url, data={"model": "whisper-1"}, files={"x": (None, "y")}, timeout=30)
    assert none.status_code == 400 and "no `file` part" in none.json()["error"]["message"]
    two = httpx.post(url, data={"model": "whisper-1"}, files=[("file", ("a.wav", b"RIFF")), ("file", ("b.wav", b"RIFF"))],
                     timeout=30)
    assert two.status_code == 400 and two.json()["error"]["param"] == "file"
    raw = httpx.post(url, content=b"RIFF....", headers={"Content-Type": "audio/wav"}, timeout=30)
    assert raw.status_code == 415 and raw.json()["error"]["code"] == "unsupported_media_type"


def test_a_body_over_the_cap_is_refused_while_it_streams(serve, client):
    """The SDK gets 413 (APIStatusError); a chunked body without Content-Length is cut off too."""
    big = b"\0" * (6_291_456 + 1024)
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", big))
    assert caught.value.status_code == 413 and caught.value.body["param"] == "file"

    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(8):
            yield b"\0" * 1_048_576

    reply = httpx.post(serve.url + "/v1/audio/transcriptions", content=chunks(), timeout=60,
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "payload_too_large"


def test_unknown_v1_route_is_an_openai_404(serve):
    reply = httpx.get(serve.url + "/v1/nothing", timeout=10)
    assert reply.status_code == 404 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_after_requests(serve, client, clip):
    with clip.wav_path.open("rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    with clip.wav_path.open("rb") as f:
        list(client.audio.transcriptions.create(model="whisper-1", file=f, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.wav", clip.wav_bytes))
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(serve.url + "/metrics", timeout=10).text
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(name: str, **labels) -> float:
        return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    route = "/v1/audio/transcriptions"
    assert value("whisper_http_requests_total", route=route, method="POST", status="200") >= 2
    assert value("whisper_http_requests_total", route=route, status="404") >= 1
    assert value("whisper_errors_total", route=route, type="model_not_found") >= 1
    assert value("whisper_audio_seconds_total", route=route) >= 2 * 3.0
    assert value("whisper_stream_first_segment_seconds_count", route=route) >= 1
    # the work behind the answers (info.work): windows, decodes by kind, seconds per stage
    assert value("whisper_windows_total", route=route) >= 2
    assert value("whisper_window_decodes_total", route=route, kind="first") >= 2
    assert value("whisper_stage_seconds_total", route=route, stage="vad") > 0
    assert value("whisper_stage_seconds_total", route=route, stage="decoder") > 0
    assert value("whisper_http_request_duration_seconds_count", route=route) >= 3
    assert any(s.name == "whisper_http_requests_in_flight" and s.labels["route"] == route for s in samples)
