"""`whisper-transcribe-bucket`: a bucket of audio to a bucket of transcripts.

  whisper-transcribe-bucket s3://calls/2026/ s3://transcripts/2026/ --via transform \\
      --model-name whisper-large-v3 --instance-type ml.g5.xlarge --instances 4
  whisper-transcribe-bucket s3://calls/2026/ s3://transcripts/2026/ --via async --endpoint whisper-async --instances 4
  whisper-transcribe-bucket s3://calls/2026/ s3://transcripts/2026/ --via local --url http://127.0.0.1:8080
  whisper-transcribe-bucket s3://calls/2026/ s3://transcripts/2026/ --via transform ... --dry-run --rtfx 70

For each audio object `<input>/<path>` it writes `<output>/<path>.json`, `.txt`, `.srt` and `.vtt`
(--formats), then `<output>/manifest.jsonl` (one line per input: key, duration, language, status,
error) and `<output>/summary.json`. Run it again to resume: inputs with every output in place are
skipped, and so are inputs the container refused (4xx) or that are over the payload limit, unless
--retry-failed. S3 and SageMaker are reached through boto3's own configuration (AWS_PROFILE,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_SAGEMAKER, ...), so it runs against a local
moto + runtime emulator unchanged. Exit status: 0 every input transcribed, 1 some were not (see the
summary), 2 the run could not start.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ..clients.realtime import runtime_client
from ..deploy import AwsClients, ModelOptions
from .listing import DEFAULT_SUFFIXES, BulkError, Filters, Location
from .outputs import DEFAULT_FORMATS, check_formats
from .plan import cost_model, describe, hours
from .run import BulkRun, RunOptions
from .runners.asynchronous import AsyncRunner
from .runners.local import LocalRunner
from .runners.transform import TransformRunner, TransformSettings

logger = logging.getLogger("whisper_triton.bulk")

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?i?b?)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def size_bytes(text: str) -> int:
    """'1500', '64k', '5MB', '1.5GiB' -> bytes (binary units)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 500k, 25MB or 2GiB, got {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisper-transcribe-bucket", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="s3://BUCKET/PREFIX of the audio")
    parser.add_argument("output", help="s3://BUCKET/PREFIX for the transcripts")
    parser.add_argument("--via", choices=["transform", "async", "local"], required=True)
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated: json,text,srt,vtt")
    parser.add_argument("--language", default=None, help="the audio's language (default: detected per file)")
    parser.add_argument("--task", choices=["transcribe", "translate"], default=None)
    parser.add_argument("--dry-run", action="store_true", help="list the work and estimate time and cost; change nothing")
    parser.add_argument("--retries", type=int, default=2, help="further tries of a file that failed for a passing reason")
    parser.add_argument("--retry-failed", action="store_true", help="send again the files the container refused before")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")

    filters = parser.add_argument_group("filters")
    filters.add_argument("--suffix", action="append", default=None, metavar=".EXT",
                         help=f"only keys ending so (repeatable; default: {' '.join(DEFAULT_SUFFIXES)}; '*': any)")
    filters.add_argument("--min-size", type=size_bytes, default=1, help="skip smaller objects (e.g. 10k)")
    filters.add_argument("--max-size", type=size_bytes, default=None, help="skip larger objects (e.g. 2GB)")
    filters.add_argument("--max-payload-mb", type=int, default=None,
                         help="the largest file sent, in MiB (transform: MaxPayloadInMB, default 100 / concurrent "
                              "transforms; async: 1024; local: what the server's /execution-parameters says)")

    cost = parser.add_argument_group("planning and cost (--dry-run)")
    cost.add_argument("--rtfx", type=float, default=None, help="throughput per instance: audio seconds per second")
    cost.add_argument("--bench-json", type=Path, default=None,
                      help="take the RTFx from bench/gpu.py's JSON (or a previous run's summary.json)")
    cost.add_argument("--price-per-hour", type=float, default=None, help="USD per instance hour")
    cost.add_argument("--startup-min", type=float, default=None,
                      help="billed start-up of the instances (default: 8 for transform and async, 0 for local)")

    local = parser.add_argument_group("--via local")
    local.add_argument("--url", default="http://127.0.0.1:8080", help="a running serve")
    local.add_argument("--concurrency", type=int, default=4,
                       help="files in flight (the server batches the windows of concurrent files)")
    local.add_argument("--request-timeout", type=float, default=3600.0)

    asynchronous = parser.add_argument_group("--via async")
    asynchronous.add_argument("--endpoint", default=None, help="an async endpoint (whisper-deploy deploy --async)")
    asynchronous.add_argument("--in-flight", type=int, default=16, help="requests queued at the endpoint at once")
    asynchronous.add_argument("--poll-initial", type=float, default=1.0)
    asynchronous.add_argument("--poll-max", type=float, default=20.0)
    asynchronous.add_argument("--file-timeout", type=float, default=3600.0, help="seconds per file, queue included")

    transform = parser.add_argument_group("--via transform")
    transform.add_argument("--model-name", default=None, help="an existing SageMaker model")
    transform.add_argument("--image", default="", help="or create one: the image URI")
    transform.add_argument("--model-data", default="", help="... its model data (s3://...)")
    transform.add_argument("--role", default="", help="... and its execution role ARN")
    transform.add_argument("--instance-type", default="ml.g5.xlarge")
    transform.add_argument("--instances", type=int, default=None,
                           help="transform: InstanceCount (default 1); async: minimum capacity during the run")
    transform.add_argument("--max-concurrent-transforms", type=int, default=1)
    transform.add_argument("--invocation-timeout", type=int, default=3600, help="seconds per file (at most 3600)")
    transform.add_argument("--job-name", default="whisper-bulk")
    transform.add_argument("--poll-interval", type=float, default=15.0, help="seconds between job status checks")
    transform.add_argument("--job-timeout", type=float, default=24 * 3600.0)
    return parser


def custom_attributes(args: argparse.Namespace) -> str | None:
    pairs = [f"{k}={v}" for k, v in (("language", args.language), ("task", args.task)) if v]
    return ",".join(pairs) or None


def make_runner(args: argparse.Namespace, aws: AwsClients, source: Location, target: Location):
    if args.via == "local":
        return LocalRunner(args.url, aws.s3, source, concurrency=args.concurrency, retries=args.retries,
                           timeout_s=args.request_timeout, custom_attributes=custom_attributes(args))
    if args.via == "async":
        if not args.endpoint:
            raise BulkError("--via async needs --endpoint NAME (an endpoint deployed with `whisper-deploy deploy --async`).")
        return AsyncRunner(aws, runtime_client(max_attempts=5, retry_mode="standard"), args.endpoint, source,
                           instances=args.instances, in_flight=args.in_flight, retries=args.retries,
                           timeout_s=args.file_timeout, poll_initial_s=args.poll_initial, poll_max_s=args.poll_max,
                           custom_attributes=custom_attributes(args))
    if custom_attributes(args):
        raise BulkError("--via transform sends no per-request options (batch transform has no custom attributes): "
                        "drop --language/--task, or use --via async.")
    payload = args.max_payload_mb or 100 // max(1, args.max_concurrent_transforms)
    model = None
    if not args.model_name and (args.image or args.model_data or args.role):
        model = ModelOptions(args.image, args.model_data, args.role)
    settings = TransformSettings(
        instance_type=args.instance_type, instance_count=args.instances or 1, max_payload_mb=payload,
        max_concurrent_transforms=args.max_concurrent_transforms, invocation_timeout_s=args.invocation_timeout,
        model_name=args.model_name, model=model, job_name=args.job_name, poll_s=args.poll_interval,
        timeout_s=args.job_timeout)
    return TransformRunner(aws, source, target, settings, retries=args.retries)


def run(args: argparse.Namespace) -> int:
    source, target = Location.parse(args.input, "input"), Location.parse(args.output, "output")
    if source == target:
        raise BulkError("The output prefix is the input prefix: pass another output, e.g. s3://BUCKET/transcripts/.")
    suffixes = () if args.suffix and "*" in args.suffix else tuple(args.suffix or DEFAULT_SUFFIXES)
    options = RunOptions(source, target, check_formats(args.formats.split(",")),
                         Filters(suffixes, args.min_size, args.max_size), args.max_payload_mb, args.retry_failed,
                         progress=not args.no_progress)
    aws = AwsClients(max_attempts=5)
    runner = make_runner(args, aws, source, target)
    instances = 1 if args.via == "local" else (args.instances or 1)
    startup_min = args.startup_min if args.startup_min is not None else (0.0 if args.via == "local" else 8.0)
    model = cost_model(None if args.via == "local" else args.instance_type, instances, args.price_per_hour,
                       args.rtfx, args.bench_json, startup_min * 60)
    bulk = BulkRun(options, runner, aws.s3, model)
    plan = bulk.plan()
    if args.dry_run:
        print(describe(plan, model, args.via))
        if args.json:
            print(json.dumps({"todo": [o.key for o in plan.todo], "done": [o.key for o in plan.done],
                              "too_large": [o.key for o in plan.too_large],
                              "refused_before": [o.key for o in plan.failed_before],
                              "audio_seconds": round(plan.todo_seconds, 2),
                              "wall_seconds": model.wall_seconds(plan.todo_seconds),
                              "cost_usd": model.cost(plan.todo_seconds)}, indent=2))
        return 0
    summary = bulk.execute(plan)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        files = summary["files"]
        print(f"transcribed {files['transcribed']} files ({hours(summary['audio_seconds'])} of audio) in "
              f"{summary['wall_seconds']:.0f} s; failed {files['failed']}, over the size limit {files['too_large']}, "
              f"already done {files['already_done']}, refused before {files['refused_before']}")
        for item in summary["not_transcribed"]:
            print(f"  not transcribed: {item['key']}: {item['error']}")
        print(f"manifest: {summary['manifest']}")
    return 0 if BulkRun.all_done(summary) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # a real command line; callers passing argv (tests, wrappers) keep their logging
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s")
        for noisy in ("botocore", "urllib3", "boto3", "httpx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return run(args)
    except BulkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
