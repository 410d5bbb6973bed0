"""`--via local`: a running `serve` (or any container of the SageMaker contract) at --url, for small
jobs and tests. Each object is read from S3 and posted to `/invocations`; connection errors, 429,
5xx and timeouts are retried (Retry-After honoured, else 1, 2, 4 ... s), a 4xx is the file's answer."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import PurePosixPath
from typing import Any

import httpx

from ...clients.formats import content_type_for
from ..listing import AudioObject, BulkError, Location
from ..manifest import PERMANENT, RETRYABLE
from . import Outcome, Report, error_message, guarded

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_LIMIT_MB = 6  # SageMaker's real-time body limit, when the server does not say its own


class LocalRunner:
    via = "local"

    def __init__(self, url: str, s3: Any, source: Location, *, concurrency: int = 4, retries: int = 2,
                 timeout_s: float = 3600.0, custom_attributes: str | None = None, max_backoff_s: float = 30.0):
        self.url, self.s3, self.source = url.rstrip("/"), s3, source
        self.concurrency, self.retries, self.timeout_s = max(1, concurrency), max(0, retries), timeout_s
        self.custom_attributes, self.max_backoff_s = custom_attributes, max_backoff_s
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), trust_env=False)
        self._limit: int | None = None

    def limit_bytes(self) -> int:
        """The server's own body limit (GET /execution-parameters: MaxPayloadInMB)."""
        if self._limit is None:
            try:
                reply = self.client.get(f"{self.url}/execution-parameters", timeout=10.0)
            except httpx.HTTPError as exc:
                raise BulkError(f"Could not reach the server at {self.url}: {exc}. Start it (`make serve`) or fix "
                                "--url.") from exc
            megabytes = DEFAULT_LIMIT_MB
            if reply.status_code == 200:
                try:
                    megabytes = int(reply.json().get("MaxPayloadInMB") or DEFAULT_LIMIT_MB)
                except (ValueError, AttributeError):
                    pass
            self._limit = megabytes * MIB
        return self._limit

    def start(self) -> None:
        self.limit_bytes()

    def finish(self) -> None:
        self.client.close()

    def details(self) -> dict:
        return {"url": self.url, "concurrency": self.concurrency}

    def run(self, objects: list[AudioObject], report: Report) -> None:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for future in as_completed([pool.submit(guarded, self.one, obj) for obj in objects]):
                report(future.result())

    def one(self, obj: AudioObject) -> Outcome:
        try:
            audio = self.s3.get_object(Bucket=self.source.bucket, Key=obj.key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            return Outcome(obj, error=f"could not read s3://{self.source.bucket}/{obj.key}: {exc}", error_kind=RETRYABLE,
                           attempts=0)
        headers = {"Content-Type": content_type_for_key(obj.key), "Accept": "application/json"}
        if self.custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = self.custom_attributes
        outcome = Outcome(obj, attempts=0)
        for attempt in range(1 + self.retries):
            outcome.attempts = attempt + 1
            wait = min(self.max_backoff_s, 2.0 ** attempt)
            try:
                reply = self.client.post(f"{self.url}/invocations", content=audio, headers=headers)
            except httpx.TimeoutException:
                outcome.error, outcome.error_kind = f"no answer within {self.timeout_s:.0f} s", RETRYABLE
            except httpx.HTTPError as exc:
                outcome.error, outcome.error_kind = f"could not reach {self.url}: {exc}", RETRYABLE
            else:
                if reply.status_code < 400:
                    outcome.body, outcome.error, outcome.error_kind = reply.content, None, None
                    return outcome
                message, kind = error_message(reply.content)
                outcome.error = f"{reply.status_code}: {message}"
                if reply.status_code in (429, 503) or reply.status_code >= 500:
                    outcome.error_kind = RETRYABLE
                    retry_after = reply.headers.get("retry-after", "")
                    wait = min(self.max_backoff_s, float(retry_after)) if retry_after.isdigit() else wait
                else:
                    outcome.error_kind = PERMANENT
                    return outcome
            if attempt < self.retries:
                logger.info("%s: %s; trying again in %.0f s", obj.key, outcome.error, wait)
                time.sleep(wait)
        return outcome


def content_type_for_key(key: str) -> str:
    return content_type_for(PurePosixPath(key))  # type: ignore[arg-type]
