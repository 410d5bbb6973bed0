"""Triton Python-backend model `whisper`: NVIDIA's Whisper I/O, a thin front that routes rows.

gRPC clients in any language (NVIDIA's Whisper clients, perf_analyzer) call `whisper` with
`contract.tensors.WHISPER_SPEC`. Rows of at most 30 s go on, together, to `whisper_window` (the only
model that runs the engine); longer rows go to `transcribe` (long-form: VAD, windows, stitching),
each as its own request, so one long file never holds up the windows of everyone else. The front
loads no engine and no tokenizer; it answers each request as soon as its rows are back.
"""

from __future__ import annotations

import json
import logging
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..pipeline.audio import SAMPLE_RATE
from ..contract.options import DecodeOptions, validated
from ..contract.tensors import (NVIDIA_OPTION_FIELDS, TRANSCRIBE, WHISPER_SPEC as SPEC, WHISPER_WINDOW_SPEC as WINDOW,
                                decode_error, padded)
from ..errors import WhisperTritonError, invalid_parameter
from ..pipeline.features import N_SAMPLES
from ..pipeline.tokenizer import PromptSpec, read_text_prefix
from .common import (error_response, first_value, input_array, internal_error, requested_outputs, rows_of, tensor,
                     text_prefixes)

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32  # BLS calls of one instance at once (windows and long rows of all its requests)


