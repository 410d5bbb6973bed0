"""Triton Python-backend model `whisper`: NVIDIA's Whisper I/O on top of any engine.

Inputs (batch dimension first): WAV FP32 [-1] (zero-padded is fine), WAV_LENS INT32 [1] (true
sample count, optional), TEXT_PREFIX STRING [1] (optional, e.g.
`<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`). Optional extras: decoding options
BEAM_SIZE, MAX_NEW_TOKENS (INT32 [1]), TEMPERATURE, REPETITION_PENALTY (FP32 [1]); PROMPT_IDS
(INT32 [-1], a ready decoder prompt that replaces TEXT_PREFIX) and WORD_TIMESTAMPS (BOOL [1]).
Outputs: TRANSCRIPTS STRING [1], and for clients that ask: LANGUAGE, LANGUAGE_PROB, TOKENS,
AVG_LOGPROB, NO_SPEECH_PROB, TOKEN_TIMES (start, end pairs), TOKEN_PROBS.

All windows (<= 30 s) of one `execute()` go to the engine together; a row whose WAV_LENS is over
30 s is transcribed with the long-form pipeline (VAD, windows, stitching) on the same engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engines import load_engine
from ..engines.base import DecodeOptions
from ..errors import WhisperTritonError, invalid_parameter
from ..features import N_SAMPLES
from ..longform import LongFormTranscriber, TranscribeOptions
from ..settings import Settings, load_settings
from ..tokenizer import WhisperTokenizer
from ..transcribe import ShortFormTranscriber, ShortRequest, ShortResult, unsupported_word_timestamps
from .common import error_response, input_array, internal_error, ragged, strings

logger = logging.getLogger(__name__)

_OPTION_INPUTS = {
    "BEAM_SIZE": ("beam_size", int),
    "MAX_NEW_TOKENS": ("max_new_tokens", int),
    "TEMPERATURE": ("temperature", float),
    "REPETITION_PENALTY": ("repetition_penalty", float),
}


@dataclass
class ParsedRequest:
    short: list[ShortRequest]  # rows of at most 30 s
    long: dict[int, tuple[np.ndarray, TranscribeOptions]]  # row index -> (audio, options) for longer rows
    rows: int


def settings_from_model_config(model_config: dict, model_directory: str | Path) -> Settings:
    """Settings from the environment, overridden by the model's non-empty config.pbtxt parameters
    (a relative `model_dir` is relative to the repository, as the export lays it out)."""
    from ..export.model_repo import resolve_model_dir_parameter

    model_config = resolve_model_dir_parameter(model_config, model_directory)
    parameters = model_config.get("parameters", {}) or {}
    overrides = {key: value.get("string_value", "") for key, value in parameters.items()}
    known = set(Settings.model_fields)
    return load_settings(**{key: value for key, value in overrides.items() if key in known})


class WhisperModel:
    """Everything the Triton model does, given the backend utilities module `pb_utils`."""

    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        self.settings = settings_from_model_config(model_config, args["model_repository"])
        max_batch_size = int(model_config.get("max_batch_size", 1)) or 1
        model_dir = self.settings.resolved_model_dir()
        engine = load_engine(self.settings.engine, str(model_dir), max_batch_size=max_batch_size,
                             **self.settings.engine_options())
        if max_batch_size > engine.max_batch_size:
            raise ValueError(
                f"config.pbtxt max_batch_size {max_batch_size} is above the engine's {engine.max_batch_size}: "
                "lower max_batch_size or rebuild the engine for a larger batch."
            )
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
        self.short = ShortFormTranscriber(engine, self.tokenizer)
        self.long = LongFormTranscriber(self.short.decoder, self.tokenizer)
        logger.info("whisper model ready: engine=%s model_dir=%s", self.settings.engine, model_dir)

    # ---- request parsing ----------------------------------------------------------------
    def _options(self, request) -> DecodeOptions:
        values = {}
        for name, (field, cast) in _OPTION_INPUTS.items():
            array = input_array(self.pb, request, name)
            if array is not None and array.size:
                values[field] = cast(array.reshape(-1)[0])
        return DecodeOptions(**values).validate()

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

    def _flag(self, request, name: str) -> bool:
        array = input_array(self.pb, request, name)
        return bool(array is not None and array.size and bool(array.reshape(-1)[0]))

    def parse(self, request) -> ParsedRequest:
        wav = input_array(self.pb, request, "WAV")
        if wav is None or wav.size == 0:
            raise invalid_parameter("WAV", "WAV is empty: send 16 kHz mono float32 samples.")
        wav = wav.reshape(wav.shape[0], -1) if wav.ndim > 1 else wav.reshape(1, -1)
        lens = input_array(self.pb, request, "WAV_LENS")
        lengths = [wav.shape[1]] * wav.shape[0] if lens is None else [int(n) for n in lens.reshape(-1)]
        if len(lengths) != wav.shape[0]:
            raise invalid_parameter("WAV_LENS", f"WAV_LENS has {len(lengths)} values for {wav.shape[0]} WAV rows.")
        prefixes = input_array(self.pb, request, "TEXT_PREFIX")
        texts = [b""] * wav.shape[0] if prefixes is None else list(prefixes.reshape(-1))
        if len(texts) == 1 and wav.shape[0] > 1:
            texts = texts * wav.shape[0]
        options = self._options(request)
        prompt_ids = self._prompt_ids(request, wav.shape[0])
        words = self._flag(request, "WORD_TIMESTAMPS")
        if words and not self.short.decoder.supports_word_timestamps:
            raise unsupported_word_timestamps(self.settings.engine)
        parsed = ParsedRequest(short=[], long={}, rows=wav.shape[0])
        for row_index, (row, length, prefix, prompt) in enumerate(zip(wav, lengths, texts, prompt_ids)):
            if not 0 < length <= row.size:
                raise invalid_parameter("WAV_LENS", f"WAV_LENS {length} is outside 1..{row.size} (the WAV length).")
            audio = np.ascontiguousarray(row[:length], dtype=np.float32)
            spec = self.tokenizer.parse_text_prefix(prefix.decode("utf-8", "replace") if isinstance(prefix, bytes)
                                                    else str(prefix))
            if length > N_SAMPLES:
                parsed.long[row_index] = (audio, self._long_options(spec, options, prompt))
            else:
                parsed.short.append(ShortRequest(audio=audio, spec=spec, options=options, prompt_ids=prompt,
                                                 word_timestamps=words))
        return parsed

    def _long_options(self, spec, options: DecodeOptions, prompt_ids) -> TranscribeOptions:
        if prompt_ids is not None:
            raise invalid_parameter("PROMPT_IDS", "PROMPT_IDS applies to one window; send WAV of at most 30 s, "
                                    "or use TEXT_PREFIX for longer audio.")
        return TranscribeOptions(language=spec.language, task=spec.task, beam_size=options.beam_size,
                                 max_new_tokens=options.max_new_tokens, repetition_penalty=options.repetition_penalty,
                                 initial_prompt=spec.previous_text,
                                 temperature=options.temperature if options.temperature > 0 else
                                 TranscribeOptions().temperature)

    # ---- execution ----------------------------------------------------------------------
    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: list[tuple[int, ParsedRequest]] = []
        for index, request in enumerate(requests):
            try:
                parsed.append((index, self.parse(request)))
            except WhisperTritonError as exc:
                responses[index] = error_response(self.pb, exc)
        short_items = [item for _, p in parsed for item in p.short]
        try:
            short_results = self.short.transcribe(short_items) if short_items else []
        except Exception as exc:  # the model must answer every request, never crash the stub
            logger.exception("engine failed on a batch of %d windows", len(short_items))
            for index, _ in parsed:
                responses[index] = error_response(self.pb, internal_error(exc, "The engine"))
            return responses
        position = 0
        for index, p in parsed:
            results = short_results[position : position + len(p.short)]
            position += len(p.short)
            try:
                responses[index] = self._response(self._merge_rows(p, results))
            except WhisperTritonError as exc:
                responses[index] = error_response(self.pb, exc)
            except Exception as exc:
                logger.exception("long-form transcription failed")
                responses[index] = error_response(self.pb, internal_error(exc, "Long-form transcription"))
        return responses

    def _merge_rows(self, parsed: ParsedRequest, short_results: list[ShortResult]) -> list[ShortResult]:
        rows: list[ShortResult] = []
        short_iter = iter(short_results)
        for row in range(parsed.rows):
            if row in parsed.long:
                audio, options = parsed.long[row]
                result = self.long.transcribe(audio, options)
                rows.append(ShortResult(result.text, result.language, result.duration,
                                        language_probability=result.language_probability))
            else:
                rows.append(next(short_iter))
        return rows

    def _response(self, results: list[ShortResult]):
        pb = self.pb
        timings = [r.timings for r in results]
        times = [[v for pair in zip(t.starts, t.ends) for v in pair] if t else [] for t in timings]
        tensors = [
            pb.Tensor("TRANSCRIPTS", strings([r.text for r in results])),
            pb.Tensor("LANGUAGE", strings([r.language for r in results])),
            pb.Tensor("LANGUAGE_PROB", np.array([[r.language_probability] for r in results], dtype=np.float32)),
            pb.Tensor("TOKENS", ragged([r.tokens for r in results], np.int32, -1)),
            pb.Tensor("AVG_LOGPROB", np.array([[_number(r.avg_logprob)] for r in results], dtype=np.float32)),
            pb.Tensor("NO_SPEECH_PROB", np.array([[_number(r.no_speech_prob)] for r in results], dtype=np.float32)),
            pb.Tensor("TOKEN_TIMES", ragged(times, np.float32, -1.0)),
            pb.Tensor("TOKEN_PROBS", ragged([t.probabilities if t else [] for t in timings], np.float32, -1.0)),
        ]
        return pb.InferenceResponse(output_tensors=tensors)


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)
