"""Triton Python-backend model `transcribe`: encoded audio bytes + JSON options -> JSON result.

Long-form transcription for any gRPC/HTTP client, without our Python package: decode, VAD,
windows, then every window of a file goes to the `whisper` model as its own BLS request, all in
flight at once, so Triton's dynamic batcher packs them into engine batches. Timestamps, temperature
fallback and stitching run here, above the engine, so they work on every engine.

Inputs: AUDIO STRING [1] (the file's bytes), OPTIONS STRING [1] (JSON, optional; see
`longform.TranscribeOptions`). Output: RESULT STRING [1] (JSON: text, language, duration, segments).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..audio import decode_audio
from ..engines.base import DecodeOptions, Hypothesis, TokenTimings
from ..errors import WhisperTritonError, invalid_parameter
from ..longform import MAX_BATCH_SIZE, LongFormTranscriber, TranscribeOptions
from ..settings import Settings
from ..tokenizer import WhisperTokenizer
from ..transcribe import WindowOutput, unsupported_word_timestamps
from .common import error_response, input_array, internal_error
from .whisper_model import settings_from_model_config

logger = logging.getLogger(__name__)

WHISPER_MODEL = "whisper"
_OUTPUTS = ["TOKENS", "AVG_LOGPROB", "NO_SPEECH_PROB", "LANGUAGE", "LANGUAGE_PROB"]


def whisper_settings(repository: Path, model_name: str = WHISPER_MODEL) -> Settings:
    """The `whisper` model's settings, read from its config.pbtxt, so both models agree on the model."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / model_name / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return settings_from_model_config(json_format.MessageToDict(config, preserving_proto_field_name=True),
                                      repository / model_name)


class TritonWindowDecoder:
    """Decodes windows by sending each to the `whisper` model as a BLS request, all at once."""

    def __init__(self, pb_utils, tokenizer: WhisperTokenizer, engine_name: str, model_name: str = WHISPER_MODEL):
        self.pb = pb_utils
        self.tokenizer = tokenizer
        self.engine_name = engine_name
        self.model_name = model_name
        self.is_multilingual = tokenizer.is_multilingual
        self.supports_word_timestamps = engine_name == "ctranslate2"
        self._pool = ThreadPoolExecutor(max_workers=MAX_BATCH_SIZE, thread_name_prefix="bls")

    def _request(self, audio: np.ndarray, prompt: list[int] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str]):
        pb = self.pb
        tensors = [pb.Tensor("WAV", audio.reshape(1, -1).astype(np.float32)),
                   pb.Tensor("WAV_LENS", np.array([[audio.size]], dtype=np.int32))]
        if prompt is not None:
            tensors.append(pb.Tensor("PROMPT_IDS", np.array([prompt], dtype=np.int32)))
        if options is not None:
            tensors += [pb.Tensor("BEAM_SIZE", np.array([[options.beam_size]], dtype=np.int32)),
                        pb.Tensor("MAX_NEW_TOKENS", np.array([[options.max_new_tokens]], dtype=np.int32)),
                        pb.Tensor("TEMPERATURE", np.array([[options.temperature]], dtype=np.float32)),
                        pb.Tensor("REPETITION_PENALTY", np.array([[options.repetition_penalty]], dtype=np.float32))]
        if words:
            tensors.append(pb.Tensor("WORD_TIMESTAMPS", np.array([[True]], dtype=bool)))
        return pb.InferenceRequest(model_name=self.model_name, inputs=tensors, requested_output_names=outputs)

    def _run_all(self, requests: list) -> list[dict[str, np.ndarray]]:
        return list(self._pool.map(self._exec, requests))

    def _exec(self, request) -> dict[str, np.ndarray]:
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            raise WhisperTritonError.decode(message) or WhisperTritonError(
                f"The whisper model failed: {message}", None, 500, "engine_error")
        return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False) -> list[WindowOutput]:
        if word_timestamps and not self.supports_word_timestamps:
            raise unsupported_word_timestamps(self.engine_name)
        names = _OUTPUTS + (["TOKEN_TIMES", "TOKEN_PROBS"] if word_timestamps else [])
        replies = self._run_all([self._request(a, p, options, word_timestamps, names) for a, p in zip(audios, prompts)])
        return [self._output(reply, word_timestamps) for reply in replies]

    def _output(self, reply: dict[str, np.ndarray], words: bool) -> WindowOutput:
        tokens = [int(t) for t in reply["TOKENS"].reshape(-1) if t >= 0]
        hypothesis = Hypothesis(tokens=tokens, avg_logprob=_optional(reply["AVG_LOGPROB"]),
                                no_speech_prob=_optional(reply["NO_SPEECH_PROB"]))
        timings = None
        if words:
            times = [float(v) for v in reply["TOKEN_TIMES"].reshape(-1) if v >= 0]
            probs = [float(v) for v in reply["TOKEN_PROBS"].reshape(-1) if v >= 0]
            timings = TokenTimings(starts=times[0::2], ends=times[1::2], probabilities=probs)
        return WindowOutput(hypothesis, timings)

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        if not self.is_multilingual:
            return [{"en": 1.0} for _ in audios]
        # a prompt of <|startoftranscript|> alone: the whisper model detects, one token is enough
        probe = DecodeOptions(max_new_tokens=1)
        replies = self._run_all([self._request(a, [self.tokenizer.sot], probe, False, ["LANGUAGE", "LANGUAGE_PROB"])
                                 for a in audios])
        return [{reply["LANGUAGE"].reshape(-1)[0].decode(): float(reply["LANGUAGE_PROB"].reshape(-1)[0])}
                for reply in replies]


def _optional(array: np.ndarray) -> float | None:
    value = float(array.reshape(-1)[0])
    return None if np.isnan(value) else value


class TranscribeModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        repository = Path(args["model_repository"]).parent
        self.settings = whisper_settings(repository)
        model_dir = self.settings.resolved_model_dir()
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir)
        decoder = TritonWindowDecoder(pb_utils, self.tokenizer, self.settings.engine)
        self.pipeline = LongFormTranscriber(decoder, self.tokenizer)
        logger.info("transcribe model ready (tokenizer from %s, engine %s)", model_dir, self.settings.engine)

    def options(self, request) -> TranscribeOptions:
        array = input_array(self.pb, request, "OPTIONS")
        raw = array.reshape(-1)[0] if array is not None and array.size else b""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if not text.strip():
            return TranscribeOptions()
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise invalid_parameter("OPTIONS", f"OPTIONS is not valid JSON ({exc}).") from None
        if not isinstance(values, dict):
            raise invalid_parameter("OPTIONS", "OPTIONS must be a JSON object.")
        return TranscribeOptions.from_dict(values)

    def transcribe(self, request) -> dict:
        options = self.pipeline.check(self.options(request))
        array = input_array(self.pb, request, "AUDIO")
        data = array.reshape(-1)[0] if array is not None and array.size else b""
        audio = decode_audio(bytes(data), max_seconds=self.settings.max_audio_seconds)
        return self.pipeline.transcribe(audio, options).to_dict(words=options.word_timestamps)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                result = self.transcribe(request)
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[self.pb.Tensor("RESULT", np.array([json.dumps(result, ensure_ascii=False).encode()],
                                                                      dtype=object))]))
            except WhisperTritonError as exc:
                responses.append(error_response(self.pb, exc))
            except Exception as exc:  # answer every request; never take the stub down
                logger.exception("transcription failed")
                responses.append(error_response(self.pb, internal_error(exc, "Transcription")))
        return responses
