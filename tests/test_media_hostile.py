"""Bodies that make the decoder do more than decode the audio in them (issue 21, items 1 and 2):
FFmpeg demuxers that reach outside the body (SDP, ffconcat, playlists), sample rates and channel
counts that multiply the work per byte, and options that multiply windows or decodes.

Unit tests on `decode_audio` and `parse_options` (each well under a second), then the same bodies
through the shared real `serve` (default settings), which must answer a normal request afterwards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import wave

import av
import httpx
import numpy as np
import pytest

from whisper_triton.contract.options import MAX_WINDOW_DECODES, parse_options
from whisper_triton.errors import InvalidAudioError, PayloadTooLargeError, WhisperTritonError
from whisper_triton.pipeline import audio
from whisper_triton.pipeline.audio import NOT_AUDIO, SAMPLE_RATE, decode_audio

SDP = (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 5004 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n#EXT-X-ENDLIST\n"


def ffconcat(name: str) -> bytes:
    return f"ffconcat version 1.0\nfile '{name}'\n".encode()


def wav(rate: int, frames: int, channels: int = 1, width: int = 1) -> bytes:
    """A PCM WAV of silence (8-bit: 1 byte a sample) with whatever header values a client chose."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes((b"\x80" if width == 1 else b"\x00" * width) * frames * channels)
    return buffer.getvalue()


