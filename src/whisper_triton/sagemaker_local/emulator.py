"""A local SageMaker runtime: unmodified boto3 `invoke_endpoint` / `invoke_endpoint_async` code runs
against a container on loopback.

    AWS_ENDPOINT_URL=http://127.0.0.1:5000           # the control plane and S3 (moto server)
    AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=http://127.0.0.1:8081   # this emulator
    python -m whisper_triton.sagemaker_local.emulator --container-url http://127.0.0.1:8080 --port 8081

Routes (the wire format boto3 speaks):
- `POST /endpoints/{name}/invocations`: the endpoint is looked up in the control plane
  (describe_endpoint; unknown -> 400 ValidationError), the body is forwarded to the container's
  `POST /invocations` with Content-Type, Accept and custom attributes; a 2xx answer comes back as
  200 with `x-Amzn-Invoked-Production-Variant`; a container 4xx/5xx comes back as 424 ModelError
  carrying OriginalStatusCode and OriginalMessage, as SageMaker does.
  With `TargetModel` (X-Amzn-SageMaker-Target-Model) on an endpoint whose model is `Mode: MultiModel`,
  the target is fetched from the model's S3 prefix, loaded through the container's multi-model
  contract and invoked at `/models/{model_name}/invoke` (multi_model.py says how).
- `POST /endpoints/{name}/invocations-response-stream` (InvokeEndpointWithResponseStream): as
  above, but the container's answer is forwarded as it arrives, each piece in an AWS event-stream
  `PayloadPart` (application/vnd.amazon.eventstream; `X-Amzn-SageMaker-Content-Type` carries the
  container's type), which boto3 reads as `response["Body"]` events. The caller's Accept
  (X-Amzn-SageMaker-Accept) goes to the container as Accept, application/jsonlines when none is given.
  A container that fails before its first byte is a 424 ModelError; after it, a ModelStreamError event.
  A caller that leaves closes the container connection (the container stops decoding).
- `POST /endpoints/{name}/async-invocations`: the endpoint config's AsyncInferenceConfig gives the
  S3 output and failure paths; the reply is 202 `{"InferenceId"}` with X-Amzn-SageMaker-OutputLocation
  and -FailureLocation; in the background the S3 input is read, the container called (at most
  MaxConcurrentInvocationsPerInstance x instances at once), and `<id>.out` or `<id>-error.out`
  written; SNS success/error topics, when configured, get a notification. As on SageMaker, the output
  and failure objects are named by a generated id: `InferenceId` is the caller's label (1-64 printable
  characters), echoed back and in notifications, never part of an S3 key.
  InvocationTimeoutSeconds (1-3600) and RequestTTLSeconds (60-21600) are whole seconds; anything else
  is a 400 ValidationError naming the header, never a 500.
Errors are JSON `{"message"}` with the `x-amzn-ErrorType` header.

Batch transform jobs (`transform_jobs.py`, rules in `transform_runner.py`): every transform job in
the control plane is run once against the container; `POST /` is the control plane itself
(`control_plane.py`: moto with the jobs' real state), for `AWS_ENDPOINT_URL_SAGEMAKER`.

Differences from the real service: the input location is checked when the request arrives (a
missing object is a 400 ValidationError at once rather than a failure object later); one container
serves every endpoint unless `--endpoint NAME=URL` maps them; no request signing is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..deploy.aws import AwsClients, parse_s3_uri
from .control_plane import ControlPlane
from .eventstream import model_stream_error, payload_part
from .multi_model import H_TARGET_MODEL, MultiModelError, MultiModelHost
from .transform_jobs import TransformJobs

logger = logging.getLogger(__name__)

REALTIME_MAX_BODY_BYTES = 6_291_456
ASYNC_DEFAULT_TIMEOUT_S = 900.0
ASYNC_MAX_TIMEOUT_S = 3600.0
ASYNC_TTL_RANGE_S = (60, 21_600)  # RequestTTLSeconds, SageMaker's own bounds
INFERENCE_ID_MAX_CHARS = 64
ECHO_MAX_CHARS = 64  # a caller's value quoted back in an error is cut to this
H_CUSTOM = "X-Amzn-SageMaker-Custom-Attributes"
H_VARIANT = "X-Amzn-SageMaker-Target-Variant"
H_INFERENCE_ID = "X-Amzn-SageMaker-Inference-Id"
H_ACCEPT = "X-Amzn-SageMaker-Accept"
STREAM_ACCEPT_DEFAULT = "application/jsonlines"


@dataclass
class EmulatorOptions:
    container_url: str = "http://127.0.0.1:8080"
    endpoints: dict[str, str] = field(default_factory=dict)  # endpoint name -> container URL (overrides)
    account_id: str = "123456789012"
    realtime_timeout_s: float = 60.0
    max_body_bytes: int = REALTIME_MAX_BODY_BYTES
    drain_timeout_s: float = 30.0  # on shutdown, how long async work may finish
    models_dir: str = ""  # multi-model endpoints: where targets are unpacked (empty: a temp dir)
    models: dict[str, str] = field(default_factory=dict)  # model name -> container URL (transform jobs)
    aws_endpoint_url: str | None = None  # where the emulator's own AWS calls go (moto); None: boto3's config
    # how often moto's transform jobs are listed for jobs created there directly (the command line: every
    # second); None: only jobs created or looked at through the emulator's control plane run
    transform_poll_s: float | None = None

    def container_for(self, endpoint: str) -> str:
        return self.endpoints.get(endpoint, self.container_url).rstrip("/")

    def container_for_model(self, model: str) -> str:
        return self.models.get(model, self.container_url).rstrip("/")


class RuntimeApiError(Exception):
    """An error the runtime answers in SageMaker's shape."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"message": self.message, **self.extra},
            status_code=self.status,
            headers={"x-amzn-ErrorType": self.code, "x-amzn-RequestId": str(uuid.uuid4())},
        )


