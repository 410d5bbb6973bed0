"""Silero VAD scored in parallel sections gives the spans of one uninterrupted pass."""

import numpy as np

from whisper_triton.pipeline import vad
from whisper_triton.contract.options import VadOptions


def test_parallel_sections_give_the_spans_of_one_pass(long_speech):
    samples = long_speech.samples
    assert samples.size / 16000 > 1.5 * vad.SECTION_FRAMES * vad.FRAME / 16000  # long enough to be split
    whole = vad.speech_probabilities(samples, parallel=False)
    split = vad.speech_probabilities(samples, parallel=True)
    assert whole.shape == split.shape
    assert np.max(np.abs(whole - split)) < 0.02
    options = VadOptions()
    spans = vad.spans_from_probabilities(whole, samples.size, options)
    assert spans == vad.spans_from_probabilities(split, samples.size, options)
    assert len(spans) >= 30  # the recording's 40 sentences, some joined across short pauses


def test_short_audio_is_one_pass():
    audio = np.zeros(30 * 16000, np.float32)
    np.testing.assert_array_equal(vad.speech_probabilities(audio), vad.speech_probabilities(audio, parallel=False))
