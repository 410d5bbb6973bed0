"""One bulk run: plan (list, filter, resume, size limit, probe lengths), send through a runner, write
each transcript's formats as it comes back, keep the manifest and the summary, show progress in
audio hours."""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .listing import Filters, Location, list_audio, probe_all
from .manifest import (
    FAILED,
    JOBS_FOLDER,
    OK,
    PERMANENT,
    RETRYABLE,
    TOO_LARGE,
    Record,
    existing_keys,
    now,
    output_keys,
    read_manifest,
    write_manifest,
    write_summary,
)
from .outputs import Transcript, extensions, write_outputs
from .plan import CostModel, Plan, make_plan
from .runners import Outcome, Runner

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MANIFEST_EVERY_S = 30.0  # a long run rewrites its manifest this often, so an interruption loses little


@dataclass
class RunOptions:
    source: Location
    target: Location
    formats: list[str]
    filters: Filters = field(default_factory=Filters)
    max_payload_mb: int | None = None  # a cap below the runner's own limit
    retry_failed: bool = False
    progress: bool = True


class BulkRun:
    def __init__(self, options: RunOptions, runner: Runner, s3: Any, cost: CostModel | None = None):
        self.options, self.runner, self.s3, self.cost = options, runner, s3, cost
        self.extensions = extensions(options.formats)
        self.records: dict[str, Record] = {}
        self.lock = threading.Lock()
        self.counts = {OK: 0, FAILED: 0}
        self.audio_done = 0.0
        self.bar: tqdm | None = None
        self.bar_unit = 3600.0
        self._manifest_written = time.monotonic()

    # ------------------------------------------------------------------ plan

    def limit_bytes(self) -> int | None:
        limit = self.runner.limit_bytes()
        if self.options.max_payload_mb:
            cap = self.options.max_payload_mb * MIB
            limit = cap if limit is None else min(limit, cap)
        return limit

    def plan(self) -> Plan:
        source, target = self.options.source, self.options.target
        objects, left_out = list_audio(self.s3, source, self.options.filters)
        inside = [o for o in objects if o.key.startswith(target.prefix) and source.bucket == target.bucket]
        if inside:  # never transcribe our own outputs when the output prefix lies under the input prefix
            logger.info("leaving out %d objects under the output prefix %s", len(inside), target.uri())
            objects = [o for o in objects if o not in inside]
        existing = existing_keys(self.s3, target)
        self.records = read_manifest(self.s3, target)
        finished = {o.key: all(k in existing for k in output_keys(target, o.relative, self.extensions)) for o in objects}
        plan = make_plan(objects, finished, self.records, self.limit_bytes(), self.options.retry_failed)
        plan.filtered_out = left_out
        for obj in plan.done + plan.failed_before:
            record = self.records.get(obj.key)
            obj.seconds = record.duration if record is not None and record.duration else obj.seconds
        probe_all(self.s3, source.bucket, [o for o in plan.todo + plan.done + plan.too_large if o.seconds is None])
        return plan

    # ------------------------------------------------------------------ execute

    def execute(self, plan: Plan) -> dict:
        started, started_at = time.monotonic(), now()
        for obj in plan.done:
            if obj.key not in self.records or self.records[obj.key].status != OK:
                self.records[obj.key] = Record(obj.key, OK, duration=obj.seconds, via=self.runner.via,
                                               outputs=output_keys(self.options.target, obj.relative, self.extensions))
        for obj in plan.too_large:
            self.records[obj.key] = Record(
                obj.key, TOO_LARGE, duration=obj.seconds, error_kind=PERMANENT, via=self.runner.via, finished=now(),
                error=f"{obj.size} bytes, over the payload limit of {plan.limit_bytes} bytes "
                      f"({(plan.limit_bytes or 0) / MIB:.0f} MiB) of --via {self.runner.via}: not sent")
        # the bar counts audio (hours, or minutes for less than an hour); its ETA is tqdm's, from the rate so far
        self.bar_unit = 3600.0 if plan.todo_seconds >= 3600 else 60.0
        unit = "h" if self.bar_unit == 3600.0 else "min"
        self.bar = tqdm(total=plan.todo_seconds / self.bar_unit, disable=not self.options.progress,
                        file=sys.stderr, desc=f"via {self.runner.via}",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} audio " + unit +
                                   " [{elapsed}<{remaining}]{postfix}")
        interrupted = False
        try:
            if plan.todo:
                self.runner.start()
                try:
                    self.runner.run(plan.todo, self.report)
                finally:
                    self.runner.finish()
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            self.bar.close()
            with self.lock:
                write_manifest(self.s3, self.options.target, self.records)
            summary = self.summary(plan, time.monotonic() - started, started_at, interrupted)
            write_summary(self.s3, self.options.target, summary)
        return summary

    def report(self, outcome: Outcome) -> None:
        """One input's outcome: its outputs written, its manifest line, the progress bar (any thread)."""
        obj = outcome.obj
        record = Record(obj.key, FAILED, duration=obj.seconds, attempts=outcome.attempts, via=self.runner.via)
        if outcome.ok:
            try:
                transcript = Transcript.parse(outcome.body or b"")
                record.outputs = write_outputs(self.s3, self.options.target, obj.relative, transcript, self.options.formats)
                record.status, record.language = OK, transcript.language
                record.duration = transcript.duration if transcript.duration is not None else obj.seconds
            except Exception as exc:  # noqa: BLE001 - one file's bad answer must not stop the run
                record.error, record.error_kind = f"could not write the outputs: {exc}", RETRYABLE
        else:
            record.error, record.error_kind = outcome.error, outcome.error_kind
        record.finished = now()
        with self.lock:
            self.records[obj.key] = record
            self.counts[record.status] += 1
            if record.status == OK:
                self.audio_done += record.duration or 0.0
            if self.bar is not None:
                self.bar.update((obj.seconds or 0.0) / self.bar_unit)
                self.bar.set_postfix(ok=self.counts[OK], failed=self.counts[FAILED], refresh=False)
            if time.monotonic() - self._manifest_written > MANIFEST_EVERY_S:
                write_manifest(self.s3, self.options.target, self.records)
                self._manifest_written = time.monotonic()
        if record.status != OK:
            logger.warning("%s: %s", obj.key, record.error)

    def summary(self, plan: Plan, wall_s: float, started_at: str, interrupted: bool) -> dict:
        failed = [r for r in self.records.values() if r.status in (FAILED, TOO_LARGE)]
        return {
            "via": self.runner.via,
            "input": self.options.source.uri(),
            "output": self.options.target.uri(),
            "started": started_at,
            "finished": now(),
            "interrupted": interrupted,
            "files": {"transcribed": self.counts[OK], "failed": self.counts[FAILED], "too_large": len(plan.too_large),
                      "already_done": len(plan.done), "refused_before": len(plan.failed_before),
                      "left_out_by_filters": plan.filtered_out},
            "audio_seconds": round(self.audio_done, 2),
            "wall_seconds": round(wall_s, 2),
            "rtfx": round(self.audio_done / wall_s, 2) if wall_s > 0 and self.audio_done else None,
            "not_transcribed": [{"key": r.key, "status": r.status, "error": r.error}
                                for r in sorted(failed, key=lambda r: r.key)],
            "runner": self.runner.details(),
            "manifest": self.options.target.uri(self.options.target.key("manifest.jsonl")),
            "jobs_folder": self.options.target.uri(self.options.target.key(JOBS_FOLDER + "/")),
        }

    @staticmethod
    def all_done(summary: dict) -> bool:
        return not summary["not_transcribed"] and not summary["interrupted"]