def _validation(message: str) -> RuntimeApiError:
    return RuntimeApiError(400, "ValidationError", message)


def _quoted(value: str) -> str:
    """A caller's value fit to quote in an error: cut short, control characters escaped."""
    cut = value[:ECHO_MAX_CHARS] + ("..." if len(value) > ECHO_MAX_CHARS else "")
    return json.dumps(cut)


def _whole_seconds(request: Request, header: str, member: str, low: int, high: int) -> int | None:
    """An integer header of SageMaker's async API (None when absent); 400 ValidationError when it is
    not a whole number within [low, high], as SageMaker answers, instead of a 500."""
    raw = request.headers.get(header)
    if raw is None or not raw.strip():
        return None
    if re.fullmatch(r"\s*\d{1,9}\s*", raw) is None or not low <= int(raw) <= high:
        raise _validation(f"1 validation error detected: Value {_quoted(raw)} at '{member}' failed to satisfy "
                          f"constraint: Member must be a whole number of seconds from {low} to {high} "
                          f"(header {header}).")
    return int(raw)


def _inference_id(request: Request) -> str | None:
    """The caller's InferenceId, checked as SageMaker does (1-64 printable characters, the first not blank)."""
    value = request.headers.get(H_INFERENCE_ID)
    if value is None:
        return None
    if not 1 <= len(value) <= INFERENCE_ID_MAX_CHARS or not value.isprintable() or value[0].isspace():
        raise _validation(f"1 validation error detected: Value {_quoted(value)} at 'inferenceId' failed to satisfy "
                          f"constraint: Member must be 1-{INFERENCE_ID_MAX_CHARS} printable characters, the first "
                          f"not a space (header {H_INFERENCE_ID}).")
    return value


def _error_body(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None}}).encode()


