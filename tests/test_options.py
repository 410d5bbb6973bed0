"""The one request model (contract/options.py), without any server: every source gives the same
answer for the same input, and model-independent checks happen at parse time."""

import json

import pytest

from whisper_triton.contract.options import (DEFAULT_TEMPERATURES, MAX_PROMPT_CHARS, DecodeOptions, QualityThresholds,
                                             TranscribeOptions, VadOptions, parse_options)
from whisper_triton.errors import WhisperTritonError
from whisper_triton.http.parsing import custom_attributes


def refused(raw: dict) -> WhisperTritonError:
    with pytest.raises(WhisperTritonError) as info:
        parse_options(raw)
    assert 400 <= info.value.status < 500
    return info.value


@pytest.mark.parametrize("bad, param", [
    ({"chunk_length": 0}, "chunk_length"),
    ({"chunk_length": 31}, "chunk_length"),
    ({"batch_size": 0}, "batch_size"),
    ({"beam_size": 0}, "beam_size"),
    ({"beam_size": 1000}, "beam_size"),
    ({"beam_size": True}, "beam_size"),
    ({"beam_size": "three"}, "beam_size"),
    ({"compression_ratio_threshold": -1}, "compression_ratio_threshold"),
    ({"no_speech_threshold": -0.5}, "no_speech_threshold"),
    ({"temperature": [0.0, 5.0]}, "temperature"),
    ({"temperature": []}, "temperature"),
    ({"max_new_tokens": 449}, "max_new_tokens"),
    ({"language_detection": "sometimes"}, "language_detection"),
    ({"vad": "maybe"}, "vad"),
    ({"vad_threshold": 1.0}, "vad_threshold"),  # the VAD's own range, at parse time
    ({"vad_threshold": 0}, "vad_threshold"),
    ({"vad_min_silence_ms": -1}, "vad_min_silence_ms"),
    ({"task": "summarise"}, "task"),
    ({"initial_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "initial_prompt"),
    ({"prompt": 12}, "prompt"),
    ({"colour": "red"}, "colour"),
])
def test_bad_options_name_the_parameter(bad, param):
    assert refused(bad).param == param


def test_unknown_option_lists_the_known_ones():
    error = refused({"colour": "red"})
    assert "beam_size" in error.message and "colour" in error.message


def test_strings_are_coerced_the_same_from_every_source():
    """Query strings, custom attributes and JSON (the Triton OPTIONS path) give the same options."""
    as_json = parse_options(json.loads('{"beam_size": "3", "word_timestamps": "true", "temperature": "0,0.4"}'))
    as_query = parse_options({"beam_size": "3", "word_timestamps": "true", "temperature": "0,0.4"})
    as_attributes = parse_options(custom_attributes("beam_size=3,word_timestamps=true"))
    assert as_json == as_query
    assert as_json.beam_size == as_attributes.beam_size == 3
    assert as_json.word_timestamps is as_attributes.word_timestamps is True
    assert as_json.temperature == [0.0, 0.4]


def test_prompt_is_an_alias_of_initial_prompt():
    assert parse_options({"prompt": "Kubernetes"}).initial_prompt == "Kubernetes"
    assert parse_options({"initial_prompt": "Kubernetes"}).initial_prompt == "Kubernetes"


def test_temperature_as_number_or_list():
    assert parse_options({"temperature": 0.3}).temperatures() == [0.3]
    assert parse_options({"temperature": "0.3"}).temperatures() == [0.3]
    assert parse_options({}).temperatures() == list(DEFAULT_TEMPERATURES)


def test_language_is_normalised_and_empty_means_detect():
    assert parse_options({"language": " DE "}).language == "de"
    assert parse_options({"language": ""}).language is None


def test_wire_sends_only_what_the_caller_set():
    options = parse_options({"beam_size": "2", "prompt": "hello"})
    assert options.wire() == {"beam_size": 2, "initial_prompt": "hello"}
    assert parse_options(options.wire()) == options  # the other side rebuilds the same options


def test_groups_take_their_defaults_and_ranges_from_one_place():
    options = TranscribeOptions()
    assert options.vad_options == VadOptions()
    assert options.thresholds == QualityThresholds()
    assert options.decode_options(0.0) == DecodeOptions()
    tuned = parse_options({"vad_threshold": "0.4", "no_speech_threshold": "0.5", "beam_size": 4})
    assert tuned.vad_options.threshold == 0.4 and tuned.thresholds.no_speech == 0.5
    assert tuned.decode_options(0.2) == DecodeOptions(beam_size=4, temperature=0.2)


def test_decode_options_are_hashable_for_grouping():
    assert len({DecodeOptions(), DecodeOptions(), DecodeOptions(beam_size=2)}) == 2


def test_null_turns_a_quality_rule_off():
    options = parse_options({"log_prob_threshold": None, "no_speech_threshold": None})
    assert options.thresholds.log_prob is None and options.thresholds.no_speech is None


def test_error_message_does_not_echo_huge_values():
    error = refused({"language": "x" * 10_000})
    assert len(error.message) < 300


def test_length_penalty_reaches_the_engine_from_http(ct2_engine, tokenizer, speech_clips, monkeypatch):
    """An option exposed in the request model alone reaches both engines: DecodeOptions carries every
    decoding field the request has, the Triton path sends DecodeOptions whole (DECODE_OPTIONS)."""
    from whisper_triton.engines.tensorrtllm.requests import sampling_settings
    from whisper_triton.pipeline.longform import LongFormTranscriber
    from whisper_triton.pipeline.windows import EngineWindowDecoder

    options = parse_options({"length_penalty": "0.5", "beam_size": "2"})
    seen = []
    real = ct2_engine.generate
    monkeypatch.setattr(ct2_engine, "generate", lambda f, p, o: seen.append(o) or real(f, p, o))
    LongFormTranscriber(EngineWindowDecoder(ct2_engine, tokenizer), tokenizer).transcribe(speech_clips[0].samples, options)
    assert seen and all(o.length_penalty == 0.5 and o.beam_size == 2 for o in seen)
    assert DecodeOptions.model_validate_json(seen[0].model_dump_json()) == seen[0]  # the DECODE_OPTIONS wire
    # TensorRT-LLM decodes one beam (beams are refused by name: engines/tensorrtllm/rules.py), so no length penalty
    assert sampling_settings(seen[0]) == {"beam_width": 1, "top_k": 1, "repetition_penalty": 1.0}
    assert refused({"length_penalty": "-1"}).param == "length_penalty"
