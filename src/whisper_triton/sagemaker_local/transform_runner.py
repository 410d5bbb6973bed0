"""Batch transform jobs run locally: every job in the control plane (moto) is executed once against
a container on loopback, as SageMaker documents batch transform for a container of its own.

What a job does here, and where each rule comes from:
- Input (TransformInput): `S3Prefix` is every object under the prefix; `ManifestFile` is the JSON
  manifest `[{"prefix": "s3://bucket/dir/"}, "relative/key", ...]` (API_TransformS3DataSource).
  `SplitType` None: each object is one record, its whole content one request body
  (API_TransformInput); other split types, `CompressionType` Gzip and `DataProcessing` filters are
  not emulated and fail the job at once with a reason naming them.
- Parameters: `MaxConcurrentTransforms` 0/unset, `MaxPayloadInMB` unset and `BatchStrategy` unset are
  asked of the container's `GET /execution-parameters`, then defaulted to 1, 6 and MultiRecord
  (CreateTransformJob API; the sagemaker-python-sdk local mode, `sagemaker/local/entities.py`
  `_LocalTransformJob`, does the same). MaxConcurrentTransforms x MaxPayloadInMB may not exceed 100
  (CreateTransformJob API; real SageMaker refuses the request, here the job fails).
- Concurrency: objects are spread over `InstanceCount` instances by key (round robin here), each
  instance with at most `MaxConcurrentTransforms` requests in flight.
- A record over `MaxPayloadInMB` MiB (0: no limit) is not sent and fails (sagemaker-python-sdk
  `sagemaker/local/data.py` `_validate_payload_size`: "Record is larger than ...").
- Each request: `POST /invocations` with the job's `ContentType` and `Accept`, within
  `ModelClientConfig.InvocationsTimeoutInSeconds` (default 600), retried up to `InvocationsMaxRetries`
  (default 3) times when it times out, cannot connect or answers 5xx; a 4xx is the record's fault
  and is not retried (our reading of "retries when invocation requests are failing").
- Output (TransformOutput): the answer is written whole (`AssembleWith` None; Line adds a newline)
  to `<S3OutputPath>/<path relative to the input prefix's folder, or the manifest entry>.out`; a failed
  object gets no output ("uploads only the output for successfully processed objects", API_TransformOutput).
- Failures are recorded as SageMaker records them: in CloudWatch Logs, group
  `/aws/sagemaker/TransformJobs`, stream `<job>/<instance>/data-log`, lines
  `<time>:[sagemaker logs]: <bucket>/<key>: ClientError: 400` (or `Bad HTTP status received from
  algorithm: 500`, `Unable to get response from algorithm`, ...) followed by `Message:` and the
  container's answer (the data-log format of real jobs, as users quote it in aws/sagemaker-python-sdk
  and aws/amazon-sagemaker-examples issues). The job ends `Failed` when any object failed ("marks the
  job as failed to prompt investigation"), else `Completed`; `StopTransformJob` ends it `Stopped`.

Differences from the service: the container is already running (the job's `Environment` and the
SAGEMAKER_BATCH / SAGEMAKER_MAX_PAYLOAD_IN_MB variables SageMaker sets at start are not applied to
it); moto keeps its own record of each job (always `Completed`), so the job's state lives here and the
control-plane facade (`control_plane.py`) lays it over moto's describe and list answers; the
FailureReason names the failed objects (SageMaker says "See job logs for more information" only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from ..deploy.aws import AwsClients, parse_s3_uri
from .transform_state import TransformJobState

logger = logging.getLogger(__name__)

LOG_GROUP = "/aws/sagemaker/TransformJobs"
MIB = 1024 * 1024
DEFAULT_MAX_CONCURRENT = 1
DEFAULT_MAX_PAYLOAD_MB = 6
DEFAULT_BATCH_STRATEGY = "MultiRecord"
DEFAULT_TIMEOUT_S = 600
DEFAULT_MAX_RETRIES = 3
MAX_CONCURRENT_PAYLOAD_MB = 100


class JobFailure(Exception):
    """The whole job cannot run: its FailureReason."""


@dataclass(frozen=True)
class JobSettings:
    """A job's parameters after /execution-parameters and the defaults."""

    max_concurrent: int
    max_payload_mb: int
    batch_strategy: str
    timeout_s: float
    max_retries: int
    content_type: str | None
    accept: str | None
    assemble_with: str
    instance_count: int

    def log_line(self) -> str:
        strategy = "SINGLE_RECORD" if self.batch_strategy == "SingleRecord" else "MULTI_RECORD"
        return f"MaxConcurrentTransforms={self.max_concurrent}, MaxPayloadInMB={self.max_payload_mb}, BatchStrategy={strategy}"


