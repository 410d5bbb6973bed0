"""Triton Python-backend model `transcribe`: encoded audio bytes + JSON options -> JSON result.

Long-form transcription for any gRPC/HTTP client, without our Python package: decode, VAD,
windows, then the windows go to `whisper_window` as BLS requests of up to its max_batch_size rows
(which it declares in CAPABILITIES). Timestamps, temperature fallback and stitching run here, above
the engine, so they work on every engine. Its I/O is `contract.tensors.TRANSCRIBE_SPEC`; options
are `contract.options`.

One instance decodes up to `max_concurrent_files` files at once, each on a thread of its own:
`execute` hands the requests over and returns, and each answer leaves through its request's
response sender (Triton allows that for non-decoupled models too: exactly one final response). The
windows of all those files meet in one `WindowScheduler`, which fills each engine batch with the
most urgent windows of any file (window_scheduler.py says how), so concurrent files share batches
and a short file does not wait behind a long one. Beyond the files waiting for a thread
(`MAX_WAITING_FILES`), a request is refused at once with 503.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..pipeline.audio import decode_audio
from ..contract.capabilities import EngineCapabilities
from ..contract.json_limits import MAX_OPTIONS_BYTES, load_object
from ..contract.options import DecodeOptions, TranscribeOptions, parse_options
from ..contract.tensors import WHISPER_WINDOW_SPEC as WINDOW, decode_error, optional_number, strip_pad
from ..engines.base import Hypothesis, TokenTimings
from ..errors import WhisperTritonError
from ..pipeline.longform import LongFormTranscriber
from ..pipeline.tokenizer import WhisperTokenizer
from ..pipeline.windows import RequestCancelled, WindowOutput, stop_if_cancelled, unsupported_word_timestamps
from ..contract.models import engine_model_name, model_not_found
from ..speakers.service import KnownSpeaker, SpeakerTranscriber, diarization_unavailable
from .common import (engine_model_dir, error_response, first_value, input_array, internal_error, model_settings,
                     repository_root, text)
from .window_scheduler import WindowCancelled, WindowScheduler, file_allowance

logger = logging.getLogger(__name__)

_WORD_OUTPUTS = ["TOKEN_TIMES", "TOKEN_PROBS"]
MAX_WAITING_FILES = 64  # per instance, beyond the files being decoded; the proxy's admission bound is lower


def busy_error(waiting: int) -> WhisperTritonError:
    return WhisperTritonError(f"The server is busy: {waiting} files are waiting to be transcribed. Retry shortly.",
                              None, 503, "service_unavailable")


def cancelled_error() -> WhisperTritonError:
    # 499: nginx's "client closed request"; the proxy has gone (or its deadline passed), nobody reads it
    return RequestCancelled()


class TritonWindowDecoder:
    """Decodes windows by BLS requests to `whisper_window`, through one `WindowScheduler` for every
    file this instance decodes: a batch holds up to the declared `max_batch_size` rows of one kind
    (same outputs, decoding options and word timestamps), from one file or several.

    Each file's thread sets its cancellation flag and deadline (`serving`); before each round of
    windows the flag is asked, and again when each of its windows is about to be sent (the scheduler
    drops the queued windows of a cancelled request), so a cancelled request stops within the batches
    already running and no more engine time goes to it."""

    def __init__(self, pb_utils, tokenizer: WhisperTokenizer, model_name: str = WINDOW.name, in_flight: int = 1,
                 urgent_slots: int = 0, router: "EngineRouter | None" = None):
        self.pb = pb_utils
        self.tokenizer = tokenizer
        self.model_name = model_name
        self._capabilities: EngineCapabilities | None = None
        self._lock = threading.Lock()
        self._current = threading.local()  # one file per thread
        self._in_flight = in_flight
        self._owns_router = router is None
        self.router = router or EngineRouter(in_flight, urgent_slots)
        self.router.add(self)

    @property
    def scheduler(self) -> WindowScheduler:
        return self.router.scheduler

    @contextmanager
    def serving(self, is_cancelled: Callable[[], bool], arrival: float | None = None,
                audio_seconds: float = 0.0) -> Iterator[None]:
        """Within the block (one file on this thread): every decoding round first checks `is_cancelled`
        (Triton's request flag), and the file's windows are scheduled by its deadline and allowance."""
        allowance = file_allowance(audio_seconds)
        self._current.is_cancelled = is_cancelled
        self._current.deadline = None if arrival is None else arrival + allowance
        self._current.slack = allowance
        try:
            yield
        finally:
            self._current.is_cancelled = self._current.deadline = self._current.slack = None

    def _batch_rows(self) -> int:
        """Rows per request to whisper_window: one window each for engines that decode in flight (each returns as
        soon as it finishes), else its declared max_batch_size."""
        return 1 if self.capabilities.in_flight_windows else self.capabilities.max_batch_size

    def _slots(self) -> int:
        """Requests to whisper_window at once: the engine's windows in flight, else the configured batches
        (asked only once the capabilities are known: the dispatcher never waits on a BLS call)."""
        known = self._capabilities
        return max(self._in_flight, known.in_flight_windows if known is not None else 0)

    def _check_cancelled(self) -> None:
        is_cancelled = getattr(self._current, "is_cancelled", None)
        if is_cancelled is not None and is_cancelled():
            raise cancelled_error()

    def close(self) -> None:
        if self._owns_router:
            self.router.close()

    @property
    def capabilities(self) -> EngineCapabilities:
        """What the engine behind `whisper_window` declares, asked once (BLS is not allowed in initialize)."""
        with self._lock:
            if self._capabilities is None:
                reply = self._exec(self._request([np.zeros(1, dtype=np.float32)], None, None, False, ["CAPABILITIES"]))
                self._capabilities = EngineCapabilities.from_json(reply["CAPABILITIES"].reshape(-1)[0])
            return self._capabilities

    def _request(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str], scopes: list[str | None] | None = None):
        """One request of len(audios) rows: WAV zero-padded to the longest, PROMPT_IDS padded, one per row,
        and each row's CACHE_SCOPE (its file's request: encoder passes are reused within it only)."""
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
        if scopes and any(scopes):
            tensors.append(pb.Tensor("CACHE_SCOPE", np.array([[(s or "").encode()] for s in scopes], dtype=object)))
        return pb.InferenceRequest(model_name=self.model_name, inputs=tensors, requested_output_names=outputs)

    def _run_all(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                 words: bool, outputs: list[str], scope: str | None = None) -> list[dict[str, np.ndarray]]:
        """Replies row by row, through the scheduler (batches of up to max_batch_size rows)."""
        self._check_cancelled()
        deadline, slack = getattr(self._current, "deadline", None), getattr(self._current, "slack", None)
        payloads = list(zip(audios, prompts if prompts is not None else [None] * len(audios), [scope] * len(audios)))
        unwanted = _Unwanted(getattr(self._current, "is_cancelled", None))
        try:
            return self.scheduler.run((self.model_name, tuple(outputs), options, words), payloads,
                                      time.monotonic() if deadline is None else deadline,
                                      float("inf") if slack is None else slack, unwanted)
        except WindowCancelled:
            raise cancelled_error() from None
        finally:
            unwanted.stop()

    def _run_batch(self, group: tuple, payloads: list[tuple[np.ndarray, list[int] | None, str | None]]) -> list[dict]:
        """One request to whisper_window for one batch of rows; its reply split back into rows."""
        _, outputs, options, words = group
        audios = [audio for audio, _, _ in payloads]
        prompts = None if payloads[0][1] is None else [prompt for _, prompt, _ in payloads]
        scopes = [scope for _, _, scope in payloads]
        reply = self._exec(self._request(audios, prompts, options, words, list(outputs), scopes))
        return [{name: array[row : row + 1] for name, array in reply.items()} for row in range(len(payloads))]

    def _exec(self, request) -> dict[str, np.ndarray]:
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            decoded = decode_error(message)
            if decoded is None and _not_ready(message):
                raise model_unavailable(self.model_name)
            raise decoded or WhisperTritonError(
                "The window decoder failed; retry, and check the server log if it persists.", None, 500, "engine_error")
        return {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}

    def _outputs(self, words: bool) -> list[str]:
        names = ["TOKENS", "AVG_LOGPROB", "ENGINE_SECONDS"] if self.capabilities.scores else ["TOKENS", "ENGINE_SECONDS"]
        if self.capabilities.no_speech_prob:
            names.append("NO_SPEECH_PROB")
        return names + (_WORD_OUTPUTS if words else [])

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, scope: str | None = None) -> list[WindowOutput]:
        if word_timestamps and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        if not audios:
            return []
        names = self._outputs(word_timestamps)
        replies = self._run_all(audios, prompts, options, word_timestamps, names, scope)
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
        seconds = json.loads(reply["ENGINE_SECONDS"].reshape(-1)[0]) if "ENGINE_SECONDS" in reply else {}
        return WindowOutput(hypothesis, timings, seconds)

    def detect_language(self, audios: list[np.ndarray], scope: str | None = None) -> list[dict[str, float]]:
        if not self.capabilities.multilingual:
            return [{"en": 1.0} for _ in audios]
        # asked for the language outputs alone, whisper_window runs detection and not `generate`
        if not audios:
            return []
        replies = self._run_all(audios, None, None, False, ["LANGUAGE_PROBS", "ENGINE_SECONDS"], scope)
        seconds = self._detection_seconds()
        for reply in (r for r in replies if "ENGINE_SECONDS" in r):
            for stage, value in json.loads(reply["ENGINE_SECONDS"].reshape(-1)[0]).items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        return [json.loads(reply["LANGUAGE_PROBS"].reshape(-1)[0]) for reply in replies]

    def _detection_seconds(self) -> dict[str, float]:
        if not hasattr(self._current, "detection_seconds"):
            self._current.detection_seconds = {}
        return self._current.detection_seconds

    def take_detection_seconds(self) -> dict[str, float]:
        """The engine's time in this file's detections since the last call (encoder, decoder shares)."""
        seconds = dict(self._detection_seconds())
        self._detection_seconds().clear()
        return seconds


class _Unwanted:
    """A file's rows are unwanted once its request is cancelled, or once the file stopped waiting for
    them (one of its rows failed, or it was cancelled): the scheduler then drops them unsent. After
    `stop` Triton's flag is never asked again: the request may be answered and released by then."""

    def __init__(self, is_cancelled: Callable[[], bool] | None):
        self._is_cancelled = is_cancelled
        self._stopped = False
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            return self._stopped or (self._is_cancelled is not None and bool(self._is_cancelled()))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


