"""Recorded human speech (testkit/real_speech.py: Debian's telephony prompts in five languages, G.722
16 kHz, fetched and checked by `scripts/install.sh --test`), on the real weights, in-process: language
ID and a WER bound per language (multilingual base), no speech dropped, nothing written on tones and
noise, no loop, and no word lost at window edges and around long pauses in a long file (tiny.en).

The bounds come from bench/real_speech.py's measurement (2026-12-07) with a margin; the WER of a
language is over its clips together, so one hard word does not decide it."""

from __future__ import annotations

import numpy as np
import pytest

from testkit import real_speech
from testkit.scoring import WordErrors, normalize, word_errors
from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.windows import EngineWindowDecoder

CLIPS_PER_LANGUAGE = 3
# measured on these clips (2026-12-07; faster-whisper batched on the same weights in brackets):
# WER en 0.0 (0.0), es 0.30 (0.35), fr 0.12 (0.12), it 0.12 (0.12), ru 0.18 (0.18); language right on every
# clip but one Spanish one, which base (and faster-whisper) hears as Hebrew at 0.62
WER_BOUND = {"en": 0.10, "es": 0.40, "fr": 0.25, "it": 0.25, "ru": 0.30}
LANGUAGE_RIGHT = {"en": 3, "es": 2, "fr": 3, "it": 3, "ru": 3}


def _fixture_or_skip() -> None:
    try:
        real_speech.fetch(real_speech.FIXTURE_PACKAGES)
    except (real_speech.FetchError, OSError) as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"the real-speech fixture is missing ({exc}); run `bash scripts/install.sh --test`")


@pytest.fixture(scope="module")
def clips() -> dict[str, list[real_speech.Recording]]:
    _fixture_or_skip()
    return {language: real_speech.draw(real_speech.prompts(language), CLIPS_PER_LANGUAGE, offset=3, min_words=4,
                                       max_seconds=8)
            for language in real_speech.LANGUAGES}


@pytest.fixture(scope="module")
def base_pipeline(base_engine, base_tokenizer) -> LongFormTranscriber:
    return LongFormTranscriber(EngineWindowDecoder(base_engine, base_tokenizer), base_tokenizer)


@pytest.fixture(scope="module")
def tiny_pipeline(ct2_engine, tokenizer) -> LongFormTranscriber:
    return LongFormTranscriber(EngineWindowDecoder(ct2_engine, tokenizer), tokenizer)


@pytest.fixture(scope="module")
def base_answers(clips, base_pipeline) -> dict[str, list]:
    """Each clip transcribed once, its language detected (what a caller who names none gets)."""
    return {language: [base_pipeline.transcribe(clip.samples(), TranscribeOptions()) for clip in recordings]
            for language, recordings in clips.items()}


def _is_loop(text: str) -> bool:
    words = normalize(text, "fr").split()
    return any(len(set(words[i : i + 4])) == 1 for i in range(max(0, len(words) - 3)))


def test_language_is_detected_and_the_words_are_right(clips, base_answers):
    for language, answers in base_answers.items():
        detected = [answer.language for answer in answers]
        assert detected.count(language) >= LANGUAGE_RIGHT[language], (language, detected, [a.text for a in answers])
        errors = sum((word_errors(clip.text, answer.text, language) for clip, answer in zip(clips[language], answers)),
                     WordErrors())
        assert errors.wer <= WER_BOUND[language], (language, errors, [a.text for a in answers])


def test_no_speech_is_dropped_and_nothing_loops(base_answers):
    for language, answers in base_answers.items():
        for answer in answers:
            assert answer.text and answer.info.left_out == [], (language, answer.info.left_out)
            assert not _is_loop(answer.text), answer.text
            assert answer.info.work.windows == 1 and answer.info.work.decodes >= 1


def test_tones_and_noise_get_no_words(base_pipeline):
    """Beeps, tone sequences and a recording of screaming monkeys: speech to nobody, words from nobody."""
    _fixture_or_skip()
    sounds = [r for r in real_speech.prompts("en", kind="non-speech") if not r.name.endswith(tuple("0123456789"))]
    assert {r.name.split("/")[-1] for r in sounds} >= {"beep", "tt-monkeys"}
    for sound in sounds:
        answer = base_pipeline.transcribe(sound.samples(), TranscribeOptions())
        assert answer.text == "", (sound.name, answer.text)


@pytest.mark.parametrize("without_timestamps", [False, True], ids=["timestamps", "no-timestamps"])
def test_words_at_window_edges_and_around_long_pauses_are_kept(tiny_pipeline, without_timestamps):
    """English prompts back to back, with ordinary gaps and with pauses of 4-14 s, more speech than
    one window holds: every prompt's words come back (a word lost at a junction of two prompts, at a
    window's end or after a pause would show as a deletion)."""
    _fixture_or_skip()
    prompts = real_speech.draw(real_speech.prompts("en"), 14, offset=9, min_words=3, max_seconds=6)
    pauses = [0.4, 0.8, 0.5, 9.0, 0.6, 1.1, 14.0, 0.35, 0.7, 4.0, 0.9, 0.5, 0.6]
    long = real_speech.long_file("edges", prompts, pauses)
    answer = tiny_pipeline.transcribe(long.samples, TranscribeOptions(language="en",
                                                                       without_timestamps=without_timestamps))
    assert answer.info.work.windows >= 2  # the speech crosses a window boundary
    errors = word_errors(long.reference, answer.text, "en")
    print(errors, answer.info.work)
    assert errors.deletions <= 3 and errors.wer <= 0.12, (errors, answer.text)
    heard = set(normalize(answer.text, "en").split())
    for prompt in prompts:  # no prompt lost whole (at a junction, a window's end or after a pause)
        words = [w for w in normalize(prompt.text, "en").split() if w.isalnum()]
        assert sum(w in heard for w in words) >= len(words) / 2, (prompt.text, answer.text)
    assert not _is_loop(answer.text) and answer.info.left_out == []
