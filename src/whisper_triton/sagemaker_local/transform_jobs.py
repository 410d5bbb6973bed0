"""Every transform job of the control plane, run once by the local runner (`transform_runner.py`),
and the state moto cannot hold (moto 5.x records a job `Completed` the moment it is created and lets
nothing change that): status, failure reason, start and end times, laid over moto's answers by the
control-plane facade (`control_plane.py`).

Jobs are found two ways: the facade sees them created or asked about, and, when `poll_s` is set, a
look at moto's job list every `poll_s` seconds finds jobs created there directly (`whisper-deploy
transform` with AWS_ENDPOINT_URL at moto). Each job is run once per emulator; an emulator started
later runs again the jobs moto still lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import httpx

from ..deploy.aws import AwsClients
from .transform_runner import TransformJobRunner
from .transform_state import TERMINAL, TransformJobState, epoch

__all__ = ["TERMINAL", "TransformJobState", "TransformJobs", "epoch"]

logger = logging.getLogger(__name__)


class TransformJobs:
    """Every transform job the control plane holds, each run once; the state the facade reports.

    `poll_s`: how often moto's job list is read for jobs created directly there (None: only jobs
    seen through the facade run). `container_for(model_name)` is the container a job's model runs in."""

    def __init__(self, aws: AwsClients, container_for: Callable[[str], str], poll_s: float | None = 1.0):
        self.aws, self.container_for, self.poll_s = aws, container_for, poll_s
        self.jobs: dict[str, TransformJobState] = {}
        self.http: httpx.AsyncClient | None = None
        self.watcher: asyncio.Task | None = None
        self.lock = asyncio.Lock()
        self._last_error = ""

    async def start(self, http: httpx.AsyncClient) -> None:
        self.http = http
        if self.poll_s:
            self.watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        tasks = [t for t in (self.watcher, *(s.task for s in self.jobs.values())) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _watch(self) -> None:
        while True:
            try:
                await self.sync()
                self._last_error = ""
            except Exception as exc:  # noqa: BLE001 - the control plane may come and go; say so once
                if str(exc) != self._last_error:
                    logger.warning("could not list transform jobs in the control plane: %s", exc)
                    self._last_error = str(exc)
            await asyncio.sleep(self.poll_s or 1.0)

    def _list_all(self) -> list[dict]:
        summaries = []
        for page in self.aws.sagemaker.get_paginator("list_transform_jobs").paginate():
            summaries.extend(page.get("TransformJobSummaries", []))
        return summaries

    def known(self, name: str, created: Any) -> TransformJobState | None:
        state = self.jobs.get(name)
        return state if state is not None and abs(state.created - epoch(created)) < 1e-3 else None

    async def sync(self) -> None:
        """Start every job of the control plane not seen yet."""
        for summary in await asyncio.to_thread(self._list_all):
            if self.known(summary["TransformJobName"], summary["CreationTime"]) is None:
                description = await asyncio.to_thread(self.aws.sagemaker.describe_transform_job,
                                                      TransformJobName=summary["TransformJobName"])
                await self.ensure(description)

    async def ensure(self, description: dict) -> TransformJobState:
        """The state of the job `description` (boto3 or JSON shape) describes; started when new."""
        async with self.lock:
            name = description["TransformJobName"]
            state = self.known(name, description["CreationTime"])
            if state is not None:
                return state
            state = TransformJobState(name, description["TransformJobArn"], epoch(description["CreationTime"]))
            self.jobs[name] = state
            assert self.http is not None, "TransformJobs.start() was not called"
            runner = TransformJobRunner(state, description, self.aws, self.http,
                                        self.container_for(description.get("ModelName", "")))
            state.task = asyncio.create_task(runner.run())
            logger.info("transform job %s: running against %s", name, runner.container)
            return state

    def request_stop(self, state: TransformJobState) -> None:
        if state.status not in TERMINAL:
            state.stop_requested = True
            state.set_status("Stopping")
