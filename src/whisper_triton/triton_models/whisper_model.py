"""Triton Python-backend model `whisper`: NVIDIA's Whisper I/O on top of any engine.

Inputs (batch dimension first): WAV FP32 [-1] (zero-padded is fine), WAV_LENS INT32 [1] (true
sample count, optional), TEXT_PREFIX STRING [1] (optional, e.g.
`<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`), and optional decoding options
BEAM_SIZE, MAX_NEW_TOKENS (INT32 [1]), TEMPERATURE, REPETITION_PENALTY (FP32 [1]).
Outputs: TRANSCRIPTS STRING [1], LANGUAGE STRING [1].
All requests of one `execute()` go to the engine together.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from ..engines import load_engine
from ..engines.base import DecodeOptions
from ..audio import SAMPLE_RATE
from ..errors import PayloadTooLargeError, WhisperTritonError, invalid_parameter
from ..features import N_SAMPLES
from ..settings import Settings, load_settings
from ..tokenizer import WhisperTokenizer
from ..transcribe import ShortFormTranscriber, ShortRequest

logger = logging.getLogger(__name__)

_OPTION_INPUTS = {
    "BEAM_SIZE": ("beam_size", int),
    "MAX_NEW_TOKENS": ("max_new_tokens", int),
    "TEMPERATURE": ("temperature", float),
    "REPETITION_PENALTY": ("repetition_penalty", float),
}


@dataclass
class ParsedRequest:
    items: list[ShortRequest]


def settings_from_model_config(model_config: dict) -> Settings:
    """Settings from the environment, overridden by the model's non-empty config.pbtxt parameters."""
    parameters = model_config.get("parameters", {}) or {}
    overrides = {key: value.get("string_value", "") for key, value in parameters.items()}
    known = set(Settings.model_fields)
    return load_settings(**{key: value for key, value in overrides.items() if key in known})


class WhisperModel:
    """Everything the Triton model does, given the backend utilities module `pb_utils`."""

    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        self.settings = settings_from_model_config(model_config)
        max_batch_size = int(model_config.get("max_batch_size", 1)) or 1
        model_dir = self.settings.resolved_model_dir()
        engine = load_engine(
            self.settings.engine,
            str(model_dir),
            device=self.settings.device,
            compute_type=self.settings.compute_type,
            cpu_threads=self.settings.cpu_thread_count(),
            max_batch_size=max_batch_size,
        )
        if max_batch_size > engine.max_batch_size:
            raise ValueError(
                f"config.pbtxt max_batch_size {max_batch_size} is above the engine's {engine.max_batch_size}: "
                "lower max_batch_size or rebuild the engine for a larger batch."
            )
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
        self.transcriber = ShortFormTranscriber(engine, self.tokenizer)
        logger.info("whisper model ready: engine=%s model_dir=%s", self.settings.engine, model_dir)

    # ---- request parsing ----------------------------------------------------------------
    def _tensor(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _options(self, request) -> DecodeOptions:
        values = {}
        for name, (field, cast) in _OPTION_INPUTS.items():
            array = self._tensor(request, name)
            if array is not None and array.size:
                values[field] = cast(array.reshape(-1)[0])
        try:
            return DecodeOptions(**values).validate()
        except WhisperTritonError as exc:
            raise invalid_parameter(exc.param or "options", exc.message) from None

    def parse(self, request) -> ParsedRequest:
        wav = self._tensor(request, "WAV")
        if wav is None or wav.size == 0:
            raise invalid_parameter("WAV", "WAV is empty: send 16 kHz mono float32 samples.")
        wav = wav.reshape(wav.shape[0], -1) if wav.ndim > 1 else wav.reshape(1, -1)
        lens = self._tensor(request, "WAV_LENS")
        lengths = [wav.shape[1]] * wav.shape[0] if lens is None else [int(n) for n in lens.reshape(-1)]
        if len(lengths) != wav.shape[0]:
            raise invalid_parameter("WAV_LENS", f"WAV_LENS has {len(lengths)} values for {wav.shape[0]} WAV rows.")
        prefixes = self._tensor(request, "TEXT_PREFIX")
        texts = [b""] * wav.shape[0] if prefixes is None else list(prefixes.reshape(-1))
        if len(texts) == 1 and wav.shape[0] > 1:
            texts = texts * wav.shape[0]
        options = self._options(request)
        items = []
        for row, length, prefix in zip(wav, lengths, texts):
            if not 0 < length <= row.size:
                raise invalid_parameter("WAV_LENS", f"WAV_LENS {length} is outside 1..{row.size} (the WAV length).")
            if length > N_SAMPLES:
                raise PayloadTooLargeError(
                    f"WAV_LENS {length} is {length / SAMPLE_RATE:.1f} s; the `whisper` model takes at most "
                    f"{N_SAMPLES // SAMPLE_RATE} s a row. Split the audio or use the long-form model.",
                    param="WAV_LENS",
                )
            text = prefix.decode("utf-8", "replace") if isinstance(prefix, bytes) else str(prefix)
            spec = self.tokenizer.parse_text_prefix(text)
            items.append(ShortRequest(audio=np.ascontiguousarray(row[:length], dtype=np.float32), spec=spec, options=options))
        return ParsedRequest(items)

    # ---- execution ----------------------------------------------------------------------
    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: list[tuple[int, ParsedRequest]] = []
        for index, request in enumerate(requests):
            try:
                parsed.append((index, self.parse(request)))
            except WhisperTritonError as exc:
                responses[index] = self._error(exc)
        items = [item for _, p in parsed for item in p.items]
        try:
            results = self.transcriber.transcribe(items) if items else []
        except Exception as exc:  # the model must answer every request, never crash the stub
            logger.exception("engine failed on a batch of %d items", len(items))
            failure = WhisperTritonError(
                message=f"The engine failed on this batch ({type(exc).__name__}: {exc}). Retry the request; "
                "if it persists, check the server log.",
                param=None, status=500, type="engine_error",
            )
            for index, _ in parsed:
                responses[index] = self._error(failure)
            return responses
        position = 0
        for index, p in parsed:
            chunk = results[position : position + len(p.items)]
            position += len(p.items)
            responses[index] = self._response(chunk)
        return responses

    def _response(self, results) -> object:
        texts = np.array([[r.text.encode("utf-8")] for r in results], dtype=object)
        languages = np.array([[r.language.encode("utf-8")] for r in results], dtype=object)
        return self.pb.InferenceResponse(
            output_tensors=[self.pb.Tensor("TRANSCRIPTS", texts), self.pb.Tensor("LANGUAGE", languages)]
        )

    def _error(self, exc: WhisperTritonError) -> object:
        code = getattr(self.pb.TritonError, "INVALID_ARG", None)
        error = self.pb.TritonError(exc.encode(), code) if code is not None else self.pb.TritonError(exc.encode())
        return self.pb.InferenceResponse(output_tensors=[], error=error)
