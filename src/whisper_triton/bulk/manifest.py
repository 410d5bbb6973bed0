"""The run's record in the output prefix: `manifest.jsonl` (one JSON line per input: key, duration,
language, status, error, ...) and `summary.json`, and what a resumed run may skip.

Resume: an input whose outputs (every requested format) are all in the output prefix is done; one
the previous manifest records as failed for a reason another try cannot change (the container
refused the file: 4xx, or it is over the payload limit) is not sent again unless `--retry-failed`;
every other input is sent. Outputs are written before the manifest, so a run cut short loses at most
the manifest lines of its last files, never their transcripts (the next run finds the outputs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .listing import Location

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
JOBS_FOLDER = "_jobs"  # transform job manifests and raw .out files, under the output prefix
OK, FAILED, TOO_LARGE = "ok", "failed", "too_large"
PERMANENT = "client"  # error_kind of a failure another try cannot change
RETRYABLE = "server"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Record:
    key: str
    status: str  # ok | failed | too_large
    duration: float | None = None  # audio seconds (the transcript's, else the probe's)
    language: str | None = None
    error: str | None = None
    error_kind: str | None = None  # client | server
    attempts: int = 0
    via: str | None = None
    outputs: list[str] = field(default_factory=list)
    finished: str | None = None

    @property
    def permanent_failure(self) -> bool:
        return self.status == TOO_LARGE or (self.status == FAILED and self.error_kind == PERMANENT)

    def line(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, [])}, ensure_ascii=False)

    @classmethod
    def parse(cls, line: str) -> "Record | None":
        try:
            data = json.loads(line)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return None


def output_keys(target: Location, relative: str, extensions: list[str]) -> list[str]:
    return [target.key(f"{relative}{ext}") for ext in extensions]


def existing_keys(s3: Any, target: Location) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=target.prefix):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


def read_manifest(s3: Any, target: Location) -> dict[str, Record]:
    """The previous run's records by input key ({} when there is none)."""
    try:
        body = s3.get_object(Bucket=target.bucket, Key=target.key(MANIFEST))["Body"].read().decode("utf-8")
    except Exception as exc:  # noqa: BLE001
        if "NoSuchKey" not in str(exc) and "Not Found" not in str(exc) and "404" not in str(exc):
            logger.warning("could not read the previous manifest: %s", exc)
        return {}
    records = (Record.parse(line) for line in body.splitlines() if line.strip())
    return {r.key: r for r in records if r is not None}


def write_manifest(s3: Any, target: Location, records: dict[str, Record]) -> None:
    body = "".join(records[k].line() + "\n" for k in sorted(records))
    s3.put_object(Bucket=target.bucket, Key=target.key(MANIFEST), Body=body.encode("utf-8"),
                  ContentType="application/x-ndjson")


def write_summary(s3: Any, target: Location, summary: dict) -> None:
    s3.put_object(Bucket=target.bucket, Key=target.key(SUMMARY), Body=(json.dumps(summary, indent=2) + "\n").encode(),
                  ContentType="application/json")
