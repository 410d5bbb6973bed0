"""`--via transform`: SageMaker batch transform jobs, the service's own engine for a backlog: the
instances start for the job, work through it and are gone afterwards.

A round: the objects to send are written as a SageMaker manifest (`ManifestFile`, so a resumed or
filtered run sends only what is left) under `<output>/_jobs/<run>/`, one job is started through the
deploy library (`whisper-deploy transform`'s code: validation, tags, model), and polled with
`describe_transform_job` until it ends. Each object's `<path>.out` (the container's JSON) is read as
it appears; an object without one failed, and the job's data-log in CloudWatch Logs
(`/aws/sagemaker/TransformJobs`, `<job>/<instance>/data-log`) says why: `ClientError: 4xx` is the
file's fault (not retried), anything else (5xx, no answer, timeouts) goes into the next round's job,
up to `--retries` rounds. A job that fails as a whole (bad model, no capacity) fails its objects with
its FailureReason.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from ...deploy import Deployer, DeployError, ModelOptions, TransformOptions
from ..listing import AudioObject, BulkError, Location
from ..manifest import JOBS_FOLDER, PERMANENT, RETRYABLE
from . import Outcome, Report, error_message

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
LOG_GROUP = "/aws/sagemaker/TransformJobs"
TERMINAL = ("Completed", "Failed", "Stopped")
_LOG_PREFIX = re.compile(r"^\S*\[sagemaker logs\]: ")


@dataclass
class TransformSettings:
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    max_payload_mb: int = 100
    max_concurrent_transforms: int = 1
    invocation_timeout_s: int = 3600
    invocation_max_retries: int = 1
    model_name: str | None = None
    model: ModelOptions | None = None
    job_name: str = "whisper-bulk"
    poll_s: float = 15.0
    timeout_s: float = 24 * 3600.0  # per job


@dataclass
class JobRecord:
    name: str
    status: str = ""
    failure_reason: str = ""
    objects: int = 0
    outputs: int = 0
    seconds: float = 0.0


def parse_data_log(messages: list[str], names: set[str]) -> dict[str, list[str]]:
    """`bucket/key` (one of `names`) -> the lines the data-log holds about it, in order. Keys may hold
    ': ' and spaces, so a line's object is found among the names, not split off."""
    by_object: dict[str, list[str]] = {}
    for message in messages:
        text = _LOG_PREFIX.sub("", message, count=1)
        position = text.find(": ")
        while position != -1:
            if text[:position] in names:
                by_object.setdefault(text[:position], []).append(text[position + 2:])
                break
            position = text.find(": ", position + 1)
    return by_object


STATUS_LINES = ("ClientError", "Bad HTTP status received from algorithm", "Unable to get response from algorithm",
                "Model server did not respond")


def failure_from_log(lines: list[str]) -> tuple[str, str]:
    """(message, kind) of an object's data-log lines: its last status line and the message after it."""
    starts = [i for i, line in enumerate(lines) if line.startswith(STATUS_LINES)]
    last = starts[-1] if starts else 0
    status, rest = lines[last], lines[last + 1:]
    body = "\n".join(rest[rest.index("Message:") + 1:]) if "Message:" in rest else ""
    message = error_message(body)[0] if body.strip() else ""
    kind = PERMANENT if status.startswith("ClientError") else RETRYABLE
    return (f"{status}: {message}" if message else status), kind