class RuntimeEmulator:
    """State of one emulator app: HTTP client to the container, AWS clients, running async jobs."""

    def __init__(self, options: EmulatorOptions, aws: AwsClients | None = None):
        self.options = options
        self.aws = aws or AwsClients(max_attempts=3, endpoint_url=options.aws_endpoint_url)
        self.http: httpx.AsyncClient | None = None
        self.jobs: set[asyncio.Task] = set()
        self.semaphores: dict[str, asyncio.Semaphore] = {}
        models_dir = Path(options.models_dir) if options.models_dir else Path(tempfile.gettempdir()) / "whisper-triton-mme"
        self.multi_model = MultiModelHost(self.aws, models_dir)

    # ------------------------------------------------------------------ control plane

    async def endpoint(self, name: str) -> dict:
        try:
            return await asyncio.to_thread(self.aws.sagemaker.describe_endpoint, EndpointName=name)
        except Exception as exc:  # noqa: BLE001
            error = getattr(exc, "response", {}).get("Error", {})
            if error.get("Code") in ("ValidationException", "ResourceNotFound"):
                raise _validation(f"Endpoint {name} of account {self.options.account_id} not found.") from exc
            raise RuntimeApiError(500, "InternalFailure", f"Could not look up endpoint {name}: {exc}") from exc

    async def endpoint_config(self, name: str) -> dict:
        return await asyncio.to_thread(self.aws.sagemaker.describe_endpoint_config, EndpointConfigName=name)

    # ------------------------------------------------------------------ container

    async def call_container(self, endpoint: str, body: bytes, headers: dict[str, str], timeout_s: float,
                             path: str = "/invocations") -> httpx.Response:
        assert self.http is not None
        url = f"{self.options.container_for(endpoint)}{path}"
        return await self.http.post(url, content=body, headers=headers, timeout=timeout_s)

    async def target_path(self, name: str, variant: str, target: str | None, headers: dict[str, str]) -> str:
        """The container path of a real-time call: /invocations, or for a TargetModel on a multi-model
        endpoint /models/{model_name}/invoke once that model is loaded (multi_model.py)."""
        if not target:
            return "/invocations"
        assert self.http is not None
        try:
            model_name = await self.multi_model.prepare(self.http, self.options.container_for(name),
                                                        await self.endpoint(name), variant, target)
        except MultiModelError as exc:
            raise RuntimeApiError(exc.status, exc.code, exc.message) from None
        headers[H_TARGET_MODEL] = target
        return f"/models/{model_name}/invoke"

    @staticmethod
    def container_headers(content_type: str | None, accept: str | None, custom: str | None) -> dict[str, str]:
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        if custom:
            headers[H_CUSTOM] = custom
        return headers

    # ------------------------------------------------------------------ real-time

    async def realtime_request(self, name: str, request: Request) -> tuple[bytes, str]:
        """The body and the production variant of a real-time call, refused as SageMaker refuses them."""
        body = await request.body()
        if len(body) > self.options.max_body_bytes:
            raise _validation(
                f"Request payload is {len(body)} bytes; the real-time limit is {self.options.max_body_bytes} bytes. "
                "Use an asynchronous endpoint for larger audio."
            )
        description = await self.endpoint(name)
        if description.get("EndpointStatus") != "InService":
            raise _validation(f"Endpoint {name} is {description.get('EndpointStatus')}, not InService.")
        variants = [v["VariantName"] for v in description.get("ProductionVariants", [])] or ["AllTraffic"]
        variant = request.headers.get(H_VARIANT) or variants[0]
        if variant not in variants:
            raise _validation(f"Variant {variant} not found for endpoint {name}.")
        return body, variant

    def model_error(self, name: str, status: int, text: str) -> RuntimeApiError:
        kind = "client" if status < 500 else "server"
        return RuntimeApiError(
            424, "ModelError",
            f"Received {kind} error ({status}) from primary with message \"{text}\". "
            f"See the container's log for endpoint {name}.",
            OriginalStatusCode=status,
            OriginalMessage=text,
            LogStreamArn=f"arn:aws:logs:local:{self.options.account_id}:log-group:/aws/sagemaker/Endpoints/{name}",
        )

    async def invoke_stream(self, name: str, request: Request) -> Response:
        """InvokeEndpointWithResponseStream: the container's answer as PayloadPart events, as it comes."""
        assert self.http is not None
        body, variant = await self.realtime_request(name, request)
        headers = self.container_headers(request.headers.get("content-type"),
                                         request.headers.get(H_ACCEPT) or STREAM_ACCEPT_DEFAULT,
                                         request.headers.get(H_CUSTOM))
        url = f"{self.options.container_for(name)}/invocations"
        timeout = httpx.Timeout(connect=10, read=self.options.realtime_timeout_s, write=60, pool=10)
        try:
            reply = await self.http.send(self.http.build_request("POST", url, content=body, headers=headers,
                                                                 timeout=timeout), stream=True)
        except httpx.HTTPError as exc:
            raise RuntimeApiError(
                424, "ModelError", f"Received server error (0) from primary with message \"Could not reach the "
                f"container at {self.options.container_for(name)}: {exc}\".") from exc
        if reply.status_code >= 400:
            text = (await reply.aread()).decode(errors="replace")
            await reply.aclose()
            raise self.model_error(name, reply.status_code, text)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for piece in reply.aiter_raw():
                    if piece:
                        yield payload_part(piece)
            except httpx.ReadTimeout:
                yield model_stream_error("The model did not send the next part in time.", "ModelInvocationTimeExceeded")
            except httpx.HTTPError as exc:
                yield model_stream_error(f"The container connection broke: {exc}")
            finally:
                await reply.aclose()  # a caller who left closes the container's stream too

        out_headers = {"x-Amzn-Invoked-Production-Variant": variant,
                       "X-Amzn-SageMaker-Content-Type": reply.headers.get("content-type", "application/octet-stream")}
        if reply.headers.get(H_CUSTOM):
            out_headers[H_CUSTOM] = reply.headers[H_CUSTOM]
        return StreamingResponse(events(), status_code=200, headers=out_headers,
                                 media_type="application/vnd.amazon.eventstream")

    async def invoke(self, name: str, request: Request) -> Response:
        body, variant = await self.realtime_request(name, request)
        headers = self.container_headers(
            request.headers.get("content-type"), request.headers.get("accept"), request.headers.get(H_CUSTOM)
        )
        path = await self.target_path(name, variant, request.headers.get(H_TARGET_MODEL), headers)
        try:
            reply = await self.call_container(name, body, headers, self.options.realtime_timeout_s, path)
        except httpx.TimeoutException as exc:
            raise RuntimeApiError(
                424, "ModelError",
                f"Received server error (0) from primary with message \"Your invocation timed out while waiting "
                f"for a response from container primary ({self.options.realtime_timeout_s:.0f} s).\".",
            ) from exc
        except httpx.HTTPError as exc:
            raise RuntimeApiError(
                424, "ModelError",
                f"Received server error (0) from primary with message \"Could not reach the container at "
                f"{self.options.container_for(name)}: {exc}\".",
            ) from exc
        if reply.status_code >= 400:
            raise self.model_error(name, reply.status_code, reply.text)
        out_headers = {"x-Amzn-Invoked-Production-Variant": variant}
        if reply.headers.get(H_CUSTOM):
            out_headers[H_CUSTOM] = reply.headers[H_CUSTOM]
        return Response(
            reply.content, status_code=200, headers=out_headers,
            media_type=reply.headers.get("content-type", "application/octet-stream"),
        )

    # ------------------------------------------------------------------ async

    async def invoke_async(self, name: str, request: Request) -> Response:
        input_location = request.headers.get("X-Amzn-SageMaker-InputLocation")
        if not input_location:
            raise _validation("InputLocation is required: upload the input to S3 and pass its s3:// URI.")
        try:
            in_bucket, in_key = parse_s3_uri(input_location)
        except ValueError as exc:
            raise _validation(f"InputLocation {input_location!r} is not an s3:// URI.") from exc
        # the S3 keys come from a generated id only: a caller's InferenceId is a label, it cannot
        # choose (or overwrite) another request's objects, nor reach outside the configured prefixes
        object_id = str(uuid.uuid4())
        inference_id = _inference_id(request) or object_id
        timeout_s = float(_whole_seconds(request, "X-Amzn-SageMaker-InvocationTimeoutSeconds",
                                         "invocationTimeoutSeconds", 1, int(ASYNC_MAX_TIMEOUT_S))
                          or ASYNC_DEFAULT_TIMEOUT_S)
        ttl = _whole_seconds(request, "X-Amzn-SageMaker-RequestTTLSeconds", "requestTTLSeconds", *ASYNC_TTL_RANGE_S)
        description = await self.endpoint(name)
        config = await self.endpoint_config(description["EndpointConfigName"])
        async_config = config.get("AsyncInferenceConfig")
        if not async_config:
            raise _validation(f"Endpoint {name} is not configured for asynchronous inference; call InvokeEndpoint.")
        try:
            await asyncio.to_thread(self.aws.s3.head_object, Bucket=in_bucket, Key=in_key)
        except Exception as exc:  # noqa: BLE001
            raise _validation(f"Could not access the input at {input_location}: it does not exist or is not readable.") from exc
        output_config = async_config.get("OutputConfig", {})
        output_path = output_config["S3OutputPath"].rstrip("/")
        failure_path = (output_config.get("S3FailurePath") or output_config["S3OutputPath"]).rstrip("/")
        job = {
            "endpoint": name,
            "inference_id": inference_id,
            "input": input_location,
            "output": f"{output_path}/{object_id}.out",
            "failure": f"{failure_path}/{object_id}-error.out",
            "headers": self.container_headers(
                request.headers.get("X-Amzn-SageMaker-Content-Type"),
                request.headers.get("X-Amzn-SageMaker-Accept"),
                request.headers.get(H_CUSTOM),
            ),
            "timeout_s": timeout_s,
            "expires": time.monotonic() + ttl if ttl else None,
            "received": datetime.now(timezone.utc),
            "topics": output_config.get("NotificationConfig", {}),
        }
        capacity = async_config.get("ClientConfig", {}).get("MaxConcurrentInvocationsPerInstance") or 4
        instances = sum(v.get("CurrentInstanceCount", 1) for v in description.get("ProductionVariants", [])) or 1
        semaphore = self.semaphores.setdefault(name, asyncio.Semaphore(max(1, capacity * instances)))
        task = asyncio.create_task(self._run_async(job, semaphore))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)
        return JSONResponse(
            {"InferenceId": inference_id},
            status_code=202,
            headers={"X-Amzn-SageMaker-OutputLocation": job["output"], "X-Amzn-SageMaker-FailureLocation": job["failure"]},
        )

    async def _run_async(self, job: dict, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            try:
                await self._process(job)
            except Exception:  # noqa: BLE001 - a job must never die silently
                logger.exception("async inference %s could not be completed", job["inference_id"])
                with contextlib.suppress(Exception):
                    await self._finish(job, False, _error_body("The emulator failed to process the request.", "internal_error"),
                                       "application/json")

    async def _process(self, job: dict) -> None:
        if job["expires"] is not None and time.monotonic() > job["expires"]:
            await self._finish(job, False, _error_body("The request expired (RequestTTLSeconds) before it was processed.",
                                                       "request_expired"), "application/json")
            return
        bucket, key = parse_s3_uri(job["input"])
        try:
            obj = await asyncio.to_thread(self.aws.s3.get_object, Bucket=bucket, Key=key)
            body = await asyncio.to_thread(obj["Body"].read)
        except Exception as exc:  # noqa: BLE001
            await self._finish(job, False, _error_body(f"Could not read the input {job['input']}: {exc}", "input_error"),
                               "application/json")
            return
        try:
            reply = await self.call_container(job["endpoint"], body, job["headers"], job["timeout_s"])
        except httpx.TimeoutException:
            await self._finish(job, False, _error_body(
                f"The container did not answer within InvocationTimeoutSeconds ({job['timeout_s']:.0f} s).",
                "invocation_timeout"), "application/json")
            return
        except httpx.HTTPError as exc:
            await self._finish(job, False, _error_body(f"Could not reach the container: {exc}", "container_unreachable"),
                               "application/json")
            return
        content_type = reply.headers.get("content-type", "application/octet-stream")
        await self._finish(job, reply.status_code < 400, reply.content, content_type)

    async def _finish(self, job: dict, ok: bool, body: bytes, content_type: str) -> None:
        location = job["output"] if ok else job["failure"]
        bucket, key = parse_s3_uri(location)
        await asyncio.to_thread(self.aws.s3.put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        logger.info("async inference %s -> %s", job["inference_id"], location)
        topic = job["topics"].get("SuccessTopic" if ok else "ErrorTopic")
        if topic:
            message = {
                "awsRegion": self.aws.sagemaker.meta.region_name,
                "eventTime": datetime.now(timezone.utc).isoformat(),
                "receivedTime": job["received"].isoformat(),
                "invocationStatus": "Completed" if ok else "Failed",
                "requestParameters": {
                    "contentType": job["headers"].get("Content-Type"),
                    "endpointName": job["endpoint"],
                    "inputLocation": job["input"],
                },
                "responseParameters": {"contentType": content_type, "outputLocation": location},
                "inferenceId": job["inference_id"],
                "eventVersion": "1.0",
                "eventSource": "aws:sagemaker",
                "eventName": "InferenceResult",
            }
            try:
                await asyncio.to_thread(self.aws.client("sns").publish, TopicArn=topic, Message=json.dumps(message))
            except Exception as exc:  # noqa: BLE001 - notifications are best effort, like the output is not
                logger.warning("could not notify %s: %s", topic, exc)

    async def drain(self) -> None:
        if self.jobs:
            done, pending = await asyncio.wait(set(self.jobs), timeout=self.options.drain_timeout_s)
            for task in pending:
                task.cancel()


def create_app(options: EmulatorOptions, aws: AwsClients | None = None) -> FastAPI:
    emulator = RuntimeEmulator(options, aws)
    transform_jobs = TransformJobs(emulator.aws, options.container_for_model, options.transform_poll_s)
    control_plane = ControlPlane(transform_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        emulator.http = httpx.AsyncClient(trust_env=False)
        control_plane.http = emulator.http
        await transform_jobs.start(emulator.http)
        try:
            yield
        finally:
            await transform_jobs.stop()
            await emulator.drain()
            await emulator.http.aclose()

    app = FastAPI(title="SageMaker runtime emulator", lifespan=lifespan)
    app.state.emulator = emulator
    app.state.transform_jobs = transform_jobs
    control_plane.add_routes(app)

    @app.get("/ping")
    async def ping() -> Response:
        return Response("ok", media_type="text/plain")

    @app.post("/endpoints/{name}/invocations")
    async def invocations(name: str, request: Request) -> Response:
        try:
            return await emulator.invoke(name, request)
        except RuntimeApiError as exc:
            return exc.response()

    @app.post("/endpoints/{name}/invocations-response-stream")
    async def invocations_response_stream(name: str, request: Request) -> Response:
        try:
            return await emulator.invoke_stream(name, request)
        except RuntimeApiError as exc:
            return exc.response()

    @app.post("/endpoints/{name}/async-invocations")
    async def async_invocations(name: str, request: Request) -> Response:
        try:
            return await emulator.invoke_async(name, request)
        except RuntimeApiError as exc:
            return exc.response()

    return app


@dataclass
class RunningServer:
    """A uvicorn server on a background thread (for tests and notebooks)."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 15.0) -> RunningServer:
    """Start `app` with uvicorn on a thread; port 0 picks a free one. Returns once it accepts requests."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start within {startup_timeout_s:.0f} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--container-url", default="http://127.0.0.1:8080", help="the container serving /invocations")
    parser.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                        help="route one endpoint to another container (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--account-id", default="123456789012")
    parser.add_argument("--realtime-timeout", type=float, default=60.0)
    parser.add_argument("--models-dir", default="", help="multi-model endpoints: where targets are unpacked (the "
                        "container must load from there: WHISPER_TRITON_MODEL_LOAD_ROOTS)")
    parser.add_argument("--aws-endpoint-url", default=None,
                        help="where the emulator's own AWS calls go (the moto server); default: boto3's configuration")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URL",
                        help="run transform jobs of one model in another container (repeatable)")
    parser.add_argument("--transform-poll", type=float, default=1.0,
                        help="seconds between looks for new transform jobs in the control plane (0: only jobs "
                             "created through the emulator's control plane)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    routes: dict[str, dict[str, str]] = {"--endpoint": {}, "--model": {}}
    for flag, items in (("--endpoint", args.endpoint), ("--model", args.model)):
        for item in items:
            name, sep, url = item.partition("=")
            if not sep:
                parser.error(f"{flag} expects NAME=URL, got {item!r}")
            routes[flag][name] = url
    options = EmulatorOptions(container_url=args.container_url, endpoints=routes["--endpoint"],
                              account_id=args.account_id, realtime_timeout_s=args.realtime_timeout,
                              models=routes["--model"], aws_endpoint_url=args.aws_endpoint_url,
                              transform_poll_s=args.transform_poll or None,
                              models_dir=args.models_dir)
    import uvicorn

    uvicorn.run(create_app(options), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