def float_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A WAV file (IEEE float, mono) of `samples`, for the `transcribe` model's AUDIO input."""
    data = np.ascontiguousarray(samples, dtype="<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    return header + b"data" + struct.pack("<I", len(data)) + data


def long_row_options(spec: PromptSpec, options: DecodeOptions, given: set[str]) -> dict:
    """The `transcribe` options of a long row: its TEXT_PREFIX and the decoding inputs it was sent."""
    values: dict = {"task": spec.task, "without_timestamps": not spec.timestamps}
    if spec.language:
        values["language"] = spec.language
    if spec.previous_text:
        values["initial_prompt"] = spec.previous_text
    for name in ("beam_size", "max_new_tokens", "repetition_penalty"):
        if name in given:
            values[name] = getattr(options, name)
    if "temperature" in given and options.temperature > 0:
        values["temperature"] = [options.temperature]
    return values


class WhisperModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        self._requests = ThreadPoolExecutor(max_workers=16, thread_name_prefix="front")
        self._calls = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="front-bls")
        logger.info("whisper front ready: rows <= 30 s -> %s, longer rows -> %s", WINDOW.name, TRANSCRIBE)

    def execute(self, requests: list) -> list:
        return list(self._requests.map(self._answer, requests))

    def _answer(self, request):
        try:
            return self._route(request)
        except WhisperTritonError as exc:
            return error_response(self.pb, exc)
        except Exception as exc:  # answer every request; never take the stub down
            logger.exception("routing a whisper request failed")
            return error_response(self.pb, internal_error(exc, "The whisper model"))

    # ---- parsing ------------------------------------------------------------------------
    def _decode_options(self, request) -> tuple[DecodeOptions, set[str]]:
        values = {}
        for name, field in NVIDIA_OPTION_FIELDS.items():
            value = first_value(self.pb, request, name)
            if value is not None:
                values[field] = value.item() if hasattr(value, "item") else value
        try:
            return validated(DecodeOptions, values), set(values)
        except WhisperTritonError as exc:  # name the tensor the client sent, not our field
            names = {field: name for name, field in NVIDIA_OPTION_FIELDS.items()}
            raise invalid_parameter(names.get(exc.param, exc.param), exc.message) from None

    # ---- routing ------------------------------------------------------------------------
    def _route(self, request):
        outputs = requested_outputs(request, SPEC.output_names)
        rows = rows_of(input_array(self.pb, request, "WAV"), input_array(self.pb, request, "WAV_LENS"))
        prefixes = text_prefixes(input_array(self.pb, request, "TEXT_PREFIX"), len(rows))
        options, given = self._decode_options(request)
        prompt_ids = input_array(self.pb, request, "PROMPT_IDS")
        words = first_value(self.pb, request, "WORD_TIMESTAMPS")
        short = [i for i, row in enumerate(rows) if row.size <= N_SAMPLES]
        long = [i for i, row in enumerate(rows) if row.size > N_SAMPLES]
        if long and prompt_ids is not None and prompt_ids.size:
            raise invalid_parameter("PROMPT_IDS", "PROMPT_IDS applies to one window; send WAV of at most 30 s, "
                                    "or use TEXT_PREFIX for longer audio.")
        specs = {i: read_text_prefix(prefixes[i]) for i in long}
        jobs = {}
        if short:
            window_request = self._window_request([rows[i] for i in short], [prefixes[i] for i in short], options,
                                                  prompt_ids, words, outputs)
            jobs["short"] = self._calls.submit(self._exec, window_request)
        for i in long:
            jobs[i] = self._calls.submit(self._exec, self._long_request(rows[i], long_row_options(specs[i], options, given)))
        replies = {key: job.result() for key, job in jobs.items()}
        return self._response(rows, short, replies, outputs)

    def _window_request(self, rows, prefixes, options: DecodeOptions, prompt_ids, words, outputs: set[str]):
        pb = self.pb
        lengths = np.array([[row.size] for row in rows], dtype=WINDOW.input("WAV_LENS").numpy_dtype)
        wav = np.zeros((len(rows), int(lengths.max())), dtype=WINDOW.input("WAV").numpy_dtype)
        for index, row in enumerate(rows):
            wav[index, : row.size] = row
        tensors = [pb.Tensor("WAV", wav), pb.Tensor("WAV_LENS", lengths),
                   pb.Tensor("TEXT_PREFIX", np.array([[p.encode()] for p in prefixes], dtype=object)),
                   pb.Tensor("DECODE_OPTIONS", np.array([[options.model_dump_json().encode()]] * len(rows), dtype=object))]
        if prompt_ids is not None and prompt_ids.size:
            tensors.append(pb.Tensor("PROMPT_IDS", np.broadcast_to(prompt_ids.reshape(1, -1),
                                                                   (len(rows), prompt_ids.size)).astype(np.int32)))
        if words is not None:
            tensors.append(pb.Tensor("WORD_TIMESTAMPS", np.array([[bool(words)]] * len(rows), dtype=bool)))
        asked = [name for name in WINDOW.output_names if name in outputs]
        return pb.InferenceRequest(model_name=WINDOW.name, inputs=tensors, requested_output_names=asked)

    def _long_request(self, row: np.ndarray, options: dict):
        pb = self.pb
        tensors = [pb.Tensor("AUDIO", np.array([float_wav(row)], dtype=object)),
                   pb.Tensor("OPTIONS", np.array([json.dumps(options).encode()], dtype=object))]
        return pb.InferenceRequest(model_name=TRANSCRIBE, inputs=tensors, requested_output_names=["RESULT"])

    def _exec(self, bls_request) -> dict[str, np.ndarray]:
        response = bls_request.exec()
        if response.has_error():
            message = response.error().message()
            raise decode_error(message) or WhisperTritonError(
                "The whisper model's backend failed; retry, and check the server log if it persists.", None, 500,
                "engine_error")
        return {t.name(): t.as_numpy() for t in response.output_tensors()}

    # ---- answer -------------------------------------------------------------------------
    def _response(self, rows, short: list[int], replies: dict, outputs: set[str]):
        per_row: list[dict] = []
        window = replies.get("short", {})
        position = {row: k for k, row in enumerate(short)}
        for index in range(len(rows)):
            if index in position:
                per_row.append({name: value[position[index]] for name, value in window.items()})
            else:
                result = json.loads(replies[index]["RESULT"].reshape(-1)[0])
                per_row.append({"TRANSCRIPTS": result["text"], "LANGUAGE": result["language"],
                                "LANGUAGE_PROB": result["language_probability"]})
        tensors = [self._column(SPEC.output(name), per_row) for name in SPEC.output_names if name in outputs]
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _column(self, spec, per_row: list[dict]):
        """One output for every row: window rows as `whisper_window` gave them, long rows from their result."""
        if spec.dims == (-1,):
            values = [[v for v in row[spec.name].reshape(-1) if v != spec.pad] if spec.name in row else []
                      for row in per_row]
            return self.pb.Tensor(spec.name, padded(values, spec))
        values = []
        for row in per_row:
            value = row.get(spec.name, float("nan"))
            value = value.reshape(-1)[0] if isinstance(value, np.ndarray) else value
            values.append(value.decode("utf-8") if isinstance(value, bytes) else value)
        return tensor(self.pb, spec, values)


__all__ = ["WhisperModel", "float_wav", "long_row_options"]
