import io
import wave

import numpy as np
import pytest

from speech import FORMATS, encode
from whisper_triton.audio import SAMPLE_RATE, decode_audio
from whisper_triton.errors import InvalidAudioError, PayloadTooLargeError


def _tone(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_common_format_decodes_to_16k_mono(name, speech_clips):
    container, codec, channels, rate = FORMATS[name]
    reference = speech_clips[0].samples
    data = encode(reference, SAMPLE_RATE, container, codec, channels, rate)
    decoded = decode_audio(data)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    # lossy codecs add priming/padding of up to a few frames; the duration must still match
    assert abs(decoded.size - reference.size) / SAMPLE_RATE < 0.12
    assert np.max(np.abs(decoded)) > 0.05


def test_resamples_and_downmixes_by_content():
    tone = _tone(2.0, 44100)
    decoded = decode_audio(encode(tone, 44100, "wav", "pcm_s16le", 2, 44100))
    assert abs(decoded.size - 2 * SAMPLE_RATE) <= 2
    spectrum = np.abs(np.fft.rfft(decoded))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / decoded.size - 440.0) < 2.0


@pytest.mark.parametrize("data", [b"", b"hello, this is not audio", b"\x00" * 1000, b"RIFF\x00\x00\x00\x00WAVE"])
def test_non_audio_bytes_are_refused(data):
    with pytest.raises(InvalidAudioError) as info:
        decode_audio(data)
    assert info.value.status == 400 and info.value.message


def test_truncated_file_is_refused(speech_clips):
    data = speech_clips[0].wav_bytes
    with pytest.raises(InvalidAudioError):
        decode_audio(data[:40])  # the header alone, cut short


def test_file_cut_mid_frame_is_refused_as_truncated(speech_clips):
    full = encode(speech_clips[0].samples, SAMPLE_RATE, "flac", "flac", 1, 16000)
    with pytest.raises(InvalidAudioError) as info:
        decode_audio(full[: len(full) // 2])
    assert "truncated" in info.value.message


def test_zero_length_audio_is_refused():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:  # a valid WAV header with no samples
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
    empty_wav = buffer.getvalue()
    with pytest.raises(InvalidAudioError):
        decode_audio(empty_wav)


def test_duration_limit_stops_decoding():
    data = encode(_tone(5.0), SAMPLE_RATE, "wav", "pcm_s16le")
    assert decode_audio(data, max_seconds=5.5).size == 5 * SAMPLE_RATE
    with pytest.raises(PayloadTooLargeError) as info:
        decode_audio(data, max_seconds=2.0)
    assert info.value.status == 413
