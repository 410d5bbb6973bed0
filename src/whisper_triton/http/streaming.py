"""Streamed answers shared by the routes: segments from Triton's `transcribe_stream` as they are
decoded, stopped when the HTTP client leaves.

A client that disconnects mid-stream is noticed while the proxy waits for Triton (not only at the
next write): the stream of chunks is then closed, which cancels the gRPC stream, which Triton
passes to `transcribe_stream` as the request's cancellation, which stops decoding that file before
its next chunk of windows. `first_chunk` reads the first chunk before any byte is sent, so a request
Triton refuses (bad audio, an option the model cannot do) still gets its HTTP status."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
from fastapi import Request

logger = logging.getLogger(__name__)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so only disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def first_chunk(chunks: AsyncGenerator[dict, None]) -> AsyncGenerator[dict, None]:
    """`chunks` with its first item already read (its errors raise here, before the answer starts)."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()
        raise

    async def replay() -> AsyncGenerator[dict, None]:
        try:
            if first is not None:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    return replay()


async def until_disconnected(request: Request, chunks: AsyncGenerator) -> AsyncIterator:
    """The items of `chunks` until it ends or the client leaves; leaving closes `chunks` at once,
    whether the watcher here notices it or the server cancels the answer (Starlette does on disconnect)."""
    watcher = asyncio.ensure_future(_disconnected(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # the client left while Triton was decoding
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        # shielded: this runs inside a cancelled scope when the server cancelled the answer
        with anyio.CancelScope(shield=True):
            watcher.cancel()
            if step is not None and not step.done():
                step.cancel()  # cancels the gRPC stream, so Triton cancels the request
                await asyncio.gather(step, return_exceptions=True)
                logger.info("client disconnected mid-stream: decoding of its file cancelled")
            await chunks.aclose()


def json_lines(chunks: AsyncIterator[dict], on_first_segment=None, on_done=None) -> AsyncIterator[bytes]:
    """The SageMaker response stream's body: one JSON line per chunk of segments (with the chunk's
    `text`), the last one with `done: true` and the whole file's text in `full_text`."""

    async def lines() -> AsyncIterator[bytes]:
        texts: list[str] = []
        async for chunk in chunks:
            if chunk["segments"] and not texts and on_first_segment is not None:
                on_first_segment()
            text = "".join(segment["text"] for segment in chunk["segments"])
            texts.append(text)
            line = {**chunk, "text": text.strip()}
            if chunk.get("done"):
                line["full_text"] = "".join(texts).strip()
                if on_done is not None:
                    on_done(chunk)
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

    return lines()