def tone_wav(rate: int = SAMPLE_RATE, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return buffer.getvalue()


def refused(data: bytes, **kwargs) -> WhisperTritonError:
    with pytest.raises(WhisperTritonError) as info:
        decode_audio(data, **kwargs)
    return info.value


# ---- decoder reach ---------------------------------------------------------------------------


@pytest.fixture
def beside_a_wav(tmp_path, monkeypatch):
    """The process runs in a folder that holds a readable WAV (as a stub runs beside the repository)."""
    (tmp_path / "speech.wav").write_bytes(tone_wav())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("body", [
    SDP, ffconcat("speech.wav"), ffconcat("missing.wav"), ffconcat("/etc/hostname"), HLS,
    b"hello, this is not audio", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
], ids=["sdp", "ffconcat-existing", "ffconcat-missing", "ffconcat-absolute", "hls", "text", "png"])
def test_bodies_that_name_other_inputs_get_one_fixed_message(body, beside_a_wav):
    """SDP bound UDP ports and waited; an ffconcat list read a WAV beside the process (and told an
    existing file from a missing one); every such body is now the same 400, FFmpeg's text never shown."""
    error = refused(body, max_seconds=60)
    assert isinstance(error, InvalidAudioError) and error.status == 400 and error.param == "audio"
    assert error.message == NOT_AUDIO


def test_the_containers_of_a_body_are_checked_against_the_list_after_opening(monkeypatch):
    """A FFmpeg build that ignored `format_whitelist` would still be caught by the check after opening."""
    monkeypatch.setattr(audio, "_CONTAINMENT", {"protocol_whitelist": "none"})  # FFmpeg's own check off
    monkeypatch.setattr(audio, "AUDIO_DEMUXERS", ("flac",))
    assert refused(tone_wav()).message == NOT_AUDIO


# ---- work per byte: sample rate, channels, streams, output before each resample ----------------


class CountingResampler:
    """av.AudioResampler that counts the samples it hands out (what the decoder holds in memory)."""

    produced = 0

    def __init__(self, **kwargs):
        self._inner = av_resampler(**kwargs)

    def resample(self, frame):
        frames = self._inner.resample(frame)
        CountingResampler.produced += sum(f.samples for f in frames)
        return frames


av_resampler = av.AudioResampler


@pytest.fixture
def counted(monkeypatch):
    CountingResampler.produced = 0
    monkeypatch.setattr(av, "AudioResampler", CountingResampler)
    return CountingResampler


def test_a_1_hz_wav_is_refused_before_anything_is_resampled(counted):
    """The issue's body: 16 KB of 8-bit samples at 1 Hz (4.4 hours at 16 kHz, 1 GB of float32)."""
    error = refused(wav(1, 16_000), max_seconds=14_400)
    assert error.status == 400 and error.param == "audio" and "sample rate" in error.message
    assert counted.produced == 0


@pytest.mark.parametrize("rate", [audio.MIN_SAMPLE_RATE - 1, audio.MAX_SAMPLE_RATE + 1])
def test_a_rate_outside_the_range_is_refused(rate):
    error = refused(wav(rate, 100))
    assert error.status == 400 and error.param == "audio" and f"{rate} Hz" in error.message


def test_the_lowest_rate_and_telephony_pass():
    assert decode_audio(wav(audio.MIN_SAMPLE_RATE, audio.MIN_SAMPLE_RATE)).size == SAMPLE_RATE
    assert decode_audio(wav(8_000, 8_000)).size == SAMPLE_RATE


def test_the_duration_cap_holds_in_output_samples_before_each_resample(counted):
    """200 s at the lowest rate (16x growth per sample), capped at 10 s: refused before the resampler
    is handed more than 10 s of audio (it was handed 16 s blocks, then checked)."""
    with pytest.raises(PayloadTooLargeError):
        decode_audio(wav(audio.MIN_SAMPLE_RATE, 200 * audio.MIN_SAMPLE_RATE), max_seconds=10)
    assert counted.produced <= 10 * SAMPLE_RATE


def test_the_1_hz_wav_does_not_grow_the_process():
    """Peak memory of a fresh process decoding the issue's body with the service's 4 h cap."""
    script = textwrap.dedent("""
        import io, resource, wave
        from whisper_triton.pipeline.audio import decode_audio
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as w:
            w.setnchannels(1); w.setsampwidth(1); w.setframerate(1); w.writeframes(b"\\x80" * 16000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcome = "decoded"
        try:
            decode_audio(buffer.getvalue(), max_seconds=14400)
        except Exception as exc:  # MemoryError too: an allocation refused is no answer
            outcome = type(exc).__name__
        print(outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, grown_kb = done.stdout.split()[-2:]
    assert outcome == "InvalidAudioError"  # a 413 after 4 h of audio was decoded before
    assert int(grown_kb) < 64 * 1024  # it grew by about 7 GB (ru_maxrss, 50 s) before


def test_more_channels_than_the_cap_are_refused():
    error = refused(wav(16_000, 100, channels=audio.MAX_CHANNELS + 1))
    assert error.status == 400 and error.param == "audio" and "channels" in error.message
    assert decode_audio(wav(16_000, 1_600, channels=audio.MAX_CHANNELS)).size == 1_600


def _matroska_with_audio_streams(count: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as output:
        streams = [output.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono") for _ in range(count)]
        for stream in streams:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1_600), dtype=np.int16), format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in stream.encode(frame) + stream.encode(None):
                output.mux(packet)
    return buffer.getvalue()


def test_more_audio_streams_than_the_cap_are_refused():
    assert decode_audio(_matroska_with_audio_streams(2)).size == 1_600
    error = refused(_matroska_with_audio_streams(audio.MAX_AUDIO_STREAMS + 1))
    assert error.status == 400 and error.param == "audio" and "audio streams" in error.message


def test_a_codec_without_a_decoder_is_a_400():
    """WAV format tag 0 (found by FUZZ_EXAMPLES=1500): PyAV gives the stream no codec context."""
    data = bytearray(tone_wav())
    data[20:22] = b"\x00\x00"
    error = refused(bytes(data))
    assert error.status == 400 and error.param == "audio"


# ---- options that multiply windows or decodes ---------------------------------------------------


def option_refused(raw: dict) -> WhisperTritonError:
    with pytest.raises(WhisperTritonError) as info:
        parse_options(raw)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("value", [0.0001, 1 / 32_000, 0.5, "0.99"])
def test_chunk_length_below_one_second_is_refused(value):
    assert option_refused({"chunk_length": value}).param == "chunk_length"


def test_chunk_length_of_one_second_is_accepted():
    assert parse_options({"chunk_length": 1, "vad": False}).chunk_length == 1.0


@pytest.mark.parametrize("raw, param", [
    ({"beam_size": 16, "temperature": "0,0.2,0.4,0.6,0.8,1.0,1.2"}, "temperature"),
    ({"temperature": [0.0] * 16, "beam_size": 7}, "temperature"),
    ({"beam_size": 16, "temperature": ",".join(["0.5"] * 7)}, "temperature"),
])
def test_temperatures_times_beams_above_the_ceiling_are_refused(raw, param):
    error = option_refused(raw)
    assert error.param == param and str(MAX_WINDOW_DECODES) in error.message


def test_the_defaults_at_the_largest_beam_are_within_the_ceiling():
    assert parse_options({"beam_size": 16}).beam_size == 16
    assert len(parse_options({"temperature": [0.0] * 16, "beam_size": 6}).temperature) == 16


# ---- through a real serve ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(serve):
    with httpx.Client(base_url=serve.url, timeout=120) as client:
        yield client


def _error(reply: httpx.Response) -> dict:
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:500])
    return reply.json()["error"]


@pytest.mark.triton
def test_serve_refuses_bodies_that_reach_outside_with_one_message(http, speech_clips):
    """SDP and ffconcat bodies (one naming a file in the serve's working directory, the repository
    root, one naming a missing file): the same fast 400, then a normal request is served."""
    messages = set()
    for body in (SDP, ffconcat("README.md"), ffconcat("pyproject.toml"), ffconcat("missing.wav"), HLS):
        error = _error(http.post("/invocations", content=body, headers={"Content-Type": "audio/wav"}))
        assert error["param"] == "audio"
        messages.add(error["message"])
    assert messages == {NOT_AUDIO}
    ok = http.post("/invocations", content=speech_clips[0].wav_bytes, headers={"Content-Type": "audio/wav"})
    assert ok.status_code == 200 and ok.json()["text"].strip()


@pytest.mark.triton
def test_serve_refuses_a_1_hz_wav_naming_audio(http, speech_clips):
    error = _error(http.post("/invocations", content=wav(1, 16_000), headers={"Content-Type": "audio/wav"}))
    assert error["param"] == "audio" and "sample rate" in error["message"]
    ok = http.post("/invocations", content=speech_clips[1].wav_bytes, headers={"Content-Type": "audio/wav"})
    assert ok.status_code == 200 and ok.json()["text"].strip()


@pytest.mark.triton
def test_serve_refuses_a_tiny_chunk_length_on_every_route(http, speech_clips):
    body = speech_clips[0].wav_bytes
    query = http.post("/invocations?vad=false&chunk_length=0.0001", content=body,
                      headers={"Content-Type": "audio/wav"})
    assert _error(query)["param"] == "chunk_length"
    import base64

    as_json = http.post("/invocations", headers={"Content-Type": "application/json"}, content=json.dumps(
        {"audio": base64.b64encode(body).decode(), "vad": False, "chunk_length": 0.00001}))
    assert _error(as_json)["param"] == "chunk_length"
    openai = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", body, "audio/wav")},
                       data={"model": "whisper-1", "chunk_length": "0.0001", "vad": "false"})
    assert _error(openai)["param"] == "chunk_length"
    ok = http.post("/invocations?vad=false&chunk_length=1", content=body, headers={"Content-Type": "audio/wav"})
    assert ok.status_code == 200 and ok.json()["text"].strip()
