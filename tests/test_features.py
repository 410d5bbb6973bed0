import numpy as np
import pytest

from whisper_triton.features import N_FRAMES, batch_log_mel, log_mel_spectrogram, mel_filters


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
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = speech_clips[1].samples
    ours = log_mel_spectrogram(audio, n_mels)
    extractor = FeatureExtractor(feature_size=n_mels)
    theirs = extractor(audio, padding=480000)[:, :N_FRAMES]
    assert ours.shape == theirs.shape == (n_mels, N_FRAMES)
    assert np.max(np.abs(ours - theirs)) < 2e-3


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
