"""Triton Python-backend model `transcribe`: encoded audio bytes + JSON options -> JSON result.

Long-form transcription for any gRPC/HTTP client, without our Python package: decode, VAD,
windows, then the windows of a file go to the `whisper` model as BLS requests of up to its
max_batch_size rows each, all in flight at once (one engine batch per request; Triton's dynamic
batcher still packs requests of several files together). Timestamps, temperature
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
from .common import error_response, input_array, internal_error, ragged
from .whisper_model import settings_from_model_config

logger = logging.getLogger(__name__)

WHISPER_MODEL = "whisper"
_OUTPUTS = ["TOKENS", "AVG_LOGPROB", "NO_SPEECH_PROB", "LANGUAGE", "LANGUAGE_PROB"]


def whisper_config(repository: Path, model_name: str = WHISPER_MODEL) -> dict:
    """The `whisper` model's config.pbtxt as a dict, so both models agree on the model and batch size."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / model_name / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def whisper_settings(repository: Path, model_name: str = WHISPER_MODEL) -> Settings:
    """The `whisper` model's settings, read from its config.pbtxt."""
    return settings_from_model_config(whisper_config(repository, model_name), repository / model_name)


class TritonWindowDecoder:
    """Decodes windows by sending them to the `whisper` model as BLS requests of up to
    `max_batch_size` rows each (one request for a whole batch, so the first window never runs
    alone while the rest queue), the requests all in flight at once."""

    def __init__(self, pb_utils, tokenizer: WhisperTokenizer, engine_name: str, model_name: str = WHISPER_MODEL,
                 max_batch_size: int = 1):
        self.pb = pb_utils
        self.tokenizer = tokenizer
        self.engine_name = engine_name
        self.model_name = model_name
        self.max_batch_size = max(1, max_batch_size)
        self.is_multilingual = tokenizer.is_multilingual
        self.supports_word_timestamps = engine_name == "ctranslate2"
        self._pool = ThreadPoolExecutor(max_workers=MAX_BATCH_SIZE, thread_name_prefix="bls")

    def _request(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str]):
        """One request of len(audios) rows: WAV zero-padded to the longest, PROMPT_IDS -1 padded."""
        pb = self.pb
        rows = len(audios)
        wav = np.zeros((rows, max(a.size for a in audios)), dtype=np.float32)
        for index, audio in enumerate(audios):
            wav[index, : audio.size] = audio
        tensors = [pb.Tensor("WAV", wav),
                   pb.Tensor("WAV_LENS", np.array([[a.size] for a in audios], dtype=np.int32))]
        if prompts is not None:
            tensors.append(pb.Tensor("PROMPT_IDS", ragged(prompts, np.int32, -1)))
        if options is not None:
            tensors += [pb.Tensor("BEAM_SIZE", np.full((rows, 1), options.beam_size, dtype=np.int32)),
                        pb.Tensor("MAX_NEW_TOKENS", np.full((rows, 1), options.max_new_tokens, dtype=np.int32)),
                        pb.Tensor("TEMPERATURE", np.full((rows, 1), options.temperature, dtype=np.float32)),
                        pb.Tensor("REPETITION_PENALTY", np.full((rows, 1), options.repetition_penalty, dtype=np.float32))]
        if words:
            tensors.append(pb.Tensor("WORD_TIMESTAMPS", np.ones((rows, 1), dtype=bool)))
        return pb.InferenceRequest(model_name=self.model_name, inputs=tensors, requested_output_names=outputs)

    def _run_all(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str]) -> list[dict[str, np.ndarray]]:
        """Row by row replies of requests of up to max_batch_size rows each."""
        size = self.max_batch_size
        requests = [self._request(audios[first : first + size], None if prompts is None else prompts[first : first + size],
                                  options, words, outputs) for first in range(0, len(audios), size)]
        replies = list(self._pool.map(self._exec, requests))
        return [{name: array[row : row + 1] for name, array in reply.items()}
                for reply in replies for row in range(next(iter(reply.values())).shape[0])]

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
        if not audios:
            return []
        names = _OUTPUTS + (["TOKEN_TIMES", "TOKEN_PROBS"] if word_timestamps else [])
        replies = self._run_all(audios, prompts, options, word_timestamps, names)
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
        if not audios:
            return []
        # a prompt of <|startoftranscript|> alone: the whisper model detects, one token is enough
        probe = DecodeOptions(max_new_tokens=1)
        replies = self._run_all(audios, [[self.tokenizer.sot]] * len(audios), probe, False, ["LANGUAGE", "LANGUAGE_PROB"])
        return [{reply["LANGUAGE"].reshape(-1)[0].decode(): float(reply["LANGUAGE_PROB"].reshape(-1)[0])}
                for reply in replies]


def _optional(array: np.ndarray) -> float | None:
    value = float(array.reshape(-1)[0])
    return None if np.isnan(value) else value


class TranscribeModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        repository = Path(args["model_repository"]).parent
        config = whisper_config(repository)
        self.settings = settings_from_model_config(config, repository / WHISPER_MODEL)
        model_dir = self.settings.resolved_model_dir()
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir)
        # rows per BLS request: what `whisper` takes in one request (a batching model counts rows)
        max_batch_size = int(config.get("max_batch_size", 0) or 1)
        decoder = TritonWindowDecoder(pb_utils, self.tokenizer, self.settings.engine, max_batch_size=max_batch_size)
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