class EngineRouter:
    """The one scheduler of every engine model's windows: `transcribe` decodes files of several models
    at once, and their windows meet here. A batch holds rows of one engine model only (the group key
    starts with its Triton name), up to the `max_batch_size` that model declares; earliest deadline
    first across all of them, so a short file of one model is not held up by a long file of another."""

    def __init__(self, in_flight: int = 1, urgent_slots: int = 0):
        self.decoders: dict[str, TritonWindowDecoder] = {}
        self.in_flight = in_flight
        self.scheduler = WindowScheduler(self._run, lambda: 1, self._slots, urgent_slots, group_rows=self._rows)

    def _slots(self) -> int:
        """Requests in flight at once: the most any engine model asks for (in-flight engines take one
        window per request and keep many running), else the configured batches."""
        return max([self.in_flight] + [decoder._slots() for decoder in list(self.decoders.values())])

    def add(self, decoder: "TritonWindowDecoder") -> None:
        self.decoders[decoder.model_name] = decoder

    def _run(self, group: tuple, payloads: list) -> list:
        return self.decoders[group[0]]._run_batch(group, payloads)

    def _rows(self, group: tuple) -> int:
        return self.decoders[group[0]]._batch_rows()

    def close(self) -> None:
        self.scheduler.close()


def model_unavailable(engine_model: str) -> WhisperTritonError:
    """The engine model of the requested model is not loaded (it was unloaded, or never loaded):
    the proxy loads models before it sends requests, so this reaches gRPC callers and races only."""
    return WhisperTritonError(f"The model's engine ({engine_model}) is not loaded at the moment; retry shortly "
                              "(requests through the HTTP proxy load it first).", "model", 503, "model_not_ready")


