"""Bounded fuzzing (hypothesis) of everything that reads caller bytes before Triton does: the JSON
body, custom attributes, options, the OPTIONS tensor's JSON, and the audio decoder on mutated real
files. The one property: a clean answer or a WhisperTritonError with a 4xx status naming a
parameter; never another exception. `FUZZ_EXAMPLES` (env) raises the count for a longer run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from speech import encode
from whisper_triton.pipeline.audio import decode_audio
from whisper_triton.contract.json_limits import MAX_OPTIONS_BYTES, load_object
from whisper_triton.contract.options import OPTION_NAMES, parse_options
from whisper_triton.errors import WhisperTritonError
from whisper_triton.http.parsing import custom_attributes, parse_json_body

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def refused_cleanly(exc: WhisperTritonError) -> None:
    assert 400 <= exc.status < 500 and exc.param and exc.message
    assert len(exc.message) < 1_000 and len(exc.param) < 100  # nothing echoed at the caller's length
    for internal in ("Traceback", "site-packages", "whisper_triton", ".py"):
        assert internal not in exc.message


json_values = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=50),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4),
                           max_leaves=20)
option_dicts = st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=80), json_values, max_size=6)


@FUZZ
@given(st.binary(max_size=2_000) | option_dicts.map(lambda d: json.dumps(d).encode()))
def test_json_body(body):
    try:
        audio, options = parse_json_body(body)
        parse_options(options)
    except WhisperTritonError as exc:
        refused_cleanly(exc)


@FUZZ
@given(option_dicts)
def test_options_from_json_values(raw):
    try:
        parse_options(raw)
    except WhisperTritonError as exc:
        refused_cleanly(exc)


@FUZZ
@given(st.dictionaries(st.sampled_from(OPTION_NAMES) | st.text(max_size=30), st.text(max_size=60), max_size=6))
def test_options_from_query_strings(raw):
    try:
        parse_options(raw)
    except WhisperTritonError as exc:
        refused_cleanly(exc)


@FUZZ
@given(st.text(max_size=1_200))
def test_custom_attributes(header):
    try:
        parse_options(custom_attributes(header))
    except WhisperTritonError as exc:
        refused_cleanly(exc)


@FUZZ
@given(st.text(max_size=3_000) | option_dicts.map(json.dumps))
def test_triton_options_tensor(raw):
    try:
        parse_options(load_object(raw, "OPTIONS", MAX_OPTIONS_BYTES))
    except WhisperTritonError as exc:
        refused_cleanly(exc)


@pytest.mark.parametrize("depth", [100, 999, 1_000, 10_000, 100_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_json_is_a_400_never_recursion(depth, opener):
    closer = "]" if opener == "[" else "}"
    body = (opener * depth + "1" + closer * depth).encode()
    for parse in (lambda: parse_json_body(b'{"audio": "AAAA", "x": ' + body + b"}"),
                  lambda: load_object(body, "OPTIONS", None)):
        with pytest.raises(WhisperTritonError) as info:
            parse()
        refused_cleanly(info.value)


@pytest.fixture(scope="module")
def seed_files(speech_clips) -> list[bytes]:
    samples = speech_clips[0].samples[:16000]
    return [encode(samples, 16000, c, k, 1, r) for c, k, r in
            [("wav", "pcm_s16le", 16000), ("flac", "flac", 16000), ("mp3", "libmp3lame", 22050),
             ("ogg", "libopus", 48000), ("wav", "pcm_f32le", 16000), ("ipod", "aac", 16000)]]


def mutate(data: bytes, draw_positions: list[int], draw_values: list[int], cut: int | None, tail: bytes) -> bytes:
    buffer = bytearray(data)
    for position, value in zip(draw_positions, draw_values):
        buffer[position % len(buffer)] = value
    if cut is not None:
        buffer = buffer[: max(0, cut % (len(buffer) + 1))]
    return bytes(buffer) + tail


@FUZZ
@given(index=st.integers(0, 5), positions=st.lists(st.integers(0, 1 << 20), max_size=30),
       values=st.lists(st.integers(0, 255), max_size=30), cut=st.none() | st.integers(0, 1 << 20),
       tail=st.binary(max_size=300))
def test_decode_audio_on_mutated_files(seed_files, index, positions, values, cut, tail):
    data = mutate(seed_files[index], positions, values, cut, tail)
    try:
        samples = decode_audio(data, max_seconds=60)
    except WhisperTritonError as exc:
        refused_cleanly(exc)
        return
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
    assert np.isfinite(samples).all()


@FUZZ
@given(st.binary(max_size=4_000))
def test_decode_audio_on_random_bytes(data):
    try:
        samples = decode_audio(data, max_seconds=60)
    except WhisperTritonError as exc:
        refused_cleanly(exc)
        return
    assert np.isfinite(samples).all()
