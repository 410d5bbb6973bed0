"""Async client: many audio files through an asynchronous SageMaker endpoint, none lost.

For each file: upload it to S3, call `invoke_endpoint_async`, then poll the output and the failure
location (HEAD, exponential backoff with jitter, bounded in time) until one exists. The result is
written next to the input (clip.wav -> clip.wav.txt), a failure as clip.wav.error.txt; every input
ends with exactly one of the two, and the returned list has one entry per input, in input order.
Files run concurrently on a thread pool with a tqdm progress bar.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from tqdm import tqdm

from .formats import AUDIO_TYPES, FORMATS, accept_header, check_format, content_type_for, error_path_for, output_path_for, render
from .realtime import describe_client_error, runtime_client

logger = logging.getLogger(__name__)


@dataclass
class AsyncInvokeOptions:
    endpoint_name: str
    bucket: str
    prefix: str = "whisper-async/input"
    output_format: str = "text"
    language: str | None = None
    task: str | None = None
    concurrency: int = 8
    invocation_timeout_s: int | None = None  # InvocationTimeoutSeconds (SageMaker default 900, max 3600)
    request_ttl_s: int | None = None
    poll_initial_s: float = 1.0
    poll_max_s: float = 20.0
    poll_factor: float = 1.6
    timeout_s: float = 3600.0  # per file, from upload to result
    max_attempts: int = 8

    def custom_attributes(self) -> str | None:
        pairs = [f"{k}={v}" for k, v in (("language", self.language), ("task", self.task)) if v]
        return ",".join(pairs) or None


@dataclass
class AsyncResult:
    input: Path
    ok: bool
    written: Path | None = None  # the transcript, or the error file
    error: str | None = None
    inference_id: str | None = None
    output_location: str | None = None
    failure_location: str | None = None


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _exists(s3: Any, uri: str) -> bool:
    bucket, key = _split(uri)
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def wait_for_result(s3: Any, output: str, failure: str | None, options: AsyncInvokeOptions) -> tuple[bool, bytes, str]:
    """(ok, body, content type) of whichever of output/failure appears first; TimeoutError after timeout_s."""
    deadline = time.monotonic() + options.timeout_s
    delay = options.poll_initial_s
    while True:
        for ok, uri in ((True, output), (False, failure)):
            if uri and _exists(s3, uri):
                bucket, key = _split(uri)
                obj = s3.get_object(Bucket=bucket, Key=key)
                return ok, obj["Body"].read(), obj.get("ContentType", "application/octet-stream")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"No result at {output} (nor a failure at {failure}) after {options.timeout_s:.0f} s. The request may "
                "still be queued: raise --timeout, or check the endpoint's instance count and CloudWatch logs."
            )
        time.sleep(min(remaining, delay * random.uniform(0.8, 1.2)))
        delay = min(options.poll_max_s, delay * options.poll_factor)


def _failure_text(body: bytes) -> str:
    import json

    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return str(data["error"].get("message") or text)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
    except ValueError:
        pass
    return text or "the endpoint wrote an empty failure object"


def transcribe_one(path: Path, options: AsyncInvokeOptions, s3: Any, runtime: Any) -> AsyncResult:
    """Upload, invoke, wait and write the result next to `path`; never raises for a per-file problem."""
    result = AsyncResult(input=path, ok=False)
    try:
        key = f"{options.prefix.strip('/')}/{uuid.uuid4().hex}/{path.name}"
        s3.upload_file(str(path), options.bucket, key, ExtraArgs={"ContentType": content_type_for(path)})
        request: dict[str, Any] = {
            "EndpointName": options.endpoint_name,
            "InputLocation": f"s3://{options.bucket}/{key}",
            "ContentType": content_type_for(path),
            "Accept": accept_header(options.output_format),
        }
        if options.custom_attributes():
            request["CustomAttributes"] = options.custom_attributes()
        if options.invocation_timeout_s:
            request["InvocationTimeoutSeconds"] = options.invocation_timeout_s
        if options.request_ttl_s:
            request["RequestTTLSeconds"] = options.request_ttl_s
        try:
            response = runtime.invoke_endpoint_async(**request)
        except (ClientError, BotoCoreError) as exc:
            raise RuntimeError(describe_client_error(exc, options.endpoint_name)) from exc
        result.inference_id = response.get("InferenceId")
        result.output_location = response["OutputLocation"]
        result.failure_location = response.get("FailureLocation")
        ok, body, content_type = wait_for_result(s3, result.output_location, result.failure_location, options)
        if ok:
            target = output_path_for(path, options.output_format)
            target.write_text(render(body, content_type, options.output_format), encoding="utf-8")
            result.ok, result.written = True, target
            return result
        result.error = _failure_text(body)
    except Exception as exc:  # noqa: BLE001 - one file's failure must not lose the others
        result.error = str(exc) or type(exc).__name__
    target = error_path_for(path)
    try:
        target.write_text(result.error + "\n", encoding="utf-8")
        result.written = target
    except OSError as exc:
        logger.error("could not write %s: %s", target, exc)
    return result


def transcribe_async(paths: list[Path | str], options: AsyncInvokeOptions, *, s3: Any = None, runtime: Any = None,
                     progress: bool = True) -> list[AsyncResult]:
    """Transcribe `paths` concurrently; one AsyncResult per path, in the order given."""
    check_format(options.output_format)
    files = [Path(p) for p in paths]
    if s3 is None:
        s3 = boto3.session.Session().client("s3", config=Config(retries={"total_max_attempts": options.max_attempts, "mode": "adaptive"}))
    runtime = runtime or runtime_client(options.max_attempts)
    results: dict[int, AsyncResult] = {}
    with ThreadPoolExecutor(max_workers=max(1, options.concurrency)) as pool, \
            tqdm(total=len(files), unit="file", desc=options.endpoint_name, disable=not progress, file=sys.stderr) as bar:
        futures = {pool.submit(transcribe_one, path, options, s3, runtime): i for i, path in enumerate(files)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as exc:  # noqa: BLE001 - transcribe_one does not raise; keep the promise anyway
                results[index] = AsyncResult(files[index], False, error=str(exc))
            bar.update(1)
            bar.set_postfix(failed=sum(1 for r in results.values() if not r.ok))
    return [results[i] for i in range(len(files))]


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become the audio files in them (recursively), sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_TYPES))
        else:
            files.append(path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Transcribe many audio files through an asynchronous SageMaker endpoint.")
    parser.add_argument("endpoint", help="endpoint name")
    parser.add_argument("paths", nargs="+", type=Path, help="audio files or folders")
    parser.add_argument("--bucket", required=True, help="S3 bucket for the inputs")
    parser.add_argument("--prefix", default="whisper-async/input")
    parser.add_argument("--format", choices=list(FORMATS), default="text")
    parser.add_argument("--language", default=None)
    parser.add_argument("--task", choices=["transcribe", "translate"], default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per file")
    parser.add_argument("--invocation-timeout", type=int, default=None)
    parser.add_argument("--poll-initial", type=float, default=1.0)
    parser.add_argument("--poll-max", type=float, default=20.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if argv is None:  # a real command line; callers passing argv (tests, wrappers) keep their logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    files = expand(args.paths)
    if not files:
        print("error: no audio files found in the given paths", file=sys.stderr)
        return 2
    options = AsyncInvokeOptions(
        endpoint_name=args.endpoint, bucket=args.bucket, prefix=args.prefix, output_format=args.format,
        language=args.language, task=args.task, concurrency=args.concurrency, timeout_s=args.timeout,
        invocation_timeout_s=args.invocation_timeout, poll_initial_s=args.poll_initial, poll_max_s=args.poll_max,
    )
    results = transcribe_async(files, options, progress=not args.no_progress)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"failed: {r.input}: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)} of {len(results)} transcribed; {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
