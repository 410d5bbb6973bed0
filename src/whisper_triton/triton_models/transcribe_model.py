"""Triton Python-backend model `transcribe`: encoded audio bytes + JSON options -> JSON result.

Long-form transcription for any gRPC/HTTP client, without our Python package: decode, VAD,
windows, then the windows of a file go to `whisper_window` as BLS requests of up to its
max_batch_size rows each (which it declares in CAPABILITIES), all in flight at once: one engine
batch per request, and Triton's dynamic batcher still packs requests of several files together.
Timestamps, temperature fallback and stitching run here, above the engine, so they work on every
engine. Its I/O is `contract.tensors.TRANSCRIBE_SPEC`; options are `contract.options`.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from ..audio import decode_audio
from ..contract.capabilities import EngineCapabilities
from ..contract.json_limits import MAX_OPTIONS_BYTES, load_object
from ..contract.options import MAX_BATCH_SIZE, DecodeOptions, TranscribeOptions, parse_options
from ..contract.tensors import WHISPER_WINDOW_SPEC as WINDOW, decode_error, optional_number, strip_pad
from ..engines.base import Hypothesis, TokenTimings
from ..errors import WhisperTritonError
from ..longform import LongFormTranscriber
from ..tokenizer import WhisperTokenizer
from ..transcribe import WindowOutput, unsupported_word_timestamps
from .common import error_response, first_value, internal_error, model_settings, text

logger = logging.getLogger(__name__)

_WORD_OUTPUTS = ["TOKEN_TIMES", "TOKEN_PROBS"]


def cancelled_error() -> WhisperTritonError:
    # 499: nginx's "client closed request"; the proxy has gone (or its deadline passed), nobody reads it
    return WhisperTritonError("The request was cancelled (the client disconnected or its deadline passed); "
                              "decoding stopped.", None, 499, "cancelled")


class TritonWindowDecoder:
    """Decodes windows by sending them to `whisper_window` as BLS requests of up to `max_batch_size`
    rows each, all in flight at once: a batch of windows is one request, so its first window never
    runs alone while the rest queue (Triton's dynamic batcher still packs requests of other files).

    Before each round of requests it asks whether the current file's request was cancelled
    (`watching`): a cancelled request stops between rounds, so no engine time goes to it."""

    def __init__(self, pb_utils, tokenizer: WhisperTokenizer, model_name: str = WINDOW.name):
        self.pb = pb_utils
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._pool = ThreadPoolExecutor(max_workers=MAX_BATCH_SIZE, thread_name_prefix="bls")
        self._capabilities: EngineCapabilities | None = None
        self._lock = threading.Lock()
        self._current = threading.local()  # execute() runs one file at a time per thread

    @contextmanager
    def watching(self, is_cancelled: Callable[[], bool]) -> Iterator[None]:
        """Within the block, every decoding round first checks `is_cancelled` (Triton's request flag)."""
        self._current.is_cancelled = is_cancelled
        try:
            yield
        finally:
            self._current.is_cancelled = None

    def _check_cancelled(self) -> None:
        is_cancelled = getattr(self._current, "is_cancelled", None)
        if is_cancelled is not None and is_cancelled():
            raise cancelled_error()

    @property
    def capabilities(self) -> EngineCapabilities:
        """What the engine behind `whisper_window` declares, asked once (BLS is not allowed in initialize)."""
        with self._lock:
            if self._capabilities is None:
                reply = self._exec(self._request([np.zeros(1, dtype=np.float32)], None, None, False, ["CAPABILITIES"]))
                self._capabilities = EngineCapabilities.from_json(reply["CAPABILITIES"].reshape(-1)[0])
            return self._capabilities

    def _request(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str]):
        """One request of len(audios) rows: WAV zero-padded to the longest, PROMPT_IDS padded, one per row."""
        pb = self.pb
        rows = len(audios)
        wav = np.zeros((rows, max(a.size for a in audios)), dtype=WINDOW.input("WAV").numpy_dtype)
        for index, audio in enumerate(audios):
            wav[index, : audio.size] = audio
        tensors = [pb.Tensor("WAV", wav),
                   pb.Tensor("WAV_LENS", np.array([[a.size] for a in audios], dtype=WINDOW.input("WAV_LENS").numpy_dtype))]
        if prompts is not None:
            ids = np.full((rows, max(len(p) for p in prompts)), -1, dtype=WINDOW.input("PROMPT_IDS").numpy_dtype)
            for index, prompt in enumerate(prompts):
                ids[index, : len(prompt)] = prompt
            tensors.append(pb.Tensor("PROMPT_IDS", ids))
        if options is not None:
            tensors.append(pb.Tensor("DECODE_OPTIONS", np.array([[options.model_dump_json().encode()]] * rows,
                                                                dtype=object)))
        if words:
            tensors.append(pb.Tensor("WORD_TIMESTAMPS", np.ones((rows, 1), dtype=bool)))
        return pb.InferenceRequest(model_name=self.model_name, inputs=tensors, requested_output_names=outputs)

    def _run_all(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str]) -> list[dict[str, np.ndarray]]:
        """Replies row by row, from requests of up to max_batch_size rows each."""
        self._check_cancelled()
        size = max(1, self.capabilities.max_batch_size)  # declared by whisper_window
        requests = [self._request(audios[first : first + size], None if prompts is None else prompts[first : first + size],
                                  options, words, outputs) for first in range(0, len(audios), size)]
        replies = list(self._pool.map(self._exec, requests))
        return [{name: array[row : row + 1] for name, array in reply.items()}
                for reply, count in zip(replies, (len(audios[f : f + size]) for f in range(0, len(audios), size)))
                for row in range(count)]

    def _exec(self, request) -> dict[str, np.ndarray]:
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            raise decode_error(message) or WhisperTritonError(
                "The window decoder failed; retry, and check the server log if it persists.", None, 500, "engine_error")
        return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}

    def _outputs(self, words: bool) -> list[str]:
        names = ["TOKENS", "AVG_LOGPROB"] if self.capabilities.scores else ["TOKENS"]
        if self.capabilities.no_speech_prob:
            names.append("NO_SPEECH_PROB")
        return names + (_WORD_OUTPUTS if words else [])

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False) -> list[WindowOutput]:
        if word_timestamps and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        if not audios:
            return []
        names = self._outputs(word_timestamps)
        replies = self._run_all(audios, prompts, options, word_timestamps, names)
        return [self._output(reply, word_timestamps) for reply in replies]

    def _output(self, reply: dict[str, np.ndarray], words: bool) -> WindowOutput:
        tokens = [int(t) for t in strip_pad(reply["TOKENS"].reshape(-1), WINDOW.output("TOKENS").pad)]
        scores = {name: optional_number(reply[name].reshape(-1)[0]) if name in reply else None
                  for name in ("AVG_LOGPROB", "NO_SPEECH_PROB")}
        hypothesis = Hypothesis(tokens=tokens, avg_logprob=scores["AVG_LOGPROB"], no_speech_prob=scores["NO_SPEECH_PROB"])
        timings = None
        if words:
            times = [float(v) for v in strip_pad(reply["TOKEN_TIMES"].reshape(-1), WINDOW.output("TOKEN_TIMES").pad)]
            probs = [float(v) for v in strip_pad(reply["TOKEN_PROBS"].reshape(-1), WINDOW.output("TOKEN_PROBS").pad)]
            timings = TokenTimings(starts=times[0::2], ends=times[1::2], probabilities=probs)
        return WindowOutput(hypothesis, timings)

    def detect_language(self, audios: list[np.ndarray]) -> list[dict[str, float]]:
        if not self.capabilities.multilingual:
            return [{"en": 1.0} for _ in audios]
        # asked for the language outputs alone, whisper_window runs detection and not `generate`
        if not audios:
            return []
        replies = self._run_all(audios, None, None, False, ["LANGUAGE_PROBS"])
        return [json.loads(reply["LANGUAGE_PROBS"].reshape(-1)[0]) for reply in replies]


class TranscribeModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        self.settings = model_settings(args)
        model_dir = self.settings.resolved_model_dir()
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir)
        self.decoder = TritonWindowDecoder(pb_utils, self.tokenizer)
        self.pipeline = LongFormTranscriber(self.decoder, self.tokenizer)
        logger.info("transcribe model ready (tokenizer from %s)", model_dir)

    def options(self, request) -> TranscribeOptions:
        raw = text(first_value(self.pb, request, "OPTIONS"))
        if not raw.strip():
            return TranscribeOptions()
        return parse_options(load_object(raw, "OPTIONS", MAX_OPTIONS_BYTES))

    def transcribe(self, request) -> dict:
        options = self.pipeline.check(self.options(request))  # before any audio work
        data = first_value(self.pb, request, "AUDIO")
        audio = decode_audio(bytes(data or b""), max_seconds=self.settings.max_audio_seconds)
        with self.decoder.watching(_cancellation_flag(request)):
            result = self.pipeline.transcribe(audio, options)
        return result.to_dict(words=options.word_timestamps, tokens=options.include_tokens)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                result = self.transcribe(request)
                responses.append(self.pb.InferenceResponse(
                    output_tensors=[self.pb.Tensor("RESULT", np.array([json.dumps(result, ensure_ascii=False).encode()],
                                                                      dtype=object))]))
            except WhisperTritonError as exc:
                if exc.status == 499:  # a warning: the stub's log shows warnings and above
                    logger.warning("request %s cancelled by its caller: decoding stopped", _request_id(request))
                responses.append(error_response(self.pb, exc))
            except Exception as exc:  # answer every request; never take the stub down
                logger.exception("transcription failed")
                responses.append(error_response(self.pb, internal_error(exc, "Transcription")))
        return responses


def _cancellation_flag(request) -> Callable[[], bool]:
    """Triton's `request.is_cancelled()` (set when the gRPC caller cancels or its deadline passes)."""
    check = getattr(request, "is_cancelled", None)
    return check if callable(check) else (lambda: False)


def _request_id(request) -> str:
    try:
        return request.request_id() or "-"
    except Exception:  # noqa: BLE001 - only for the log line
        return "-"
