"""One shared async gRPC client to Triton's models, for every HTTP route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import numpy as np

from ..contract.options import TranscribeOptions
from ..contract.tensors import MODELS, TRANSCRIBE_SPEC, TRANSCRIBE_STREAM_SPEC, WHISPER_WINDOW, decode_error
from ..errors import WhisperTritonError
from .admission import Admission, charge_seconds
from .guards import REQUEST_ID

PING_TIMEOUT_S = 1.5  # SageMaker wants /ping answered within 2 s


class TritonClient:
    def __init__(self, url: str, timeout_s: float, admission: Admission | None = None):
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.timeout_s = timeout_s  # the deadline: past it the gRPC call is cancelled, Triton stops decoding
        self.admission = admission or Admission(1 << 30, float("inf"), 1, deadline_s=float("inf"))  # unbounded

    async def ready(self) -> bool:
        async def check() -> bool:
            if not await self.client.is_server_ready():
                return False
            return all([await self.client.is_model_ready(name) for name in MODELS])

        try:
            return await asyncio.wait_for(check(), timeout=PING_TIMEOUT_S)
        except Exception:  # any failure to answer in time means not ready
            return False

    async def engine_model_dir(self) -> str:
        """The model_dir the engine model (`whisper_window`) was given ("" for the embedded default)."""
        from tritonclient.utils import InferenceServerException

        try:
            config = await self.client.get_model_config(WHISPER_WINDOW, as_json=True)
        except InferenceServerException as exc:
            raise from_triton(exc) from None
        parameters = config.get("config", config).get("parameters", {})
        return parameters.get("model_dir", {}).get("string_value", "")

    def _string_input(self, name: str, value: bytes):
        tensor = self._grpc.InferInput(name, [1], TRANSCRIBE_SPEC.input(name).client_dtype)
        tensor.set_data_from_numpy(np.array([value], dtype=object))
        return tensor

    def _inputs(self, audio: bytes, options: TranscribeOptions, references: list[bytes] | None) -> list:
        """AUDIO, OPTIONS (what the caller set) and, with known speakers, their SPEAKER_REFERENCES clips."""
        inputs = [self._string_input("AUDIO", audio), self._string_input("OPTIONS", json.dumps(options.wire()).encode())]
        if references:
            tensor = self._grpc.InferInput("SPEAKER_REFERENCES", [len(references)],
                                           TRANSCRIBE_SPEC.input("SPEAKER_REFERENCES").client_dtype)
            tensor.set_data_from_numpy(np.array(references, dtype=object))
            inputs.append(tensor)
        return inputs

    async def transcribe(self, audio: bytes, options: TranscribeOptions, references: list[bytes] | None = None) -> dict:
        """The `transcribe` model's RESULT for one file; only the options the caller set are sent.

        Cancelling the calling task (a client that disconnected) cancels the gRPC call, and Triton
        marks the request cancelled; the `transcribe` model stops between decoding rounds."""
        from tritonclient.utils import InferenceServerException

        seconds = await asyncio.to_thread(charge_seconds, audio)
        inputs = self._inputs(audio, options, references)
        async with self.admission.audio(seconds, options.model) as ticket:
            try:
                result = await self.client.infer(TRANSCRIBE_SPEC.name, inputs,
                                                 outputs=[self._grpc.InferRequestedOutput("RESULT")],
                                                 request_id=REQUEST_ID.get(), client_timeout=self.timeout_s)
            except InferenceServerException as exc:
                raise from_triton(exc) from None
            answer = json.loads(result.as_numpy("RESULT").reshape(-1)[0])
            ticket.actual_s = _duration(answer)  # the real length: the speed sample, in place of the charge
        return answer

    async def transcribe_stream(self, audio: bytes, options: TranscribeOptions,
                                references: list[bytes] | None = None) -> AsyncIterator[dict]:
        """The `transcribe_stream` model's CHUNKs for one file, as they are decoded (the last has done=True).

        Closing the generator early (the HTTP client left) cancels the gRPC stream, which Triton
        passes to the model as the request's cancellation: its decoding stops before the next chunk."""
        seconds = await asyncio.to_thread(charge_seconds, audio)
        async with self.admission.audio(seconds, options.model, stream=True) as ticket:  # refused before any byte
            async with contextlib.aclosing(self._stream(audio, options, references)) as chunks:  # closed at once
                async for chunk in chunks:
                    if chunk.get("done"):
                        ticket.actual_s = _duration(chunk)
                    yield chunk

    async def _stream(self, audio: bytes, options: TranscribeOptions,
                      references: list[bytes] | None) -> AsyncIterator[dict]:
        finished = asyncio.Event()
        request = {"model_name": TRANSCRIBE_STREAM_SPEC.name, "request_id": REQUEST_ID.get() if REQUEST_ID.get() != "-" else uuid.uuid4().hex,
                   "inputs": self._inputs(audio, options, references),
                   "outputs": [self._grpc.InferRequestedOutput("CHUNK")]}

        async def requests():
            yield request
            await finished.wait()  # keep the request side open until the last answer came

        import grpc

        responses = self.client.stream_infer(requests(), stream_timeout=self.timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    raise from_triton(error)
                chunk = json.loads(result.as_numpy("CHUNK").reshape(-1)[0])
                yield chunk
                if chunk.get("done"):
                    return
            raise WhisperTritonError("The transcription stream ended early; retry.", None, 503, "service_unavailable")
        except grpc.aio.AioRpcError as exc:  # the stream itself failed (Triton gone, deadline)
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WhisperTritonError("Transcription took longer than the request timeout.", None, 504,
                                         "timeout") from None
            raise WhisperTritonError("Triton is not available; retry shortly.", None, 503,
                                     "service_unavailable") from None
        finally:
            finished.set()
            responses.cancel()

    async def close(self) -> None:
        await self.client.close()


def _duration(result: dict) -> float | None:
    value = result.get("duration")
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def from_triton(exc) -> WhisperTritonError:
    message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    decoded = decode_error(message or "")
    if decoded is not None:
        return decoded
    status = str(exc.status() or "")
    if "UNAVAILABLE" in status:
        return WhisperTritonError("Triton is not available; retry shortly.", None, 503, "service_unavailable")
    if "DEADLINE_EXCEEDED" in status:
        return WhisperTritonError("Transcription took longer than the request timeout.", None, 504, "timeout")
    return WhisperTritonError("The transcription backend failed; retry, and check the server log if it persists.",
                              None, 500, "engine_error")