@dataclass(frozen=True)
class InputObject:
    bucket: str
    key: str
    relative: str  # its path under S3OutputPath, less ".out"
    size: int | None  # None: it could not be read


def output_key(output_path: str, relative: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(output_path)
    prefix = prefix.rstrip("/")
    return bucket, f"{prefix}/{relative}.out" if prefix else f"{relative}.out"


def _log_time() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}"


class DataLog:
    """The job's data-log streams in CloudWatch Logs, one per instance, written as lines arrive."""

    def __init__(self, aws: AwsClients, job: str, instances: int):
        self.aws, self.job = aws, job
        self.streams = [f"{job}/i-local{n:04d}/data-log" for n in range(max(1, instances))]
        self.pending: dict[str, list[dict]] = {s: [] for s in self.streams}
        self.ready = False

    def add(self, instance: int, text: str) -> None:
        stream = self.streams[instance % len(self.streams)]
        self.pending[stream].append({"timestamp": int(time.time() * 1000),
                                     "message": f"{_log_time()}:[sagemaker logs]: {text}"})

    def _create(self) -> None:
        logs = self.aws.logs
        for create, kwargs in ((logs.create_log_group, {"logGroupName": LOG_GROUP}),
                               *((logs.create_log_stream, {"logGroupName": LOG_GROUP, "logStreamName": s})
                                 for s in self.streams)):
            try:
                create(**kwargs)
            except logs.exceptions.ResourceAlreadyExistsException:
                pass
        self.ready = True

    def _put(self) -> None:
        if not self.ready:
            self._create()
        for stream, events in self.pending.items():
            if events:
                batch, self.pending[stream] = events, []
                self.aws.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=batch)

    async def flush(self) -> None:
        try:
            await asyncio.to_thread(self._put)
        except Exception as exc:  # noqa: BLE001 - the job's outcome does not depend on its log
            logger.warning("could not write the data-log of transform job %s: %s", self.job, exc)


