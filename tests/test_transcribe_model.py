"""The long-form `transcribe` model on a real Triton, and subtitle output over HTTP."""

import json
import threading

import httpx
import numpy as np
import pysrt
import pytest
import tritonclient.grpc as grpcclient
import webvtt
from tritonclient.utils import InferenceServerException

from whisper_triton.pipeline.evaluation import word_error_rate

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve


def transcribe_grpc(url: str, audio: bytes, options: dict | None = None) -> dict:
    with grpcclient.InferenceServerClient(url) as client:
        inputs = [grpcclient.InferInput("AUDIO", [1], "BYTES"), grpcclient.InferInput("OPTIONS", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([audio], dtype=object))
        inputs[1].set_data_from_numpy(np.array([json.dumps(options or {}).encode()], dtype=object))
        result = client.infer("transcribe", inputs, client_timeout=600)
        return json.loads(result.as_numpy("RESULT")[0])


@pytest.fixture(scope="module")
def http_json(serve, long_speech):
    reply = httpx.post(serve.url + "/invocations", content=long_speech.flac_bytes,
                       headers={"Content-Type": "audio/flac"}, timeout=600)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_long_file_over_grpc_equals_http(serve, long_speech, http_json):
    grpc_result = transcribe_grpc(serve.grpc_url, long_speech.flac_bytes)
    assert grpc_result["text"] == http_json["text"]
    assert word_error_rate(long_speech.text, http_json["text"]) <= 0.10
    segment = http_json["segments"][0]
    assert set(segment) >= {"id", "start", "end", "text", "avg_logprob", "compression_ratio", "no_speech_prob"}
    assert http_json["language"] == "en" and http_json["duration"] == pytest.approx(long_speech.duration, abs=0.05)


def test_served_timestamps_follow_the_pauses(http_json, long_speech):
    segments = http_json["segments"]
    starts = np.array([s["start"] for s in segments])
    ends = np.array([s["end"] for s in segments])
    assert np.all(np.diff(starts) > 0) and np.all(starts <= ends) and ends[-1] <= long_speech.duration + 0.01
    for pause_start, pause_end in long_speech.pauses:
        assert np.abs(ends - pause_start).min() <= 0.5 and np.abs(starts - pause_end).min() <= 0.5


def test_windows_of_a_file_are_batched(serve, long_speech):
    with grpcclient.InferenceServerClient(serve.grpc_url) as client:
        def stats():
            model = client.get_inference_statistics("whisper_window").model_stats[0]
            return model.inference_count, model.execution_count

        before = stats()
        transcribe_grpc(serve.grpc_url, long_speech.flac_bytes)
        inferences, executions = (a - b for a, b in zip(stats(), before))
    assert inferences >= 5  # one request per window: 3.5 minutes, about 2.5 of them speech
    assert executions < inferences


def test_a_short_file_is_answered_while_a_long_one_is_still_being_decoded(serve, long_speech, speech_clips):
    """The windows of every file meet in one scheduler (earliest deadline first): a short clip sent
    while a long file's windows are being decoded goes into the next batch, ahead of the long file's
    remaining windows. The long file is 32 fixed windows decoded in one round (no timestamps, no
    fallback: four engine batches, one after another); the short clip is sent once the first batch
    has run."""
    from speech import encode

    long_flac = encode(np.tile(long_speech.samples, 5)[: 960 * 16000], 16000, "flac", "flac")
    one_round = {"vad": False, "without_timestamps": True, "temperature": 0}
    short = speech_clips[0]
    assert transcribe_grpc(serve.grpc_url, short.wav_bytes)["text"]  # the engine's capabilities are known now
    finished: list[str] = []
    results: dict[str, dict] = {}

    def send(name: str, audio: bytes, options: dict | None = None) -> None:
        results[name] = transcribe_grpc(serve.grpc_url, audio, options)
        finished.append(name)

    with grpcclient.InferenceServerClient(serve.grpc_url) as client:
        def executions() -> int:
            return client.get_inference_statistics("whisper_window").model_stats[0].execution_count

        before = executions()
        long_thread = threading.Thread(target=send, args=("long", long_flac, one_round))
        long_thread.start()
        for _ in range(2400):  # until the long file's first batch has run (bounded: 2 minutes)
            if executions() > before or not long_thread.is_alive():
                break
            threading.Event().wait(0.05)
    send("short", short.wav_bytes)
    long_thread.join(timeout=600)
    assert finished == ["short", "long"]
    assert word_error_rate(short.text, results["short"]["text"]) <= 0.2
    assert len(results["long"]["text"].split()) > 1000


def _covered(cues: list[tuple[float, float]], duration: float, pauses) -> float:
    speech = duration - sum(end - start for start, end in pauses)
    return sum(end - start for start, end in cues) / speech


def test_srt_and_vtt_parse_and_cover_the_speech(serve, long_speech, http_json):
    srt = httpx.post(serve.url + "/invocations", content=long_speech.flac_bytes,
                     headers={"Content-Type": "audio/flac", "Accept": "application/x-subrip"}, timeout=600)
    vtt = httpx.post(serve.url + "/invocations", content=long_speech.flac_bytes,
                     headers={"Content-Type": "audio/flac", "Accept": "text/vtt"}, timeout=600)
    assert srt.status_code == vtt.status_code == 200
    assert vtt.headers["content-type"].startswith("text/vtt")
    subtitles = pysrt.from_string(srt.text)
    captions = webvtt.from_string(vtt.text)
    assert len(subtitles) == len(captions) == len(http_json["segments"])
    srt_cues = [(s.start.ordinal / 1000, s.end.ordinal / 1000) for s in subtitles]
    vtt_cues = [(_seconds(c.start), _seconds(c.end)) for c in captions]
    assert np.allclose(srt_cues, vtt_cues, atol=0.002)
    assert _covered(srt_cues, long_speech.duration, long_speech.pauses) >= 0.9
    text = " ".join(s.text for s in subtitles)
    assert word_error_rate(long_speech.text, text) <= 0.10


def _seconds(clock: str) -> float:
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_word_timestamps_over_http(serve, speech_clips):
    reply = httpx.post(serve.url + "/invocations?word_timestamps=true", content=speech_clips[1].wav_bytes,
                       headers={"Content-Type": "audio/wav"}, timeout=120)
    words = [w for s in reply.json()["segments"] for w in s["words"]]
    assert len(words) >= 8 and all(w["start"] <= w["end"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def test_silence_and_noise_over_grpc(serve):
    from speech import encode

    silence = encode(np.zeros(16000 * 20, np.float32), 16000, "wav", "pcm_s16le")
    noise = encode((np.random.default_rng(5).standard_normal(16000 * 20) * 0.05).astype(np.float32), 16000, "flac", "flac")
    assert transcribe_grpc(serve.grpc_url, silence)["text"] == ""
    assert len(transcribe_grpc(serve.grpc_url, noise)["text"].split()) <= 3


@pytest.mark.parametrize("options, param", [
    ({"chunk_length": 45}, "chunk_length"),
    ({"batch_size": 0}, "batch_size"),
    ({"log_prob_threshold": "low"}, "log_prob_threshold"),
    ({"language": "de"}, "language"),
])
def test_bad_options_over_grpc_name_the_parameter(serve, speech_clips, options, param):
    with pytest.raises(InferenceServerException) as info:
        transcribe_grpc(serve.grpc_url, speech_clips[0].wav_bytes, options)
    assert f'"param": "{param}"' in info.value.message()


@pytest.mark.parametrize("model", ["whisper", "transcribe"])
def test_grpc_benchmark_client(serve, speech_clips, tmp_path, model):
    from whisper_triton.clients.grpc_benchmark import main

    folder = tmp_path / "clips"
    folder.mkdir()
    for index, clip in enumerate(speech_clips[:4]):
        (folder / f"clip{index}.wav").write_bytes(clip.wav_bytes)
        (folder / f"clip{index}.txt").write_text(clip.text)
    output = tmp_path / "report.json"
    assert main([str(folder), "--url", serve.grpc_url, "--model", model, "--concurrency", "1", "4",
                 "--output", str(output)]) == 0
    levels = json.loads(output.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    audio = sum(clip.samples.size / 16000 for clip in speech_clips[:4])
    for report in levels:
        assert report["files"] == 4 and report["wer"] <= 0.15
        assert report["audio_seconds"] == pytest.approx(audio, rel=1e-6)
        assert report["rtfx"] == pytest.approx(report["audio_seconds"] / report["wall_seconds"])
        latency = report["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] <= 1000 * report["wall_seconds"]
        assert set(report["transcripts"]) == {f"clip{i}.wav" for i in range(4)}
    picture = output.with_suffix(".png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_benchmark_percentiles():
    from whisper_triton.clients.grpc_benchmark import latency_summary, percentile

    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile([7.0], 99) == 7.0 and percentile([1.0, 2.0], 50) == 1.0
    summary = latency_summary([0.3, 0.1, 0.2])
    assert summary == {"p50": 200.0, "p90": 300.0, "p99": 300.0, "max": 300.0}


# the same options as HTTP query strings and as the transcribe model's OPTIONS JSON (strings, as a
# caller copying a query string into JSON sends them): one request model, one answer
PARITY_CASES = [
    {"beam_size": "3"},
    {"prompt": "The weather report."},
    {"vad_threshold": "1.0"},
    {"beam_size": "0"},
    {"colour": "red"},
    {"temperature": "0,0.4", "word_timestamps": "true"},
]


@pytest.mark.parametrize("options", PARITY_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_options_same_answer_over_http_and_grpc(serve, speech_clips, options):
    from whisper_triton.contract.tensors import decode_error

    reply = httpx.post(serve.url + "/invocations", params=options, content=speech_clips[0].wav_bytes,
                       headers={"Content-Type": "audio/wav"}, timeout=120)
    try:
        grpc = ("ok", transcribe_grpc(serve.grpc_url, speech_clips[0].wav_bytes, options)["text"])
    except InferenceServerException as exc:
        error = decode_error(exc.message())
        grpc = (error.status, error.param, error.message)
    if reply.status_code == 200:
        assert grpc == ("ok", reply.json()["text"])
    else:
        body = reply.json()["error"]
        assert grpc == (reply.status_code, body["param"], body["message"])
