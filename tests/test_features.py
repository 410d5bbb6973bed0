import numpy as np
import pytest

from whisper_triton.pipeline.features import N_FRAMES, batch_log_mel, log_mel_spectrogram, mel_filters


@pytest.mark.parametrize("n_mels", [80, 128])
def test_shipped_filter_bank_matches_slaney_mel_definition(n_mels):
    # an independent construction of Whisper's filters (librosa's slaney mel, norm="slaney")
    from faster_whisper.feature_extractor import FeatureExtractor

    reference = FeatureExtractor.get_mel_filters(16000, 400, n_mels=n_mels)
    shipped = mel_filters(n_mels)
    assert shipped.shape == (n_mels, 201)
    np.testing.assert_allclose(shipped, reference, atol=2e-6)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_an_independent_implementation(n_mels, speech_clips):
    # faster-whisper's BatchedInferencePipeline: the chunk's own spectrogram, last frame dropped,
    # zero-padded to 3000 frames in the log-mel domain (openai-whisper's transcribe() pads the same way)
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = speech_clips[1].samples
    ours = log_mel_spectrogram(audio, n_mels)
    theirs = pad_or_trim(FeatureExtractor(feature_size=n_mels)(audio)[..., :-1])
    assert ours.shape == theirs.shape == (n_mels, N_FRAMES)
    assert np.max(np.abs(ours - theirs)) < 2e-3
    frames = audio.size // 160
    assert np.all(ours[:, frames:] == 0.0) and np.any(ours[:, : frames] != 0.0)


def test_a_window_is_padded_with_zero_features_not_with_the_spectrogram_of_silence(speech_clips):
    audio = speech_clips[0].samples
    assert audio.size < 480000
    padded_audio = np.pad(audio, (0, 480000 - audio.size))
    ours, of_silence = log_mel_spectrogram(audio), log_mel_spectrogram(padded_audio)
    frames = audio.size // 160
    assert np.all(ours[:, frames + 1:] == 0.0)
    # digital silence after the spectrogram's normalisation sits 8 log10 units under the maximum, not at 0
    assert np.all(of_silence[:, frames + 2:] < -0.5)


def test_padding_cutting_and_batching(speech_clips):
    short = speech_clips[0].samples
    batch = batch_log_mel([short, np.zeros(10, np.float32), np.tile(short, 10)], 80)
    assert batch.shape == (3, 80, N_FRAMES) and batch.dtype == np.float32
    # Whisper's normalisation: values within 8 log10 units of the maximum, scaled as (x + 4) / 4
    assert batch[0].max() - batch[0].min() <= 2.0 + 1e-5
    np.testing.assert_allclose(batch[0], log_mel_spectrogram(short, 80))


def test_unknown_mel_count_is_refused():
    with pytest.raises(ValueError):
        mel_filters(64)
