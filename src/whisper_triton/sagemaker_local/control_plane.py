"""The SageMaker control plane as boto3 sees it locally: moto, with the transform jobs' real state.

moto (5.x) records a transform job as `Completed` the moment it is created, has no StopTransformJob
and lets nothing set a job's status; the local runner (`transform_jobs.py`) holds where each job
really is. With `AWS_ENDPOINT_URL_SAGEMAKER` pointing at the emulator, unmodified boto3 code
(`describe_transform_job`, its `transform_job_completed_or_stopped` waiter, `list_transform_jobs`,
`stop_transform_job`) gets that state in the same shapes:

- `POST /` with `X-Amz-Target: SageMaker.<Operation>` (the JSON 1.1 protocol of the SageMaker API):
  DescribeTransformJob and ListTransformJobs are answered by moto, then the job's status, failure
  reason and times are laid over its answer (a job not seen yet is started first, so no caller ever
  reads moto's premature `Completed`); ListTransformJobs applies `StatusEquals` after that.
  CreateTransformJob goes to moto and the job starts at once. StopTransformJob is answered here
  (ValidationException for a job that has ended, as SageMaker answers). Every other operation is
  forwarded to moto as it came.
- The emulator's own AWS calls must reach moto directly (`--aws-endpoint-url`); a request that comes
  back to the emulator from itself is refused with 508 instead of looping.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .transform_jobs import TERMINAL, TransformJobs, epoch

JSON_TYPE = "application/x-amz-json-1.1"
FORWARDED = "X-Whisper-Emulator-Forwarded"
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


def _error(status: int, code: str, message: str) -> Response:
    return Response(json.dumps({"__type": code, "message": message}), status_code=status, media_type=JSON_TYPE,
                    headers={"x-amzn-ErrorType": code, "x-amzn-RequestId": str(uuid.uuid4())})


def _json(data: Any) -> Response:
    return Response(json.dumps(data), media_type=JSON_TYPE, headers={"x-amzn-RequestId": str(uuid.uuid4())})


class ControlPlane:
    """Routes the SageMaker control-plane API through the emulator."""

    def __init__(self, jobs: TransformJobs):
        self.jobs = jobs
        self.http: httpx.AsyncClient | None = None

    @property
    def upstream(self) -> str:
        return str(self.jobs.aws.sagemaker.meta.endpoint_url).rstrip("/")

    async def forward(self, request: Request, body: bytes) -> httpx.Response:
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[FORWARDED] = "1"
        return await self.http.post(self.upstream + "/", content=body, headers=headers, timeout=60.0)

    @staticmethod
    def passthrough(reply: httpx.Response) -> Response:
        headers = {k: v for k, v in reply.headers.items()
                   if k.lower() not in _HOP_HEADERS | {"content-encoding", "date", "server"}}
        return Response(reply.content, status_code=reply.status_code, headers=headers)

    async def handle(self, request: Request) -> Response:
        if request.headers.get(FORWARDED):
            return _error(508, "LoopDetected", "The emulator's own control-plane client points at the emulator. Start it "
                          "with --aws-endpoint-url http://MOTO_HOST:PORT (or AWS_ENDPOINT_URL, without "
                          "AWS_ENDPOINT_URL_SAGEMAKER pointing at the emulator).")
        operation = request.headers.get("x-amz-target", "").removeprefix("SageMaker.")
        body = await request.body()
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "SerializationException", "The request body is not JSON.")
        if operation == "DescribeTransformJob":
            return await self.describe(request, body)
        if operation == "ListTransformJobs":
            return await self.list(request, params)
        if operation == "StopTransformJob":
            return await self.stop(params)
        reply = await self.forward(request, body)
        if operation == "CreateTransformJob" and reply.status_code == 200:
            description = await self._describe_upstream(params["TransformJobName"])
            await self.jobs.ensure(description)
        return self.passthrough(reply)

    async def _describe_upstream(self, name: str) -> dict:
        return await asyncio.to_thread(self.jobs.aws.sagemaker.describe_transform_job, TransformJobName=name)

    async def describe(self, request: Request, body: bytes) -> Response:
        reply = await self.forward(request, body)
        if reply.status_code != 200:
            return self.passthrough(reply)
        description = reply.json()
        state = await self.jobs.ensure(description)
        return _json(state.overlay(description))

    async def list(self, request: Request, params: dict) -> Response:
        wanted = params.pop("StatusEquals", None)
        reply = await self.forward(request, json.dumps(params).encode())
        if reply.status_code != 200:
            return self.passthrough(reply)
        data = reply.json()
        summaries = []
        for summary in data.get("TransformJobSummaries", []):
            state = self.jobs.known(summary["TransformJobName"], summary["CreationTime"])
            if state is None:
                state = await self.jobs.ensure(await self._describe_upstream(summary["TransformJobName"]))
            summary = dict(summary, TransformJobStatus=state.status, LastModifiedTime=state.last_modified)
            if state.end_time is not None:
                summary["TransformEndTime"] = state.end_time
            else:
                summary.pop("TransformEndTime", None)
            if state.failure_reason:
                summary["FailureReason"] = state.failure_reason
            if wanted is None or summary["TransformJobStatus"] == wanted:
                summaries.append(summary)
        data["TransformJobSummaries"] = summaries
        return _json(data)

    async def stop(self, params: dict) -> Response:
        name = params.get("TransformJobName", "")
        try:
            description = await self._describe_upstream(name)
        except Exception:  # noqa: BLE001
            return _error(400, "ValidationException", f"Could not find transform job '{name}'.")
        state = self.jobs.known(name, epoch(description["CreationTime"])) or await self.jobs.ensure(description)
        if state.status in TERMINAL:
            return _error(400, "ValidationException",
                          f"The transform job {name} is {state.status}; only a job in progress can be stopped.")
        self.jobs.request_stop(state)
        return _json({})

    def add_routes(self, app: FastAPI) -> None:
        @app.post("/")
        async def control_plane(request: Request) -> Response:
            return await self.handle(request)
