"""Triton Python-backend model `transcribe_stream` (decoupled): audio file bytes + JSON options ->
one CHUNK response per chunk of decoded windows, segments in timeline order, the last one final.

The long-form pipeline is `transcribe`'s (`LongFormTranscriber.transcribe_iter`, windows of a chunk
decoded as one batch through `whisper_window`); only the way answers leave differs. Each request
runs on a thread of its own, so `execute` returns at once and one instance serves several streams.
Each stream decodes on a thread of its own while its request's thread sends the chunks decoded
(at most CHUNKS_AHEAD waiting), so sending never holds up the decoding. The request's cancellation
(`is_cancelled`, set by Triton when the gRPC client cancels the stream, e.g. the proxy after its
HTTP client left) is asked before the audio is decoded, after it, per block of VAD, per batch of
windows and before each chunk, and the work stops there: a dropped stream waiting for a thread is
never decoded at all. Beyond MAX_STREAMS streams decoding and MAX_WAITING_STREAMS waiting, a
request is refused at once with 503 (as `transcribe` does), so the queue never grows without bound.
Its I/O is `contract.tensors.TRANSCRIBE_STREAM_SPEC`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..pipeline.audio import decode_audio
from ..contract.results import stream_chunk
from ..contract.tensors import TRANSCRIBE_STREAM_SPEC as SPEC
from ..errors import WhisperTritonError
from ..pipeline.windows import RequestCancelled, stop_if_cancelled
from ..pipeline.audio import release_free_heap
from .common import error_response, first_value, internal_error
from .transcribe_model import TranscribeModel, busy_error

logger = logging.getLogger(__name__)

MAX_STREAMS = 8  # files decoded at once by one instance; more wait for a thread
CHUNKS_AHEAD = 4  # chunks decoded and not yet sent; beyond it the decoding waits for the sender
MAX_WAITING_STREAMS = 64  # streams handed over and waiting for a thread (transcribe's MAX_WAITING_FILES)


class TranscribeStreamModel(TranscribeModel):
    def __init__(self, pb_utils, args: dict):
        super().__init__(pb_utils, args)
        self._streams = ThreadPoolExecutor(max_workers=MAX_STREAMS, thread_name_prefix="stream")
        self._waiting_streams = 0  # handed over, not yet started (guarded by _count_lock)
        self._active_streams = 0  # started, not yet finished (guarded by _count_lock)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            with self._count_lock:
                waiting = self._waiting_streams
                if waiting < MAX_WAITING_STREAMS:
                    self._waiting_streams += 1
            if waiting >= MAX_WAITING_STREAMS:  # refused at once: a bounded queue, never unbounded growth
                sender.send(error_response(self.pb, busy_error(waiting)), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self._streams.submit(self._serve_stream, request, sender)
        return None  # decoupled: answers go through each request's response sender

    def _chunk_response(self, chunk: dict):
        payload = json.dumps(chunk, ensure_ascii=False).encode()
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(SPEC.output("CHUNK").name,
                                                                        np.array([payload], dtype=object))])

    def _serve_stream(self, request, sender) -> None:
        """One stream on a pool thread; the last one to finish gives the freed heap back to the OS."""
        with self._count_lock:
            self._waiting_streams -= 1
            self._active_streams += 1
        try:
            self._stream(request, sender)
        finally:
            with self._count_lock:
                self._active_streams -= 1
                idle = self._active_streams == 0 and self._waiting_streams == 0
            if idle:
                release_free_heap()

    def _stream(self, request, sender) -> None:
        """Decode on a thread of its own (`_produce`) while this one sends: the next chunk is decoded
        while the current one is sent, so a streamed file takes its unstreamed time, not more."""
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        arrival = time.monotonic()
        try:
            stop_if_cancelled(sender.is_cancelled)  # dropped while it waited: no audio work at all
            chosen, options = self.prepare(request)  # the request's model; checked before any audio work
            known = self.known_speakers(request, options)
            audio = decode_audio(bytes(first_value(self.pb, request, "AUDIO") or b""),
                                 max_seconds=self.settings.max_audio_seconds)
            stop_if_cancelled(sender.is_cancelled)
        except RequestCancelled:
            logger.info("stream cancelled before its decoding began")
            sender.send(flags=final)
            return
        except WhisperTritonError as exc:
            sender.send(error_response(self.pb, exc), flags=final)
            return
        except Exception as exc:  # answer every request; never take the stub down
            logger.exception("streaming transcription failed")
            sender.send(error_response(self.pb, internal_error(exc, "Transcription")), flags=final)
            return
        chunks: queue.Queue = queue.Queue(maxsize=CHUNKS_AHEAD)
        producer = threading.Thread(target=self._produce, args=(chosen, audio, options, known, sender, arrival, chunks),
                                    name="stream-decode", daemon=True)
        producer.start()
        while True:
            kind, value = chunks.get()
            if kind == "chunk":
                sender.send(self._chunk_response(value), flags=final if value["done"] else 0)
                if value["done"]:
                    return
            elif kind == "error":
                sender.send(error_response(self.pb, value), flags=final)
                return
            else:  # cancelled: close the stream without another answer
                logger.info("stream cancelled by its caller: decoding stopped")
                sender.send(flags=final)
                return

    def _produce(self, chosen, audio, options, known, sender, arrival: float, chunks: queue.Queue) -> None:
        """Decodes; with diarize (`known` not None: the known speakers, maybe none) each chunk has speakers."""
        try:
            with chosen.decoder.serving(sender.is_cancelled, arrival, audio.size / 16_000):
                if known is not None:
                    decoded = self.speakers(chosen).transcribe_iter(audio, options, known, cancelled=sender.is_cancelled)
                else:
                    decoded = ((c, None) for c in chosen.pipeline.transcribe_iter(audio, options,
                                                                                   cancelled=sender.is_cancelled))
                for chunk, speakers in decoded:
                    chunks.put(("chunk", stream_chunk(
                        chunk.segments, chunk.language, chunk.language_probability, chunk.duration, chunk.info,
                        chunk.done, words=options.word_timestamps, tokens=options.include_tokens, speakers=speakers)))
                    if chunk.done:
                        return
            chunks.put(("cancelled", None))
        except RequestCancelled:  # during VAD or between batches of windows
            chunks.put(("cancelled", None))
        except WhisperTritonError as exc:
            chunks.put(("error", exc))
        except Exception as exc:  # answer every request; never take the stub down
            logger.exception("streaming transcription failed")
            chunks.put(("error", internal_error(exc, "Transcription")))

    def close(self) -> None:
        self._streams.shutdown(wait=False, cancel_futures=True)
        super().close()
