"""Where a transform job really is: what moto cannot hold (it records every job `Completed` at once),
in the shapes of the SageMaker API."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL = ("Completed", "Failed", "Stopped")
FAILURE_REASON_MAX = 1024  # the API's length limit of FailureReason


@dataclass
class TransformJobState:
    """What moto cannot hold: where a job really is."""

    name: str
    arn: str
    created: float  # epoch seconds, moto's CreationTime (a job re-created under the same name is another job)
    status: str = "InProgress"
    failure_reason: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    last_modified: float = field(default_factory=time.time)
    stop_requested: bool = False
    objects: int = 0
    succeeded: int = 0
    failed: int = 0
    task: asyncio.Task | None = None

    def set_status(self, status: str, reason: str | None = None) -> None:
        self.status, self.last_modified = status, time.time()
        if reason is not None:
            self.failure_reason = reason[:FAILURE_REASON_MAX]
        if status in TERMINAL:
            self.end_time = self.last_modified

    def overlay(self, description: dict) -> dict:
        """moto's DescribeTransformJob answer (JSON, epoch times) with this job's real state."""
        out = dict(description)
        out["TransformJobStatus"] = self.status
        out["FailureReason"] = self.failure_reason or ""
        if not self.failure_reason:
            out.pop("FailureReason")
        for key, value in (("TransformStartTime", self.start_time), ("TransformEndTime", self.end_time)):
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        if "LastModifiedTime" in out:
            out["LastModifiedTime"] = self.last_modified
        return out


def epoch(value: Any) -> float:
    """Seconds since the epoch of a time as boto3 (datetime) or the JSON protocol (number) gives it."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0