class TransformJobRunner:
    """Runs one job to its end; `state` says where it is."""

    def __init__(self, state: TransformJobState, description: dict, aws: AwsClients, http: httpx.AsyncClient,
                 container_url: str):
        self.state, self.description, self.aws, self.http = state, description, aws, http
        self.container = container_url.rstrip("/")
        resources = description.get("TransformResources") or {}
        self.log = DataLog(aws, state.name, int(resources.get("InstanceCount") or 1))
        self.failures: list[tuple[InputObject, str, str]] = []  # (object, ClientError|AlgorithmError, first line)

    async def run(self) -> None:
        state = self.state
        state.start_time = time.time()
        try:
            settings = await self.settings()
            objects = await self.inputs()
            state.objects = len(objects)
            self.log.add(0, settings.log_line())
            await self.process_all(objects, settings)
            if state.stop_requested:
                state.set_status("Stopped")
            elif self.failures:
                state.set_status("Failed", self.failure_reason(len(objects)))
            else:
                state.set_status("Completed")
        except JobFailure as exc:
            state.set_status("Failed", str(exc))
        except asyncio.CancelledError:
            state.set_status("Stopped")
            raise
        except Exception as exc:  # noqa: BLE001 - a job must end in a state, never hang InProgress
            logger.exception("transform job %s failed in the emulator", state.name)
            state.set_status("Failed", f"InternalServerError: the local runner failed: {exc}")
        finally:
            await self.log.flush()
            logger.info("transform job %s: %s (%d ok, %d failed)", state.name, state.status, state.succeeded, state.failed)

    def failure_reason(self, total: int) -> str:
        kind = "ClientError" if any(k == "ClientError" for _, k, _ in self.failures) else "AlgorithmError"
        named = "; ".join(f"{o.bucket}/{o.key}: {line}" for o, _, line in self.failures)
        return f"{kind}: {len(self.failures)} of {total} objects failed ({named}). See job logs for more information."

    # ------------------------------------------------------------------ parameters

    async def settings(self) -> JobSettings:
        d = self.description
        transform_input = d.get("TransformInput") or {}
        source = (transform_input.get("DataSource") or {}).get("S3DataSource") or {}
        unsupported = []
        if transform_input.get("SplitType", "None") not in ("None", None):
            unsupported.append(f"SplitType {transform_input['SplitType']}")
        if transform_input.get("CompressionType", "None") not in ("None", None):
            unsupported.append(f"CompressionType {transform_input['CompressionType']}")
        if source.get("S3DataType") not in ("S3Prefix", "ManifestFile"):
            unsupported.append(f"S3DataType {source.get('S3DataType')}")
        processing = d.get("DataProcessing") or {}
        if any(processing.get(k) not in (None, "$", "None") for k in ("InputFilter", "OutputFilter", "JoinSource")):
            unsupported.append("DataProcessing filters")
        if unsupported:
            raise JobFailure(f"ClientError: the local runner does not emulate {', '.join(unsupported)}; "
                             "audio files are one record each (SplitType None, S3Prefix or ManifestFile).")
        await self.wait_for_ping()
        concurrent, payload, strategy = d.get("MaxConcurrentTransforms"), d.get("MaxPayloadInMB"), d.get("BatchStrategy")
        if not concurrent or payload is None or not strategy:
            asked = await self.execution_parameters()
            concurrent = concurrent or asked.get("MaxConcurrentTransforms")
            payload = payload if payload is not None else asked.get("MaxPayloadInMB")
            strategy = strategy or {"SINGLE_RECORD": "SingleRecord", "MULTI_RECORD": "MultiRecord"}.get(
                str(asked.get("BatchStrategy", "")).upper())
        concurrent = int(concurrent or DEFAULT_MAX_CONCURRENT)
        payload = int(payload if payload is not None else DEFAULT_MAX_PAYLOAD_MB)
        if concurrent * payload > MAX_CONCURRENT_PAYLOAD_MB:
            raise JobFailure(f"ClientError: MaxConcurrentTransforms x MaxPayloadInMB is {concurrent} x {payload} = "
                             f"{concurrent * payload} MB; it may not exceed {MAX_CONCURRENT_PAYLOAD_MB} MB.")
        client = d.get("ModelClientConfig") or {}
        output = d.get("TransformOutput") or {}
        resources = d.get("TransformResources") or {}
        return JobSettings(
            max_concurrent=concurrent, max_payload_mb=payload, batch_strategy=strategy or DEFAULT_BATCH_STRATEGY,
            timeout_s=float(client.get("InvocationsTimeoutInSeconds") or DEFAULT_TIMEOUT_S),
            max_retries=int(client.get("InvocationsMaxRetries", DEFAULT_MAX_RETRIES)),
            content_type=transform_input.get("ContentType") or None, accept=output.get("Accept") or None,
            assemble_with=output.get("AssembleWith") or "None", instance_count=int(resources.get("InstanceCount") or 1))

    async def wait_for_ping(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = await self.http.get(f"{self.container}/ping", timeout=2.0)
                if reply.status_code == 200:
                    return
                last = f"status {reply.status_code}"
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            await asyncio.sleep(0.5)
        raise JobFailure(f"ClientError: the container at {self.container} did not answer GET /ping with 200 within "
                         f"{timeout_s:.0f} s ({last}). Start `serve` (or pass the emulator its URL).")

    async def execution_parameters(self) -> dict:
        """The container's wishes; {} when it has no such route (SageMaker then uses the defaults)."""
        try:
            reply = await self.http.get(f"{self.container}/execution-parameters", timeout=5.0)
            if reply.status_code == 200:
                data = reply.json()
                return data if isinstance(data, dict) else {}
        except (httpx.HTTPError, ValueError):
            pass
        return {}

    # ------------------------------------------------------------------ inputs

    async def inputs(self) -> list[InputObject]:
        source = self.description["TransformInput"]["DataSource"]["S3DataSource"]
        uri = source["S3Uri"]
        try:
            if source["S3DataType"] == "ManifestFile":
                objects = await asyncio.to_thread(self._manifest_objects, uri)
            else:
                objects = await asyncio.to_thread(self._prefix_objects, uri)
        except JobFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise JobFailure(f"ClientError: could not read the input {uri}: {exc}") from exc
        if not objects:
            raise JobFailure(f"ClientError: there are no objects at the input location {uri}.")
        return objects

    def _prefix_objects(self, uri: str) -> list[InputObject]:
        bucket, prefix = parse_s3_uri(uri)
        folder = prefix[: prefix.rfind("/") + 1]  # outputs keep the path under the prefix's folder
        objects = []
        for page in self.aws.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    objects.append(InputObject(bucket, item["Key"], item["Key"][len(folder):], item["Size"]))
        return objects

    def _manifest_objects(self, uri: str) -> list[InputObject]:
        bucket, key = parse_s3_uri(uri)
        try:
            entries = json.loads(self.aws.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            base = entries[0]["prefix"]
            relatives = [str(e) for e in entries[1:]]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JobFailure(f"ClientError: the manifest {uri} is not [{{\"prefix\": \"s3://...\"}}, \"key\", ...]: "
                             f"{exc}") from exc
        base_bucket, base_prefix = parse_s3_uri(base)
        objects = []
        for relative in relatives:
            key = base_prefix + relative
            try:
                size = int(self.aws.s3.head_object(Bucket=base_bucket, Key=key)["ContentLength"])
            except Exception:  # noqa: BLE001 - one missing object fails as a record, not the whole job
                size = None
            objects.append(InputObject(base_bucket, key, relative, size))
        return objects

    # ------------------------------------------------------------------ records

    async def process_all(self, objects: list[InputObject], settings: JobSettings) -> None:
        gates = [asyncio.Semaphore(settings.max_concurrent) for _ in range(settings.instance_count)]

        async def one(index: int, obj: InputObject) -> None:
            instance = index % settings.instance_count
            async with gates[instance]:
                if self.state.stop_requested:
                    return
                await self.process(obj, settings, instance)
                await self.log.flush()

        await asyncio.gather(*(one(i, o) for i, o in enumerate(objects)))

    def fail(self, obj: InputObject, instance: int, kind: str, lines: list[str]) -> None:
        for line in lines:
            self.log.add(instance, f"{obj.bucket}/{obj.key}: {line}")
        self.failures.append((obj, kind, lines[0]))
        self.state.failed += 1

    def reply_lines(self, status_line: str, reply: httpx.Response) -> list[str]:
        return [status_line, "", "Message:", *(reply.text.splitlines() or [""])]

    async def process(self, obj: InputObject, settings: JobSettings, instance: int) -> None:
        if obj.size is None:
            self.fail(obj, instance, "ClientError", ["ClientError: the object named in the manifest does not exist "
                                                     "or cannot be read."])
            return
        limit = settings.max_payload_mb * MIB
        if settings.max_payload_mb and obj.size > limit:
            self.fail(obj, instance, "ClientError", [
                f"ClientError: the record is {obj.size} bytes, larger than MaxPayloadInMB={settings.max_payload_mb} "
                f"({limit} bytes); it was not sent to the container. Raise MaxPayloadInMB (at most 100) or split the file."])
            return
        try:
            body = await asyncio.to_thread(lambda: self.aws.s3.get_object(Bucket=obj.bucket, Key=obj.key)["Body"].read())
        except Exception as exc:  # noqa: BLE001
            self.fail(obj, instance, "ClientError", [f"ClientError: could not read the object: {exc}"])
            return
        headers = {k: v for k, v in (("Content-Type", settings.content_type), ("Accept", settings.accept)) if v}
        timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
        lines: list[str] = []
        for attempt in range(1 + settings.max_retries):
            if attempt:
                for line in lines:
                    self.log.add(instance, f"{obj.bucket}/{obj.key}: {line}")
            try:
                reply = await self.http.post(f"{self.container}/invocations", content=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException:
                lines = [f"Model server did not respond to /invocations request within {settings.timeout_s:.0f} seconds"]
                continue
            except httpx.HTTPError as exc:
                lines = ["Unable to get response from algorithm", "", "Message:", str(exc) or type(exc).__name__]
                continue
            if reply.status_code < 400:
                await self.write_output(obj, reply, settings)
                return
            if reply.status_code < 500:  # the record's fault: another try gives the same answer
                self.fail(obj, instance, "ClientError", self.reply_lines(f"ClientError: {reply.status_code}", reply))
                return
            lines = self.reply_lines(f"Bad HTTP status received from algorithm: {reply.status_code}", reply)
        self.fail(obj, instance, "AlgorithmError", lines)

    async def write_output(self, obj: InputObject, reply: httpx.Response, settings: JobSettings) -> None:
        bucket, key = output_key(self.description["TransformOutput"]["S3OutputPath"], obj.relative)
        data = reply.content + (b"\n" if settings.assemble_with == "Line" else b"")
        content_type = reply.headers.get("content-type", "application/octet-stream")
        await asyncio.to_thread(self.aws.s3.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        self.state.succeeded += 1
