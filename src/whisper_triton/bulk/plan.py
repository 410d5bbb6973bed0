"""Planning: which inputs this run sends (resume, size limit), how many audio hours that is, and what
it should take and cost at a throughput (RTFx) and an instance price.

wall time = audio seconds / (RTFx x instances) + the start-up of the instances (billed too);
cost = instances x price per hour x wall hours. RTFx comes from `--rtfx`, or from a benchmark's JSON
(`bench/gpu.py`: the best level's `rtfx`; a previous run's `summary.json`: its `rtfx`), else the
estimate below for GPU instance types, clearly labelled as one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .listing import AudioObject, BulkError
from .manifest import Record

MIB = 1024 * 1024
# SageMaker on-demand prices, USD per instance hour, us-east-1 (secondary sources, 2025: ml.g5.xlarge
# $1.41, ml.m5.xlarge $0.269, of which ml.m5.large is half); check your region, and pass
# --price-per-hour for any other instance type
PRICES = {"ml.g5.xlarge": 1.408, "ml.m5.large": 0.1345}
# Not measured: TensorRT-LLM large-v3 on one A10G, scaled from the published A100 figure (RTFx 245,
# open_asr_leaderboard PR #42) by the memory bandwidth ratio (600 / 2,039 GB/s) of a decoder-bound model
GPU_RTFX_ESTIMATE = 70.0
# published prices per audio hour of hosted APIs (shared/notes/field.md, 2026-12-02)
HOSTED_PER_AUDIO_HOUR = (
    ("OpenAI whisper-1 / gpt-4o-transcribe", 0.36),
    ("OpenAI gpt-4o-mini-transcribe", 0.18),
    ("Groq whisper-large-v3", 0.111),
    ("Groq whisper-large-v3-turbo", 0.04),
)


@dataclass
class Plan:
    todo: list[AudioObject] = field(default_factory=list)
    done: list[AudioObject] = field(default_factory=list)  # all outputs already there
    failed_before: list[AudioObject] = field(default_factory=list)  # refused before; not sent again
    too_large: list[AudioObject] = field(default_factory=list)
    filtered_out: int = 0
    limit_bytes: int | None = None

    @staticmethod
    def seconds(objects: list[AudioObject]) -> float:
        return sum(o.seconds or 0.0 for o in objects)

    @property
    def todo_seconds(self) -> float:
        return self.seconds(self.todo)


def make_plan(objects: list[AudioObject], finished: dict[str, bool], previous: dict[str, Record],
              limit_bytes: int | None, retry_failed: bool) -> Plan:
    """`finished[key]`: every output of the input exists."""
    plan = Plan(limit_bytes=limit_bytes)
    for obj in objects:
        record = previous.get(obj.key)
        if finished.get(obj.key):
            plan.done.append(obj)
        elif limit_bytes is not None and obj.size > limit_bytes:
            plan.too_large.append(obj)
        elif record is not None and record.permanent_failure and not retry_failed:
            plan.failed_before.append(obj)
        else:
            plan.todo.append(obj)
    return plan


@dataclass
class CostModel:
    instances: int = 1
    instance_type: str | None = None
    price_per_hour: float | None = None
    price_source: str = ""
    rtfx: float | None = None
    rtfx_source: str = ""
    startup_s: float = 0.0

    def wall_seconds(self, audio_seconds: float) -> float | None:
        if not self.rtfx or self.rtfx <= 0:
            return None
        return audio_seconds / (self.rtfx * max(1, self.instances)) + self.startup_s

    def cost(self, audio_seconds: float) -> float | None:
        wall = self.wall_seconds(audio_seconds)
        if wall is None or self.price_per_hour is None:
            return None
        return max(1, self.instances) * self.price_per_hour * wall / 3600


def rtfx_from_json(path: Path) -> float:
    """The throughput a benchmark measured: bench/gpu.py's best level, or a bulk run's summary."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BulkError(f"Could not read the benchmark JSON {path}: {exc}.") from exc
    levels = [level.get("rtfx") for level in data.get("levels", []) if isinstance(level, dict)]
    values = [float(v) for v in levels + [data.get("rtfx")] if isinstance(v, (int, float)) and v > 0]
    if not values:
        raise BulkError(f"{path} holds no RTFx (expected bench/gpu.py output with levels[].rtfx, or a "
                        "whisper-transcribe-bucket summary.json).")
    return max(values)


def cost_model(instance_type: str | None, instances: int, price: float | None, rtfx: float | None,
               bench_json: Path | None, startup_s: float) -> CostModel:
    model = CostModel(instances=instances, instance_type=instance_type, startup_s=startup_s)
    if price is not None:
        model.price_per_hour, model.price_source = price, "--price-per-hour"
    elif instance_type in PRICES:
        model.price_per_hour, model.price_source = PRICES[instance_type], "published on-demand price, us-east-1"
    if rtfx is not None:
        model.rtfx, model.rtfx_source = rtfx, "--rtfx"
    elif bench_json is not None:
        model.rtfx, model.rtfx_source = rtfx_from_json(bench_json), str(bench_json)
    elif instance_type and instance_type.startswith(("ml.g", "ml.p")):
        model.rtfx, model.rtfx_source = GPU_RTFX_ESTIMATE, "ESTIMATE (not measured): large-v3 on one A10G"
    return model


def hours(seconds: float) -> str:
    """Audio amounts: minutes below an hour, else hours."""
    return f"{seconds / 60:,.1f} min" if seconds < 3600 else f"{seconds / 3600:,.2f} h"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (pass --rtfx or --bench-json)"
    if seconds < 90:
        return f"{seconds:,.0f} s"
    minutes = seconds / 60
    return f"{minutes:,.1f} min" if minutes < 120 else f"{minutes / 60:,.1f} h"


def describe(plan: Plan, model: CostModel, via: str) -> str:
    """The dry-run report: the work, and what it should take and cost."""
    audio = plan.todo_seconds
    exact = all(o.exact for o in plan.todo)
    lines = [
        f"to transcribe: {len(plan.todo)} files, {hours(audio)} of audio" + ("" if exact else " (partly estimated from sizes)"),
        f"already done:  {len(plan.done)} files ({hours(Plan.seconds(plan.done))})",
        f"refused before (not sent again; --retry-failed sends them): {len(plan.failed_before)}",
        f"over the payload limit ({(plan.limit_bytes or 0) / MIB:.0f} MiB), not sent: {len(plan.too_large)}"
        + "".join(f"\n  {o.key} ({o.size / MIB:.1f} MiB)" for o in plan.too_large),
        f"left out by the filters: {plan.filtered_out}",
        f"via {via}: {model.instances} x {model.instance_type or 'the given server'}",
        f"throughput: RTFx {model.rtfx:g} ({model.rtfx_source})" if model.rtfx
        else "throughput: unknown (pass --rtfx or --bench-json)",
        f"wall time: {duration_text(model.wall_seconds(audio))}"
        + (f" (including {model.startup_s / 60:.0f} min start-up)" if model.startup_s and model.rtfx else ""),
    ]
    cost = model.cost(audio)
    if cost is not None:
        lines.append(f"cost: ${cost:,.2f} at ${model.price_per_hour:g}/instance-hour ({model.price_source})")
    else:
        lines.append("cost: unknown (pass --price-per-hour" + ("" if model.rtfx else " and --rtfx") + ")")
    lines.append("hosted APIs for the same audio, at their published prices:")
    lines.extend(f"  {name}: ${price * audio / 3600:,.2f}" for name, price in HOSTED_PER_AUDIO_HOUR)
    return "\n".join(lines)