def _not_ready(message: str) -> bool:
    text = message.lower()
    return "unknown model" in text or "is not ready" in text or "is not found" in text or "unavailable" in text


@dataclass
class ModelPipeline:
    """One model's part of `transcribe`: its tokenizer, its engine model's decoder, and the pipeline over both."""

    model_id: str | None
    model_dir: str
    decoder: TritonWindowDecoder
    pipeline: LongFormTranscriber


class TranscribeModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        self.settings = model_settings(args)
        model_dir = self.settings.resolved_model_dir()
        self.tokenizer = WhisperTokenizer.from_model_dir(model_dir)
        self.router = EngineRouter(self.settings.window_batches_in_flight, self.settings.urgent_window_batches)
        self.decoder = TritonWindowDecoder(pb_utils, self.tokenizer, router=self.router)
        self.pipeline = LongFormTranscriber(self.decoder, self.tokenizer)
        self.repository = repository_root(args)
        self._models: dict[str, ModelPipeline] = {}  # model id -> its pipeline (engine model whisper_window-<id>)
        self._models_lock = threading.Lock()
        self.encoder, self.speakers_missing = _speaker_encoder(self.settings.resolved_speaker_encoder())
        self._diarizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diarize")
        self._files = ThreadPoolExecutor(max_workers=self.settings.max_concurrent_files, thread_name_prefix="file")
        self._waiting = 0  # files handed over and not yet started
        self._count_lock = threading.Lock()
        logger.info("transcribe model ready (tokenizer from %s; %d files at once, %d window batches in flight)",
                    model_dir, self.settings.max_concurrent_files, self.settings.window_batches_in_flight)

    def options(self, request) -> TranscribeOptions:
        raw = text(first_value(self.pb, request, "OPTIONS"))
        if not raw.strip():
            return TranscribeOptions()
        return parse_options(load_object(raw, "OPTIONS", MAX_OPTIONS_BYTES))

    def known_speakers(self, request, options: TranscribeOptions) -> list[KnownSpeaker] | None:
        """With diarize: the reference clips checked and embedded (400s name the parameter); None without."""
        array = input_array(self.pb, request, "SPEAKER_REFERENCES")
        references = [] if array is None else [bytes(v) for v in array.reshape(-1)]
        if not options.diarize and not references:
            return None
        if self.encoder is None:
            raise diarization_unavailable(self.speakers_missing)
        return SpeakerTranscriber.known_speakers_of(self.encoder, options, references)

    def speakers(self, chosen) -> SpeakerTranscriber:
        """The diarizing transcriber around the request's model's pipeline (the encoder and its threads shared)."""
        return SpeakerTranscriber(chosen.pipeline, self.encoder, self._diarizing)

    def model(self, model_id: str | None) -> ModelPipeline:
        """The pipeline of `model_id` (None or the default's id: whisper_window). Another model's engine
        model is whisper_window-<id>, whose config.pbtxt the registry rendered beside this model's: its
        model_dir gives the tokenizer, its CAPABILITIES the rest. Re-read when that model_dir changes (a
        model name given to another model), so a cached tokenizer never answers for the wrong model."""
        if model_id is None or model_id == (self.settings.served_model_name or None):
            return ModelPipeline(None, "", self.decoder, self.pipeline)
        engine_model = engine_model_name(model_id)  # validated: never a path before this
        model_dir = engine_model_dir(self.repository / engine_model / "config.pbtxt")
        if model_dir is None:
            raise model_not_found(model_id)
        with self._models_lock:
            known = self._models.get(model_id)
            if known is not None and known.model_dir == model_dir:
                return known
            tokenizer = WhisperTokenizer.from_model_dir(model_dir)
            decoder = TritonWindowDecoder(self.pb, tokenizer, engine_model, router=self.router)
            self._models[model_id] = ModelPipeline(model_id, model_dir, decoder, LongFormTranscriber(decoder, tokenizer))
            logger.info("transcribe: model %s -> %s (tokenizer from %s)", model_id, engine_model, model_dir)
            return self._models[model_id]

    def prepare(self, request) -> tuple[ModelPipeline, TranscribeOptions]:
        """The request's model and its options, checked against that model before any audio work."""
        options = self.options(request)
        chosen = self.model(options.model)
        return chosen, chosen.pipeline.check(options)

    def transcribe(self, request, arrival: float | None = None) -> dict:
        chosen, options = self.prepare(request)
        known = self.known_speakers(request, options)
        cancelled = _cancellation_flag(request)
        stop_if_cancelled(cancelled)  # dropped while it waited for a thread: not even decoded
        data = first_value(self.pb, request, "AUDIO")
        started = time.perf_counter()
        audio = decode_audio(bytes(data or b""), max_seconds=self.settings.max_audio_seconds)
        decode_seconds = time.perf_counter() - started
        stop_if_cancelled(cancelled)
        arrival = time.monotonic() if arrival is None else arrival
        with chosen.decoder.serving(cancelled, arrival, audio.size / 16_000):
            if known is not None:
                result = self.speakers(chosen).transcribe(audio, options, known)
            else:
                result = chosen.pipeline.transcribe(audio, options, cancelled=cancelled)
        result.info.work.add_seconds("audio_decode", decode_seconds)
        return result.to_dict(words=options.word_timestamps, tokens=options.include_tokens)

    def respond(self, request, arrival: float | None = None):
        """The one response to `request`: its RESULT, or its error."""
        try:
            result = self.transcribe(request, arrival)
            return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(
                "RESULT", np.array([json.dumps(result, ensure_ascii=False).encode()], dtype=object))])
        except WhisperTritonError as exc:
            if exc.status == 499:  # a warning: the stub's log shows warnings and above
                logger.warning("request %s cancelled by its caller: decoding stopped", _request_id(request))
            return error_response(self.pb, exc)
        except Exception as exc:  # answer every request; never take the stub down
            logger.exception("transcription failed")
            return error_response(self.pb, internal_error(exc, "Transcription"))

    def execute(self, requests: list) -> None:
        """Hands each request to a file thread and returns: answers leave through the response senders."""
        for request in requests:
            sender = request.get_response_sender()
            with self._count_lock:
                waiting = self._waiting
                if waiting < MAX_WAITING_FILES:
                    self._waiting += 1
            if waiting >= MAX_WAITING_FILES:
                sender.send(error_response(self.pb, busy_error(waiting)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._files.submit(self._serve, request, sender, time.monotonic())
        return None

    def _serve(self, request, sender, arrival: float) -> None:
        with self._count_lock:
            self._waiting -= 1
        response = self.respond(request, arrival)
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        self._files.shutdown(wait=False, cancel_futures=True)
        self._diarizing.shutdown(wait=False, cancel_futures=True)
        self.router.close()


def _speaker_encoder(encoder_path):
    """The speaker encoder, or None and why not (diarize=true requests then get a 422 saying so).
    A capability of this model, declared by what is installed: the encoder's converted weights and scikit-learn."""
    from ..speakers.encoder import load_encoder

    try:
        import sklearn  # noqa: F401  (the clustering)

        return load_encoder(str(encoder_path)), ""
    except (ImportError, FileNotFoundError, OSError, ValueError) as exc:
        logger.warning("speaker diarization is off: %s", exc)
        return None, str(exc)


def _cancellation_flag(request) -> Callable[[], bool]:
    """Triton's `request.is_cancelled()` (set when the gRPC caller cancels or its deadline passes)."""
    check = getattr(request, "is_cancelled", None)
    return check if callable(check) else (lambda: False)


def _request_id(request) -> str:
    try:
        return request.request_id() or "-"
    except Exception:  # noqa: BLE001 - only for the log line
        return "-"
