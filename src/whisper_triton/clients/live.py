"""Live client: a file, or stdin, streamed at real-time pace to a live transcription session, the
text printed as it comes (`whisper-invoke-realtime URL --live FILE|-`).

URL is a container's or `serve`'s WebSocket: `ws://HOST:8080/v1/realtime?intent=transcription`
(OpenAI's Realtime transcription protocol), or `ws://HOST:8080/invocations-bidirectional-stream`
(the same protocol on SageMaker's bidirectional route); `ws://HOST:8080` alone means the first.
A FILE is any audio format (decoded with PyAV); `-` reads raw 16-bit little-endian mono PCM at
24 kHz from stdin (e.g. `ffmpeg -i mic -f s16le -ar 24000 -ac 1 -`), as fast as it comes.
Partial text (deltas) goes to stderr, each utterance's final transcript to stdout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from ..contract.realtime import PCM_RATE

CHUNK_S = 0.1  # audio per append
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def session_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"--live needs a WebSocket URL (ws://HOST:PORT[/v1/realtime?intent=transcription]), got "
                         f"{url!r}. SageMaker endpoints take live audio through InvokeEndpointWithBidirectionalStream, "
                         "whose client is the aws-sdk-sagemaker-runtime-http2 package (Python >= 3.12).")
    if parts.path in ("", "/"):
        return url.rstrip("/") + "/v1/realtime?intent=transcription"
    return url


async def file_chunks(path: Path, pace: bool = True) -> AsyncIterator[bytes]:
    """The file as 24 kHz PCM appends, at real-time pace."""
    from ..pipeline.audio import decode_audio, encode_pcm16

    import numpy as np

    samples = decode_audio(path.read_bytes())
    pcm = encode_pcm16(np.concatenate([samples, np.zeros(16_000, dtype=np.float32)]))  # a second of silence ends the turn
    step = int(PCM_RATE * 2 * CHUNK_S)
    started = time.monotonic()
    for index in range(0, len(pcm), step):
        yield pcm[index:index + step]
        if pace:
            await asyncio.sleep(max(0.0, started + (index + step) / (PCM_RATE * 2) - time.monotonic()))


async def stdin_chunks() -> AsyncIterator[bytes]:
    step = int(PCM_RATE * 2 * CHUNK_S)
    while True:
        data = await asyncio.to_thread(sys.stdin.buffer.read, step)
        if not data:
            return
        yield data


async def run_live(url: str, chunks: AsyncIterator[bytes], api_key: str | None = None, language: str | None = None,
                   out=sys.stdout, err=sys.stderr, settle_s: float = 15.0) -> list[str]:
    """Stream `chunks` into one session; print deltas (stderr) and finals (stdout); return the finals."""
    import websockets

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    finals: list[str] = []
    async with websockets.connect(session_url(url), additional_headers=headers, max_size=None) as socket:
        update = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": PCM_RATE}, "transcription": {"language": language}}}}}
        await socket.send(json.dumps(update))
        committed = 0
        sent = asyncio.Event()

        async def feed():
            async for chunk in chunks:
                await socket.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(chunk).decode()}))
            sent.set()

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                timeout = settle_s if sent.is_set() and len(finals) >= committed else None
                try:
                    message = await asyncio.wait_for(socket.recv(), timeout=timeout or 3600)
                except asyncio.TimeoutError:
                    break
                event = json.loads(message)
                if event["type"] == "input_audio_buffer.committed":
                    committed += 1
                elif event["type"] == DELTA:
                    err.write(event["delta"])
                    err.flush()
                elif event["type"] == COMPLETED:
                    finals.append(event["transcript"])
                    err.write("\n")
                    out.write(event["transcript"] + "\n")
                    out.flush()
                    if sent.is_set() and len(finals) >= committed:
                        break
                elif event["type"] == "error":
                    err.write(f"\nerror: {event['error'].get('message')}\n")
        finally:
            feeder.cancel()
    return finals


def main_live(url: str, source: str, language: str | None, api_key: str | None) -> int:
    chunks = stdin_chunks() if source == "-" else file_chunks(Path(source))
    try:
        asyncio.run(run_live(url, chunks, api_key, language))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
