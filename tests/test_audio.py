import io
import wave

import numpy as np
import pytest

from speech import FORMATS, encode
from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio
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


def test_file_cut_mid_frame_keeps_the_part_before_the_cut(speech_clips):
    """As faster-whisper's decoder: the frames before the first undecodable one are kept."""
    reference = speech_clips[0].samples
    full = encode(reference, SAMPLE_RATE, "flac", "flac", 1, 16000)
    decoded = decode_audio(full[: len(full) // 2])
    assert 0.2 * reference.size < decoded.size < 0.8 * reference.size
    np.testing.assert_allclose(decoded, reference[: decoded.size], atol=1e-3)  # FLAC is lossless


JUNK = np.random.default_rng(13).integers(0, 256, 50_000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_trailing_junk_after_a_valid_stream_keeps_the_stream(name, speech_clips):
    container, codec, channels, rate = FORMATS[name]
    reference = speech_clips[1].samples
    clean = decode_audio(encode(reference, SAMPLE_RATE, container, codec, channels, rate))
    with_junk = decode_audio(encode(reference, SAMPLE_RATE, container, codec, channels, rate) + JUNK)
    assert abs(with_junk.size - clean.size) / SAMPLE_RATE < 0.1
    n = min(with_junk.size, clean.size)
    assert np.corrcoef(with_junk[:n], clean[:n])[0, 1] > 0.99


FLOAT_CONTAINERS = [("wav", "pcm_f32le"), ("matroska", "pcm_f32le"), ("au", "pcm_f32be"), ("caf", "pcm_f32le"),
                    ("w64", "pcm_f64le")]


@pytest.mark.parametrize("container,codec", FLOAT_CONTAINERS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_non_finite_samples_are_refused_naming_audio(container, codec, bad, speech_clips):
    samples = speech_clips[2].samples.copy()
    samples[20_000::9_000] = bad
    data = encode(samples, SAMPLE_RATE, container, codec)
    with pytest.raises(InvalidAudioError) as info:
        decode_audio(data)
    assert info.value.param == "audio" and info.value.status == 400
    assert "not finite" in info.value.message and "1.25 s" in info.value.message


@pytest.mark.parametrize("container,codec", FLOAT_CONTAINERS[:2])
def test_finite_float_audio_decodes(container, codec, speech_clips):
    samples = speech_clips[2].samples
    decoded = decode_audio(encode(samples, SAMPLE_RATE, container, codec))
    np.testing.assert_allclose(decoded, samples, atol=1e-6)


def test_estimate_seconds_from_the_header(speech_clips):
    from whisper_triton.pipeline.audio import estimate_seconds

    samples = speech_clips[0].samples
    for container, codec in [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame")]:
        assert estimate_seconds(encode(samples, SAMPLE_RATE, container, codec)) == pytest.approx(
            samples.size / SAMPLE_RATE, abs=0.1)
    assert estimate_seconds(b"not audio at all" * 2000) == pytest.approx(32_000 / 32_000)


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


@pytest.mark.parametrize("container, codec, channels, rate", [
    ("wav", "pcm_s16le", 1, 16000), ("wav", "pcm_s16le", 2, 44100), ("wav", "pcm_f32le", 1, 48000),
    ("wav", "pcm_u8", 1, 8000), ("wav", "pcm_s24le", 2, 22050), ("flac", "flac", 1, 16000), ("flac", "flac", 2, 44100),
])
def test_wav_and_flac_opened_by_their_header_decode_to_the_same_samples(container, codec, channels, rate, speech_clips):
    """WAV and FLAC are opened with a small probe (audio._open): the samples must be exactly what
    FFmpeg's full 5 MB probe gives, and so must the estimated length."""
    import av

    import whisper_triton.pipeline.audio as audio

    data = encode(speech_clips[0].samples, SAMPLE_RATE, container, codec, channels, rate)
    assert audio._described_by_header(data)
    fast = audio.decode_audio(data)
    with av.open(io.BytesIO(data), metadata_errors="ignore") as full:
        slow = audio._decode_stream(full, full.streams.audio[0], SAMPLE_RATE, None)
        full_seconds = float(full.duration) / av.time_base
    assert fast.shape == slow.shape and np.array_equal(fast, slow)
    assert audio.estimate_seconds(data) == pytest.approx(full_seconds, abs=1e-3)


def test_a_wav_with_20_kb_of_chunks_before_its_format_decodes_the_same(speech_clips):
    """Recorders put JUNK/bext chunks before `fmt `: 20 kB of them lie past the small probe (FFmpeg's
    WAV demuxer walks the chunks itself; where a stream stays undescribed, the full probe takes over)."""
    import struct

    import whisper_triton.pipeline.audio as audio

    plain = encode(speech_clips[0].samples, SAMPLE_RATE, "wav", "pcm_s16le", 1, 16000)
    junk = b"JUNK" + struct.pack("<I", 20_000) + bytes(20_000)
    body = plain[12:]  # the chunks after RIFF/size/WAVE
    padded = b"RIFF" + struct.pack("<I", 4 + len(junk) + len(body)) + b"WAVE" + junk + body
    assert audio._described_by_header(padded)
    np.testing.assert_array_equal(audio.decode_audio(padded), audio.decode_audio(plain))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_decoded_frames_resampled_in_blocks_give_the_samples_of_frame_by_frame_resampling(name, speech_clips):
    import av

    container, codec, channels, rate = FORMATS[name]
    data = encode(speech_clips[0].samples, SAMPLE_RATE, container, codec, channels, rate)
    with av.open(io.BytesIO(data)) as source:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pieces = []
        for frame in source.decode(source.streams.audio[0]):
            frame.pts = None
            pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    np.testing.assert_array_equal(decode_audio(data), np.concatenate(pieces))
