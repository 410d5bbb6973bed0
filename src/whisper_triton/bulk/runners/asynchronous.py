"""`--via async`: an asynchronous SageMaker endpoint (made with `whisper-deploy deploy --async
--autoscale`). The inputs are invoked where they lie (InputLocation is the object itself: nothing is
uploaded), results are read from the endpoint's output and failure locations.

Scale: with `--instances N` the endpoint's scalable target (the existing autoscaling, minimum 0) gets
minimum capacity N for the run, so N instances start at once instead of one by one from the backlog
alarm; afterwards the minimum (and maximum) it had are put back, so the endpoint scales in to zero
again on its backlog policy."""

from __future__ import annotations

import hashlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ...clients.asynchronous import AsyncInvokeOptions, wait_for_result
from ...clients.realtime import describe_client_error
from ...deploy.aws import AwsClients
from ...deploy.resources import SCALABLE_DIMENSION, resource_id
from ..listing import AudioObject, BulkError, Location
from ..manifest import PERMANENT, RETRYABLE
from . import Outcome, Report, error_message, guarded
from .local import content_type_for_key

logger = logging.getLogger(__name__)

ASYNC_MAX_BYTES = 1024 * 1024 * 1024  # SageMaker async inference: input up to 1 GB


class AsyncRunner:
    via = "async"

    def __init__(self, aws: AwsClients, runtime: Any, endpoint: str, source: Location, *, instances: int | None = None,
                 in_flight: int = 16, retries: int = 2, timeout_s: float = 3600.0, poll_initial_s: float = 1.0,
                 poll_max_s: float = 20.0, custom_attributes: str | None = None, invocation_timeout_s: int | None = None):
        self.aws, self.runtime, self.endpoint, self.source = aws, runtime, endpoint, source
        self.instances, self.in_flight, self.retries = instances, max(1, in_flight), max(0, retries)
        self.custom_attributes, self.invocation_timeout_s = custom_attributes, invocation_timeout_s
        self.wait = AsyncInvokeOptions(endpoint, source.bucket, timeout_s=timeout_s, poll_initial_s=poll_initial_s,
                                       poll_max_s=poll_max_s)
        self.scaling: dict = {}
        self._restore: dict | None = None

    def limit_bytes(self) -> int:
        return ASYNC_MAX_BYTES

    def start(self) -> None:
        sm = self.aws.sagemaker
        try:
            description = sm.describe_endpoint(EndpointName=self.endpoint)
            config = sm.describe_endpoint_config(EndpointConfigName=description["EndpointConfigName"])
        except (ClientError, BotoCoreError) as exc:
            raise BulkError(f"Could not find the endpoint {self.endpoint!r}: {exc}. Deploy it with `whisper-deploy "
                            "deploy --async --autoscale ...` or fix --endpoint (and AWS_DEFAULT_REGION).") from exc
        if not config.get("AsyncInferenceConfig"):
            raise BulkError(f"The endpoint {self.endpoint!r} is a real-time endpoint; --via async needs one made with "
                            "`whisper-deploy deploy --async` (or use --via transform).")
        if self.instances:
            self.scale_out(description["ProductionVariants"][0]["VariantName"])

    def scale_out(self, variant: str) -> None:
        aas = self.aws.autoscaling
        target = {"ServiceNamespace": "sagemaker", "ResourceId": resource_id(self.endpoint, variant),
                  "ScalableDimension": SCALABLE_DIMENSION}
        found = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[target["ResourceId"]],
                                              ScalableDimension=SCALABLE_DIMENSION).get("ScalableTargets", [])
        if not found:
            logger.warning("endpoint %s has no autoscaling: it runs on the instances it has (add it with "
                           "`whisper-deploy autoscale --name %s`)", self.endpoint, self.endpoint)
            self.scaling = {"scaled": False, "reason": "no scalable target"}
            return
        before = {"MinCapacity": found[0]["MinCapacity"], "MaxCapacity": found[0]["MaxCapacity"]}
        wanted = int(self.instances or 0)
        aas.register_scalable_target(**target, MinCapacity=wanted, MaxCapacity=max(before["MaxCapacity"], wanted))
        self._restore = {**target, **before}
        self.scaling = {"scaled": True, "min_capacity_during_run": wanted, "restored": before}
        logger.info("endpoint %s: minimum capacity %d for the run (was %d)", self.endpoint, wanted, before["MinCapacity"])

    def finish(self) -> None:
        if self._restore is not None:
            self.aws.autoscaling.register_scalable_target(**self._restore)
            logger.info("endpoint %s: minimum capacity back to %d", self.endpoint, self._restore["MinCapacity"])
            self._restore = None

    def details(self) -> dict:
        return {"endpoint": self.endpoint, "in_flight": self.in_flight, **self.scaling}

    def run(self, objects: list[AudioObject], report: Report) -> None:
        with ThreadPoolExecutor(max_workers=self.in_flight) as pool:
            for future in as_completed([pool.submit(guarded, self.one, obj) for obj in objects]):
                report(future.result())

    def invoke(self, obj: AudioObject) -> dict:
        request: dict[str, Any] = {
            "EndpointName": self.endpoint, "InputLocation": self.source.uri(obj.key),
            "ContentType": content_type_for_key(obj.key), "Accept": "application/json",
            # unique per try, traceable to the input
            "InferenceId": f"{hashlib.sha1(obj.key.encode()).hexdigest()[:16]}-{uuid.uuid4().hex[:12]}",
        }
        if self.custom_attributes:
            request["CustomAttributes"] = self.custom_attributes
        if self.invocation_timeout_s:
            request["InvocationTimeoutSeconds"] = self.invocation_timeout_s
        return self.runtime.invoke_endpoint_async(**request)

    def one(self, obj: AudioObject) -> Outcome:
        outcome = Outcome(obj, attempts=0)
        for attempt in range(1 + self.retries):
            outcome.attempts = attempt + 1
            try:
                reply = self.invoke(obj)
            except (ClientError, BotoCoreError) as exc:
                outcome.error = describe_client_error(exc, self.endpoint)
                code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
                outcome.error_kind = PERMANENT if code == "ValidationError" else RETRYABLE
                if outcome.error_kind == PERMANENT:
                    return outcome
                continue
            try:
                ok, body, _ = wait_for_result(self.aws.s3, reply["OutputLocation"], reply.get("FailureLocation"), self.wait)
            except TimeoutError as exc:
                outcome.error, outcome.error_kind = str(exc), RETRYABLE
                continue
            if ok:
                outcome.body, outcome.error, outcome.error_kind = body, None, None
                return outcome
            outcome.error, outcome.error_kind = error_message(body)
            if outcome.error_kind == PERMANENT:
                return outcome
            logger.info("%s: %s; trying again", obj.key, outcome.error)
        return outcome
