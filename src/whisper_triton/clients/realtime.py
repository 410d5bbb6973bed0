"""Real-time client: one audio file -> text, JSON, SRT or VTT through a SageMaker endpoint.

Plain boto3 `sagemaker-runtime` `invoke_endpoint`; throttling and transient errors are retried by
botocore's own retry modes (adaptive by default: it also slows the client down when throttled).
Options go as custom attributes (`language=de,task=translate`), so the audio travels as raw bytes.
With `--stream`, `invoke_endpoint_with_response_stream` prints the text as segments are decoded
(the container answers JSON lines; each PayloadPart may carry part of a line, or several).
With `--live FILE|-` the audio goes at real-time pace to a live session (`live.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .formats import FORMATS, accept_header, check_format, content_type_for, output_path_for, render

logger = logging.getLogger(__name__)

REALTIME_MAX_BYTES = 6_291_456


class InvokeError(Exception):
    """A file the client could not transcribe, with the cause and the fix."""


@dataclass
class InvokeOptions:
    endpoint_name: str
    output_format: str = "text"
    language: str | None = None
    task: str | None = None  # transcribe | translate
    target_variant: str | None = None
    max_attempts: int = 8
    retry_mode: str = "adaptive"  # botocore: legacy | standard | adaptive
    read_timeout_s: float = 70.0

    def custom_attributes(self) -> str | None:
        pairs = [f"{k}={v}" for k, v in (("language", self.language), ("task", self.task)) if v]
        return ",".join(pairs) or None


def runtime_client(max_attempts: int = 8, retry_mode: str = "adaptive", read_timeout_s: float = 70.0,
                   session: Any = None) -> Any:
    """A sagemaker-runtime client; its endpoint comes from boto3's configuration
    (AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME points it at the local emulator)."""
    config = Config(retries={"total_max_attempts": max_attempts, "mode": retry_mode}, read_timeout=read_timeout_s,
                    connect_timeout=10)
    return (session or boto3.session.Session()).client("sagemaker-runtime", config=config)


@dataclass
class Transcript:
    rendered: str
    content_type: str
    body: bytes
    variant: str | None


def describe_client_error(exc: Exception, endpoint: str) -> str:
    """One line with the cause and the fix for an invoke_endpoint failure."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        if code == "ModelError":
            original = exc.response.get("OriginalMessage") or message
            status = exc.response.get("OriginalStatusCode")
            return f"The model refused the request ({status}): {original}"
        if code == "ValidationError" and "not found" in message:
            return f"{message} Check the endpoint name and region (AWS_DEFAULT_REGION)."
        return f"{code}: {message}"
    return f"Could not reach the endpoint {endpoint}: {exc}"


def transcribe_bytes(audio: bytes, options: InvokeOptions, *, content_type: str = "application/octet-stream",
                     client: Any = None) -> Transcript:
    fmt = check_format(options.output_format)
    if len(audio) > REALTIME_MAX_BYTES:
        raise InvokeError(
            f"The audio is {len(audio)} bytes; real-time endpoints take at most {REALTIME_MAX_BYTES} bytes. "
            "Use the async client (invoke_async.py) for long files."
        )
    client = client or runtime_client(options.max_attempts, options.retry_mode, options.read_timeout_s)
    request: dict[str, Any] = {
        "EndpointName": options.endpoint_name,
        "Body": audio,
        "ContentType": content_type,
        "Accept": accept_header(fmt),
    }
    if options.custom_attributes():
        request["CustomAttributes"] = options.custom_attributes()
    if options.target_variant:
        request["TargetVariant"] = options.target_variant
    try:
        response = client.invoke_endpoint(**request)
    except (ClientError, BotoCoreError) as exc:
        raise InvokeError(describe_client_error(exc, options.endpoint_name)) from exc
    body = response["Body"].read()
    reply_type = response.get("ContentType", "application/octet-stream")
    return Transcript(render(body, reply_type, fmt), reply_type, body, response.get("InvokedProductionVariant"))


STREAM_ACCEPT = "application/jsonlines"