class TransformRunner:
    via = "transform"

    def __init__(self, aws: Any, source: Location, target: Location, settings: TransformSettings, *,
                 retries: int = 1, run_id: str | None = None):
        self.aws, self.source, self.target, self.settings = aws, source, target, settings
        self.retries = max(0, retries)
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S")
        self.deployer = Deployer(aws, poll_interval_s=settings.poll_s, progress=lambda line: logger.info("%s", line))
        self.jobs: list[JobRecord] = []

    def limit_bytes(self) -> int:
        return self.settings.max_payload_mb * MIB

    def start(self) -> None:
        if self.settings.model_name is None and self.settings.model is None:
            raise BulkError("--via transform needs a model: --model-name NAME (an existing SageMaker model), or "
                            "--image, --model-data and --role to create one.")

    def finish(self) -> None:
        pass

    def details(self) -> dict:
        return {"jobs": [vars(job) for job in self.jobs], "instance_type": self.settings.instance_type,
                "instance_count": self.settings.instance_count}

    def run(self, objects: list[AudioObject], report: Report) -> None:
        pending, attempts = list(objects), {o.key: 0 for o in objects}

        def done(outcome: Outcome) -> None:
            outcome.attempts = attempts[outcome.obj.key]
            report(outcome)

        for round_number in range(1 + self.retries):
            if not pending:
                return
            for obj in pending:
                attempts[obj.key] += 1
            retry = []
            for outcome in self.run_job(pending, round_number, done):  # the failures; outputs are reported as they come
                if outcome.error_kind == PERMANENT or round_number == self.retries:
                    done(outcome)
                else:
                    logger.info("%s: %s; sending it again in the next job", outcome.obj.key, outcome.error)
                    retry.append(outcome.obj)
            pending = retry

    def job_folder(self, round_number: int) -> Location:
        return Location(self.target.bucket, self.target.key(f"{JOBS_FOLDER}/{self.run_id}-{round_number}/"))

    def write_job_manifest(self, objects: list[AudioObject], folder: Location) -> str:
        base = self.source.uri(self.source.folder)
        entries: list[Any] = [{"prefix": base if base.endswith("/") else base + "/"}] + [o.relative for o in objects]
        key = folder.key("input.manifest")
        self.aws.s3.put_object(Bucket=folder.bucket, Key=key, Body=json.dumps(entries).encode(),
                               ContentType="application/json")
        return folder.uri(key)

    def start_job(self, manifest_uri: str, output: Location) -> str:
        s = self.settings
        try:
            job = self.deployer.start_transform(TransformOptions(
                name=s.job_name, input_prefix=manifest_uri, input_data_type="ManifestFile",
                output_path=output.uri(), model_name=s.model_name, model=s.model, instance_type=s.instance_type,
                instance_count=s.instance_count, max_payload_mb=s.max_payload_mb,
                max_concurrent_transforms=s.max_concurrent_transforms, accept="application/json",
                invocation_timeout_s=s.invocation_timeout_s, invocation_max_retries=s.invocation_max_retries))
        except DeployError as exc:
            raise BulkError(f"Could not start the transform job: {exc}") from exc
        return job.name

    def run_job(self, objects: list[AudioObject], round_number: int, report: Report) -> list[Outcome]:
        """Run one job over `objects`; report each output as it appears; return the failures."""
        folder = self.job_folder(round_number)
        output = Location(folder.bucket, folder.key("out/"))
        name = self.start_job(self.write_job_manifest(objects, folder), output)
        record = JobRecord(name, objects=len(objects))
        self.jobs.append(record)
        logger.info("transform job %s: %d files -> %s", name, len(objects), output.uri())
        expected = {output.key(f"{o.relative}.out"): o for o in objects}
        started = time.monotonic()
        while True:
            description = self.aws.sagemaker.describe_transform_job(TransformJobName=name)
            ended = description["TransformJobStatus"] in TERMINAL
            for key in self.new_outputs(output, expected):  # read after the status, so none is missed at the end
                body = self.aws.s3.get_object(Bucket=output.bucket, Key=key)["Body"].read()
                record.outputs += 1
                report(Outcome(expected.pop(key), body=body))
            if ended:
                break
            if time.monotonic() - started > self.settings.timeout_s:
                self.aws.sagemaker.stop_transform_job(TransformJobName=name)
                raise BulkError(f"The transform job {name} did not end within {self.settings.timeout_s:.0f} s; it was "
                                "asked to stop. Raise --job-timeout, or add instances (--instances).")
            time.sleep(self.settings.poll_s)
        record.status, record.failure_reason = description["TransformJobStatus"], description.get("FailureReason", "")
        record.seconds = round(time.monotonic() - started, 1)
        names = {f"{self.source.bucket}/{obj.key}" for obj in expected.values()}
        log = parse_data_log(self.data_log(name), names) if expected else {}
        failures = []
        for obj in expected.values():
            lines = log.get(f"{self.source.bucket}/{obj.key}")
            if lines:
                message, kind = failure_from_log(lines)
            else:
                message = f"no output and no data-log entry (job {record.status}: {record.failure_reason or 'no reason'})"
                kind = RETRYABLE
            failures.append(Outcome(obj, error=message, error_kind=kind))
        return failures

    def new_outputs(self, output: Location, expected: dict[str, AudioObject]) -> list[str]:
        found = []
        for page in self.aws.s3.get_paginator("list_objects_v2").paginate(Bucket=output.bucket, Prefix=output.prefix):
            found.extend(item["Key"] for item in page.get("Contents", []) if item["Key"] in expected)
        return found

    def data_log(self, job: str) -> list[str]:
        """Every data-log message of the job (all its instances, in time order per instance)."""
        messages: list[str] = []
        logs = self.aws.logs
        try:
            streams = [s["logStreamName"]
                       for page in logs.get_paginator("describe_log_streams").paginate(
                           logGroupName=LOG_GROUP, logStreamNamePrefix=f"{job}/")
                       for s in page.get("logStreams", []) if s["logStreamName"].endswith("/data-log")]
            for start in range(0, len(streams), 100):  # filter_log_events takes up to 100 stream names
                names = streams[start:start + 100]
                for page in logs.get_paginator("filter_log_events").paginate(logGroupName=LOG_GROUP, logStreamNames=names):
                    # moto ignores the stream filter: keep the check here too
                    messages.extend(e["message"] for e in page.get("events", []) if e["logStreamName"] in names)
        except Exception as exc:  # noqa: BLE001 - without the log the failures still count, with less detail
            logger.warning("could not read the data-log of %s: %s", job, exc)
        return messages
