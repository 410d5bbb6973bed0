"""Declared engine capabilities: the pipeline reads them once and, where one is missing, says which
rule it could not apply (`info.not_applied`), never silently; one encoder pass per window."""

import dataclasses

import numpy as np
import pytest

from whisper_triton.contract.capabilities import EngineCapabilities
from whisper_triton.contract.options import TranscribeOptions
from whisper_triton.pipeline.longform import LongFormTranscriber, not_applied
from whisper_triton.pipeline.windows import EngineWindowDecoder


def test_ctranslate2_applies_every_rule(ct2_engine, tokenizer, speech_clips):
    result = LongFormTranscriber(EngineWindowDecoder(ct2_engine, tokenizer), tokenizer).transcribe(
        speech_clips[0].samples)
    assert result.info.engine == "ctranslate2" and result.info.not_applied == {}
    info = result.to_dict()["info"]
    assert {k: info[k] for k in ("engine", "not_applied", "left_out")} == {"engine": "ctranslate2", "not_applied": {},
                                                                             "left_out": []}
    # what the request cost: one window, decoded once, on the engine's clock
    work = info["work"]
    assert (work["windows"], work["decodes"], work["fallback_decodes"], work["follow_up_decodes"]) == (1, 1, 0, 0)
    assert {"vad", "decoding", "encoder", "decoder"} <= set(work["seconds"])


def test_an_engine_without_no_speech_probability_says_so(ct2_engine, tokenizer, speech_clips):
    decoder = EngineWindowDecoder(ct2_engine, tokenizer)
    decoder.capabilities = dataclasses.replace(decoder.capabilities, no_speech_prob=False, engine="tensorrtllm",
                                               notes={"no_speech_prob": "no <|nospeech|> probability here"})
    result = LongFormTranscriber(decoder, tokenizer).transcribe(speech_clips[0].samples)
    assert result.info.not_applied == {"no_speech": "no <|nospeech|> probability here"}
    # and it is true: no segment carries a no-speech probability from this engine's point of view
    assert result.text


def test_rules_asked_for_decide_what_is_reported():
    lacking = EngineCapabilities(scores=False, no_speech_prob=False, timestamp_rules=False, multilingual=True,
                                 language_probabilities=False)
    everything = not_applied(lacking, TranscribeOptions())
    assert set(everything) == {"no_speech", "log_prob_fallback", "timestamp_rules", "language_probability",
                               "unsure_language"}
    # a rule the request turned off, or a language it gave, is not "missing"
    quiet = TranscribeOptions(no_speech_threshold=None, log_prob_threshold=None, without_timestamps=True, language="de")
    assert not_applied(lacking, quiet) == {}


def test_capabilities_cross_the_triton_boundary_whole():
    original = EngineCapabilities(word_timestamps=True, max_beam_size=4, notes={"x": "why"}, engine="tensorrtllm")
    assert EngineCapabilities.from_json(original.to_json()) == original


def test_each_window_is_encoded_once(ct2_engine, tokenizer, speech_clips, monkeypatch):
    """Detection, every fallback temperature and alignment reuse one encoder pass per window."""
    calls = []
    real = ct2_engine.encode
    monkeypatch.setattr(ct2_engine, "encode", lambda features: calls.append(features.shape[0]) or real(features))
    decoder = EngineWindowDecoder(ct2_engine, tokenizer)
    pipeline = LongFormTranscriber(decoder, tokenizer)
    clip = speech_clips[1].samples
    # an impossible log-prob threshold: every temperature is tried, words aligned at the end
    options = TranscribeOptions(log_prob_threshold=-0.0001, temperature=[0.0, 0.4, 0.8], word_timestamps=True)
    result = pipeline.transcribe(clip, options)
    assert result.segments and result.segments[0].words
    assert sum(calls) == 1 and decoder.cache.hits >= 2


def test_no_encoder_pass_crosses_requests(ct2_engine, tokenizer, speech_clips, monkeypatch):
    """The same audio sent twice is two cold requests: each encodes its window once (the cache is
    scoped to one request), so a repeated request is never answered faster from another's work."""
    calls = []
    real = ct2_engine.encode
    monkeypatch.setattr(ct2_engine, "encode", lambda features: calls.append(features.shape[0]) or real(features))
    decoder = EngineWindowDecoder(ct2_engine, tokenizer)
    pipeline = LongFormTranscriber(decoder, tokenizer)
    clip = speech_clips[2].samples
    first = pipeline.transcribe(clip, TranscribeOptions(word_timestamps=True))
    second = pipeline.transcribe(clip, TranscribeOptions(word_timestamps=True))
    assert first.text == second.text and sum(calls) == 2 and decoder.cache.hits == 0
    assert second.info.work.seconds["encoder"] > 0  # the second request paid for its own encoder pass


def test_the_encoder_cache_is_bounded():
    from whisper_triton.pipeline.windows import EncoderCache

    cache = EncoderCache(max_bytes=3 * 4000)
    keys = [EncoderCache.key(np.full(100, i, np.float32)) for i in range(5)]
    for key in keys:
        cache.put(key, np.zeros(1000, np.float32))
    assert cache.get(keys[0]) is None and cache.get(keys[-1]) is not None
    assert sum(v.nbytes for v in cache._items.values()) <= cache.max_bytes
