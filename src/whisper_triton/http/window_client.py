"""The pipeline's window decoder (`pipeline.longform.WindowDecoder`) over gRPC to Triton's
`whisper_window`: how a live session's windows reach the engine from the proxy.

Each call is one request of up to `whisper_window`'s declared `max_batch_size` rows (WAV zero-padded,
WAV_LENS, PROMPT_IDS padded with -1, DECODE_OPTIONS per row: `contract/tensors.py`), so a live
window meets the windows of files and of other sessions in the engine model's dynamic batcher:
every request queued while the engine runs goes into its next execution together, a live final
first (priority 1), then file windows (2), then live partials (3). Synchronous (a
live session decodes on threads of its own); the gRPC channel is shared and thread-safe.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..contract.capabilities import EngineCapabilities
from ..contract.engine import Hypothesis, TokenTimings
from ..contract.options import DecodeOptions
from ..contract.tensors import WHISPER_WINDOW_SPEC as WINDOW, decode_error, optional_number, strip_pad
from ..errors import WhisperTritonError
from ..pipeline.windows import WindowOutput, unsupported_word_timestamps


# whisper_window's dynamic batcher has 3 priority levels (its config.pbtxt): 1 leaves the queue first
PRIORITY = {"final": 1, "file": 2, "partial": 3}


class GrpcWindowDecoder:
    def __init__(self, url: str, timeout_s: float = 120.0, model_name: str = WINDOW.name):
        """`model_name`: the engine model to decode with (whisper_window-<id> for another model of the endpoint)."""
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout_s = timeout_s
        self.model_name = model_name
        self._capabilities: EngineCapabilities | None = None
        self._lock = threading.Lock()
        self._urgency = threading.local()  # the priority of this thread's requests
        self.requests = 0  # requests sent (for tests)

    @contextmanager
    def urgency(self, kind: str) -> Iterator[None]:
        """Within the block, this thread's requests queue in whisper_window at `kind`'s priority level."""
        self._urgency.priority = PRIORITY[kind]
        try:
            yield
        finally:
            self._urgency.priority = 0

    @property
    def capabilities(self) -> EngineCapabilities:
        with self._lock:
            if self._capabilities is None:
                reply = self._infer([self._tensor("WAV", np.zeros((1, 1), dtype=np.float32))], ["CAPABILITIES"])
                self._capabilities = EngineCapabilities.from_json(_text(reply.as_numpy("CAPABILITIES").reshape(-1)[0]))
            return self._capabilities

    def _tensor(self, name: str, array: np.ndarray):
        tensor = self._grpc.InferInput(name, list(array.shape), WINDOW.input(name).client_dtype)
        tensor.set_data_from_numpy(array)
        return tensor

    def _infer(self, inputs: list, outputs: list[str]):
        from tritonclient.utils import InferenceServerException

        self.requests += 1
        try:
            return self.client.infer(self.model_name, inputs, outputs=[self._grpc.InferRequestedOutput(n) for n in outputs],
                                     client_timeout=self.timeout_s, priority=getattr(self._urgency, "priority", 0))
        except InferenceServerException as exc:
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            raise decode_error(message or "") or WhisperTritonError(
                "The window decoder is not available; retry shortly.", None, 503, "service_unavailable") from None

    def _inputs(self, audios: list[np.ndarray], prompts: list[list[int]] | None, options: DecodeOptions | None,
                words: bool, scope: str | None = None) -> list:
        rows = len(audios)
        wav = np.zeros((rows, max(a.size for a in audios)), dtype=np.float32)
        for index, audio in enumerate(audios):
            wav[index, : audio.size] = audio
        inputs = [self._tensor("WAV", wav),
                  self._tensor("WAV_LENS", np.array([[a.size] for a in audios], dtype=np.int32))]
        if prompts is not None:
            ids = np.full((rows, max(len(p) for p in prompts)), -1, dtype=np.int32)
            for index, prompt in enumerate(prompts):
                ids[index, : len(prompt)] = prompt
            inputs.append(self._tensor("PROMPT_IDS", ids))
        if options is not None:
            inputs.append(self._tensor("DECODE_OPTIONS", np.array([[options.model_dump_json().encode()]] * rows,
                                                                   dtype=object)))
        if words:
            inputs.append(self._tensor("WORD_TIMESTAMPS", np.ones((rows, 1), dtype=bool)))
        if scope:  # the request these windows belong to: their encoder passes are reused within it only
            inputs.append(self._tensor("CACHE_SCOPE", np.array([[scope.encode()]] * rows, dtype=object)))
        return inputs

    def _batches(self, count: int) -> list[range]:
        size = max(1, self.capabilities.max_batch_size)
        return [range(first, min(count, first + size)) for first in range(0, count, size)]

    def decode(self, audios: list[np.ndarray], prompts: list[list[int]], options: DecodeOptions,
               word_timestamps: bool = False, scope: str | None = None) -> list[WindowOutput]:
        if word_timestamps and not self.capabilities.word_timestamps:
            raise unsupported_word_timestamps(self.capabilities)
        names = ["TOKENS", "AVG_LOGPROB"] if self.capabilities.scores else ["TOKENS"]
        if self.capabilities.no_speech_prob:
            names.append("NO_SPEECH_PROB")
        if word_timestamps:
            names += ["TOKEN_TIMES", "TOKEN_PROBS"]
        outputs: list[WindowOutput] = []
        for rows in self._batches(len(audios)):
            reply = self._infer(self._inputs([audios[i] for i in rows], [prompts[i] for i in rows], options,
                                             word_timestamps, scope), names)
            arrays = {name: reply.as_numpy(name) for name in names}
            outputs += [self._output(arrays, row, word_timestamps) for row in range(len(rows))]
        return outputs

    @staticmethod
    def _output(arrays: dict[str, np.ndarray], row: int, words: bool) -> WindowOutput:
        tokens = [int(t) for t in strip_pad(arrays["TOKENS"][row].reshape(-1), WINDOW.output("TOKENS").pad)]
        scores = {name: optional_number(arrays[name][row].reshape(-1)[0]) if name in arrays else None
                  for name in ("AVG_LOGPROB", "NO_SPEECH_PROB")}
        timings = None
        if words:
            times = [float(v) for v in strip_pad(arrays["TOKEN_TIMES"][row].reshape(-1), -1.0)]
            probs = [float(v) for v in strip_pad(arrays["TOKEN_PROBS"][row].reshape(-1), -1.0)]
            timings = TokenTimings(starts=times[0::2], ends=times[1::2], probabilities=probs)
        return WindowOutput(Hypothesis(tokens=tokens, avg_logprob=scores["AVG_LOGPROB"],
                                       no_speech_prob=scores["NO_SPEECH_PROB"]), timings)

    def detect_language(self, audios: list[np.ndarray], scope: str | None = None) -> list[dict[str, float]]:
        if not self.capabilities.multilingual:
            return [{"en": 1.0} for _ in audios]
        detected: list[dict[str, float]] = []
        for rows in self._batches(len(audios)):
            reply = self._infer(self._inputs([audios[i] for i in rows], None, None, False, scope), ["LANGUAGE_PROBS"])
            detected += [json.loads(_text(v)) for v in reply.as_numpy("LANGUAGE_PROBS").reshape(-1)]
        return detected

    def close(self) -> None:
        self.client.close()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