def stream_bytes(audio: bytes, options: InvokeOptions, *, content_type: str = "application/octet-stream",
                 client: Any = None) -> Iterator[dict]:
    """The container's JSON lines (one per chunk of segments, the last with `done`), as they arrive."""
    if len(audio) > REALTIME_MAX_BYTES:
        raise InvokeError(f"The audio is {len(audio)} bytes; real-time endpoints take at most {REALTIME_MAX_BYTES} "
                          "bytes. Use the async client (invoke_async.py) for long files.")
    client = client or runtime_client(options.max_attempts, options.retry_mode, options.read_timeout_s)
    request: dict[str, Any] = {"EndpointName": options.endpoint_name, "Body": audio, "ContentType": content_type,
                               "Accept": STREAM_ACCEPT}
    if options.custom_attributes():
        request["CustomAttributes"] = options.custom_attributes()
    if options.target_variant:
        request["TargetVariant"] = options.target_variant
    try:
        response = client.invoke_endpoint_with_response_stream(**request)
        pending = b""
        for event in response["Body"]:
            pending += event.get("PayloadPart", {}).get("Bytes", b"")
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
        if pending.strip():
            yield json.loads(pending)
    except (ClientError, BotoCoreError) as exc:
        raise InvokeError(describe_client_error(exc, options.endpoint_name)) from exc


def stream_file(path: Path | str, options: InvokeOptions, *, client: Any = None) -> Iterator[dict]:
    path = Path(path)
    return stream_bytes(path.read_bytes(), options, content_type=content_type_for(path), client=client)


def print_stream(path: Path, options: InvokeOptions, client: Any) -> None:
    """Each chunk's text as it arrives, one line per segment."""
    for chunk in stream_file(path, options, client=client):
        for segment in chunk.get("segments", []):
            sys.stdout.write(segment["text"].strip() + "\n")
        sys.stdout.flush()


def transcribe_file(path: Path | str, options: InvokeOptions, *, client: Any = None) -> Transcript:
    path = Path(path)
    return transcribe_bytes(path.read_bytes(), options, content_type=content_type_for(path), client=client)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Transcribe audio files through a real-time SageMaker endpoint.")
    parser.add_argument("endpoint", help="endpoint name; with --live, the container's WebSocket URL (ws://HOST:8080)")
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--format", choices=list(FORMATS), default="text")
    parser.add_argument("--language", default=None)
    parser.add_argument("--task", choices=["transcribe", "translate"], default=None)
    parser.add_argument("--variant", default=None, help="target production variant")
    parser.add_argument("--write", action="store_true", help="write FILE.<format> next to each input instead of printing")
    parser.add_argument("--max-attempts", type=int, default=8, help="attempts per request (throttling is retried)")
    parser.add_argument("--stream", action="store_true",
                        help="print segments as they are decoded (InvokeEndpointWithResponseStream)")
    parser.add_argument("--live", metavar="FILE|-", default=None,
                        help="stream FILE (any format) or stdin (raw 16-bit PCM, 24 kHz mono) at real-time pace to a "
                        "live transcription session; partial text on stderr, each utterance's transcript on stdout")
    parser.add_argument("--api-key", default=None, help="with --live: the server's API key, if it has one")
    args = parser.parse_args(argv)
    if args.live is not None:
        if args.files:
            parser.error("--live streams one FILE (or -): leave out the other files")
        from .live import main_live

        return main_live(args.endpoint, args.live, args.language, args.api_key)
    if not args.files:
        parser.error("give at least one audio file (or --live FILE|-)")
    if args.stream and (args.write or args.format != "text"):
        parser.error("--stream prints text as it comes: leave out --write and --format")
    if argv is None:  # a real command line; callers passing argv (tests, wrappers) keep their logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = InvokeOptions(args.endpoint, args.format, args.language, args.task, args.variant, args.max_attempts)
    client = runtime_client(options.max_attempts, options.retry_mode, options.read_timeout_s)
    failures = 0
    for path in args.files:
        if args.stream:
            try:
                print_stream(path, options, client)
            except (InvokeError, OSError, ValueError) as exc:
                failures += 1
                print(f"error: {path}: {exc}", file=sys.stderr)
            continue
        try:
            transcript = transcribe_file(path, options, client=client)
        except (InvokeError, OSError, ValueError) as exc:
            failures += 1
            print(f"error: {path}: {exc}", file=sys.stderr)
            continue
        if args.write:
            target = output_path_for(path, args.format)
            target.write_text(transcript.rendered, encoding="utf-8")
            print(f"{path} -> {target}", file=sys.stderr)
        else:
            sys.stdout.write(transcript.rendered if transcript.rendered.endswith("\n") else transcript.rendered + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
