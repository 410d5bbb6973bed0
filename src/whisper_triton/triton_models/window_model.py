"""Triton Python-backend model `whisper_window`: the window decoder, the only model that runs the engine.

Every row is one window of at most 30 s (`contract.tensors.WHISPER_WINDOW_SPEC`). All rows of one
`execute()` go to the engine together (grouped by decoding options), each encoded once. A request
gets the outputs it asked for and only those are computed: CAPABILITIES alone never calls the
engine; language outputs alone run detection, not `generate`.

An engine that decodes in flight (`capabilities.in_flight_windows` > 0, TensorRT-LLM's executor) must
not wait for one `execute()` before the next request's windows can join: there each request is
answered on a worker thread through its response sender (Triton allows that for non-decoupled models:
exactly one final response), `execute` returns at once, and up to `in_flight_windows` requests decode
together; beyond `MAX_WAITING` more waiting, a request is refused at once with 503.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..contract.options import DecodeOptions, validated
from ..contract.tensors import WHISPER_WINDOW_SPEC as SPEC
from ..engines import load_engine
from ..errors import PayloadTooLargeError, WhisperTritonError, invalid_parameter
from ..pipeline.features import N_SAMPLES
from ..pipeline.tokenizer import PromptSpec, WhisperTokenizer
from ..pipeline.windows import ShortFormTranscriber, ShortRequest, ShortResult, unsupported_word_timestamps
from .common import (error_response, first_value, input_array, internal_error, max_batch_size, model_settings,
                     requested_outputs, rows_of, tensor, text, text_prefixes)

logger = logging.getLogger(__name__)

LANGUAGE_OUTPUTS = {"LANGUAGE", "LANGUAGE_PROB", "LANGUAGE_PROBS"}
_ANY_PASS = {"CAPABILITIES", "ENGINE_SECONDS"}  # outputs that ask for no pass of their own
MAX_WAITING = 256  # requests waiting for an in-flight worker, beyond those decoding


def busy_error(waiting: int) -> WhisperTritonError:
    return WhisperTritonError(f"The window decoder is busy: {waiting} requests are waiting. Retry shortly.", None, 503,
                              "service_unavailable")


@dataclass
class ParsedRequest:
    rows: list[ShortRequest]
    outputs: set[str]

    @property
    def info_only(self) -> bool:
        return self.outputs <= {"CAPABILITIES"}

    @property
    def detect_only(self) -> bool:
        return self.outputs <= LANGUAGE_OUTPUTS | _ANY_PASS


class WindowModel:
    """Everything the Triton model does, given the backend utilities module `pb_utils`."""

    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        self.settings = model_settings(args)
        batch = max_batch_size(args)
        model_dir = self.settings.resolved_model_dir()
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir)
        options = self.settings.engine_options()
        if "model_instance_device_id" in args and self.settings.engine == "tensorrtllm":
            options["device_id"] = int(args["model_instance_device_id"])  # one instance per GPU, on its GPU
        engine = load_engine(self.settings.engine, str(model_dir), tokens=self.tokenizer.special_tokens(),
                             max_batch_size=batch, **options)
        if batch > engine.max_batch_size:
            raise ValueError(
                f"config.pbtxt max_batch_size {batch} is above the engine's {engine.max_batch_size}: "
                "lower max_batch_size or rebuild the engine for a larger batch."
            )
        # the batch this model takes is part of what it declares: transcribe sends requests of that many rows
        self.capabilities = dataclasses.replace(engine.capabilities, max_batch_size=batch)
        self.short = ShortFormTranscriber(engine, self.tokenizer, self.settings.encoder_cache_mb << 20)
        self.in_flight = int(engine.capabilities.in_flight_windows)
        self._workers = (ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="window")
                         if self.in_flight else None)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        logger.info("whisper_window ready: engine=%s model_dir=%s capabilities=%s", self.settings.engine, model_dir,
                    self.capabilities.to_json())

    # ---- request parsing ----------------------------------------------------------------
    def _options(self, request) -> DecodeOptions:
        raw = text(first_value(self.pb, request, "DECODE_OPTIONS"))
        if not raw.strip():
            return DecodeOptions()
        try:
            values = json.loads(raw)
        except ValueError as exc:
            raise invalid_parameter("DECODE_OPTIONS", f"DECODE_OPTIONS is not valid JSON ({exc}).") from None
        return validated(DecodeOptions, values).check_beam(self.capabilities.max_beam_size,
                                                           self.capabilities.notes.get("beam_size"))

    def _prompt_ids(self, request, rows: int) -> list[list[int] | None]:
        """One decoder prompt per WAV row: PROMPT_IDS [rows, L] (-1 padded) or [1, L] for every row."""
        array = input_array(self.pb, request, "PROMPT_IDS")
        if array is None or array.size == 0:
            return [None] * rows
        array = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        if array.shape[0] not in (1, rows):
            raise invalid_parameter("PROMPT_IDS", f"PROMPT_IDS has {array.shape[0]} rows for {rows} WAV rows.")
        prompts = [self._prompt_row(row) for row in array]
        return prompts * rows if len(prompts) == 1 else prompts

    def _prompt_row(self, row: np.ndarray) -> list[int]:
        ids = [int(t) for t in row if t >= 0]
        vocabulary = self.tokenizer.timestamp_begin + 1501
        if not ids or any(t >= vocabulary for t in ids) or self.tokenizer.sot not in ids:
            raise invalid_parameter("PROMPT_IDS", "PROMPT_IDS must be token ids of this model's vocabulary "
                                    "holding <|startoftranscript|>.")
        return ids

    def parse(self, request) -> ParsedRequest:
        outputs = requested_outputs(request, SPEC.output_names)
        if outputs <= {"CAPABILITIES"}:
            return ParsedRequest([], outputs)
        rows = rows_of(input_array(self.pb, request, "WAV"), input_array(self.pb, request, "WAV_LENS"))
        prefixes = text_prefixes(input_array(self.pb, request, "TEXT_PREFIX"), len(rows))
        options = self._options(request)
        prompt_ids = self._prompt_ids(request, len(rows))
        scopes = text_prefixes(input_array(self.pb, request, "CACHE_SCOPE"), len(rows))
        words = bool(first_value(self.pb, request, "WORD_TIMESTAMPS"))
        if words and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        parsed = ParsedRequest([], outputs)
        for audio, prefix, prompt, scope in zip(rows, prefixes, prompt_ids, scopes):
            if audio.size > N_SAMPLES:
                raise PayloadTooLargeError(f"A WAV row is {audio.size / 16000:.1f} s long; whisper_window decodes "
                                           "windows of at most 30 s. Send long audio to `whisper` or `transcribe`.",
                                           param="WAV")
            spec = self.tokenizer.parse_text_prefix(prefix) if prefix.strip() else PromptSpec()
            parsed.rows.append(ShortRequest(audio=audio, spec=spec, options=options, prompt_ids=prompt,
                                            word_timestamps=words, scope=scope or None))
        return parsed

    # ---- execution ----------------------------------------------------------------------
    def execute(self, requests: list) -> list | None:
        """The responses, or (in-flight engines) None: each request is answered through its response sender."""
        if self._workers is None:
            return self.execute_batch(requests)
        for request in requests:
            sender = request.get_response_sender()
            with self._waiting_lock:
                waiting = self._waiting
                if waiting < MAX_WAITING:
                    self._waiting += 1
            if waiting >= MAX_WAITING:
                sender.send(error_response(self.pb, busy_error(waiting)),
                            flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._workers.submit(self._answer, request, sender)
        return None

    def _answer(self, request, sender) -> None:
        with self._waiting_lock:
            self._waiting -= 1
        (response,) = self.execute_batch([request])
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)

    def execute_batch(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: list[tuple[int, ParsedRequest]] = []
        for index, request in enumerate(requests):
            try:
                parsed.append((index, self.parse(request)))
            except WhisperTritonError as exc:
                responses[index] = error_response(self.pb, exc)
        detect = [row for _, p in parsed if p.detect_only and not p.info_only for row in p.rows]
        decode = [row for _, p in parsed if not p.detect_only for row in p.rows]
        try:
            languages = self.short.detect(detect) if detect else []
            results = self.short.transcribe(decode) if decode else []
        except WhisperTritonError as exc:
            for index, _ in parsed:
                responses[index] = error_response(self.pb, exc)
            return responses
        except Exception as exc:  # the model must answer every request, never crash the stub
            logger.exception("engine failed on a batch of %d windows", len(detect) + len(decode))
            for index, _ in parsed:
                responses[index] = error_response(self.pb, internal_error(exc, "The engine"))
            return responses
        detected, decoded = iter(languages), iter(results)
        for index, p in parsed:
            source = detected if p.detect_only else decoded
            responses[index] = self._response([next(source) for _ in p.rows], p.outputs)
        return responses

    def _response(self, results: list[ShortResult], outputs: set[str]):
        values = {
            "TRANSCRIPTS": lambda: [r.text for r in results],
            "LANGUAGE": lambda: [r.language for r in results],
            "LANGUAGE_PROB": lambda: [r.language_probability for r in results],
            "LANGUAGE_PROBS": lambda: [json.dumps(r.language_probabilities or {r.language: r.language_probability})
                                       for r in results],
            "TOKENS": lambda: [r.tokens for r in results],
            "AVG_LOGPROB": lambda: [_number(r.avg_logprob) for r in results],
            "NO_SPEECH_PROB": lambda: [_number(r.no_speech_prob) for r in results],
            "TOKEN_TIMES": lambda: [[v for pair in zip(r.timings.starts, r.timings.ends) for v in pair]
                                    if r.timings else [] for r in results],
            "TOKEN_PROBS": lambda: [r.timings.probabilities if r.timings else [] for r in results],
            "CAPABILITIES": lambda: [self.capabilities.to_json()] * max(1, len(results)),
            "ENGINE_SECONDS": lambda: [json.dumps(r.engine_seconds) for r in results],
        }
        tensors = [tensor(self.pb, SPEC.output(name), values[name]()) for name in SPEC.output_names if name in outputs]
        return self.pb.InferenceResponse(output_tensors=tensors)


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)
