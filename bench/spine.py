"""Spine benchmark: direct (in-process) time vs HTTP end-to-end time on the same audio, and HTTP
throughput at several concurrencies. Prints a table and writes JSON. Not a test: no assertions.

Three paths per round: the engine alone (one window, no timestamps: the least work), the pipeline
that /invocations runs (VAD, windows, timestamps) in-process, and HTTP /invocations through Triton;
the serving overhead is HTTP minus the in-process pipeline."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from _path import ROOT  # the repository root, made importable
from testkit.serve_process import start_serve, stop_serve

from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio
from whisper_triton.engines import load_engine
from whisper_triton.pipeline.longform import LongFormTranscriber
from whisper_triton.settings import load_settings
from testkit.synthetic_speech import speak
from whisper_triton.pipeline.tokenizer import WhisperTokenizer
from whisper_triton.pipeline.windows import EngineWindowDecoder, ShortFormTranscriber, ShortRequest

logger = logging.getLogger("whisper_triton.bench")
DEFAULT_TEXT = ("Please send me the report before the meeting on Monday morning. "
                "We need to buy milk, bread and eggs from the store.")


@dataclass
class Report:
    audio_seconds: float
    rounds: int
    engine_ms: dict = field(default_factory=dict)
    direct_ms: dict = field(default_factory=dict)
    http_ms: dict = field(default_factory=dict)
    overhead_ms_median: float = 0.0
    throughput: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "min": ordered[0],
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def post(client: httpx.Client, url: str, body: bytes) -> float:
    started = time.perf_counter()
    reply = client.post(url + "/invocations", content=body, headers={"Content-Type": "audio/wav"})
    reply.raise_for_status()
    return time.perf_counter() - started


def throughput(url: str, body: bytes, concurrency: int, requests: int, audio_seconds: float) -> dict:
    def worker(count: int) -> list[float]:
        with httpx.Client(timeout=120) as client:
            return [post(client, url, body) for _ in range(count)]

    shares = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = [lat for part in pool.map(worker, shares) for lat in part]
    elapsed = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "audio_s_per_s": requests * audio_seconds / elapsed,
            "latency_ms": {k: v * 1000 for k, v in summary(latencies).items()}}


def run(args: argparse.Namespace) -> Report:
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    body = Path(args.audio).read_bytes() if args.audio else speak(DEFAULT_TEXT, folder / "bench.wav").read_bytes()
    audio = decode_audio(body)
    audio_seconds = audio.size / SAMPLE_RATE
    settings = load_settings()
    model_dir = settings.resolved_model_dir()
    engine = load_engine("ctranslate2", str(model_dir), compute_type=settings.compute_type,
                         cpu_threads=settings.cpu_thread_count())
    tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
    transcriber = ShortFormTranscriber(engine, tokenizer)
    # the pipeline /invocations runs (VAD, windows, timestamps), here in-process on the same engine
    pipeline = LongFormTranscriber(EngineWindowDecoder(engine, tokenizer), tokenizer)
    process, url = (None, args.url) if args.url else start_serve(folder / "serve.log")
    report = Report(audio_seconds=audio_seconds, rounds=args.rounds)
    try:
        bare, direct, http = [], [], []
        with httpx.Client(timeout=120) as client:
            post(client, url, body)  # warm-up every path once
            transcriber.transcribe([ShortRequest(audio)])
            pipeline.transcribe(audio)
            for _ in range(args.rounds):  # paired, interleaved rounds: machine noise hits all alike
                started = time.perf_counter()
                transcriber.transcribe([ShortRequest(audio)])
                bare.append(time.perf_counter() - started)
                started = time.perf_counter()
                pipeline.transcribe(audio)
                direct.append(time.perf_counter() - started)
                http.append(post(client, url, body))
        report.engine_ms = {k: v * 1000 for k, v in summary(bare).items()}
        report.direct_ms = {k: v * 1000 for k, v in summary(direct).items()}
        report.http_ms = {k: v * 1000 for k, v in summary(http).items()}
        report.overhead_ms_median = statistics.median(h - d for h, d in zip(http, direct)) * 1000
        del transcriber, pipeline, engine  # free the cores' worth of threads before the load test
        for concurrency in args.concurrency:
            report.throughput.append(throughput(url, body, concurrency, args.requests, audio_seconds))
    finally:
        if process is not None:
            stop_serve(process)
    report.machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "engine": "ctranslate2", "compute_type": settings.compute_type, "model_dir": str(model_dir)}
    return report


def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    latency = Table(title=f"Latency on one {report.audio_seconds:.1f} s clip ({report.rounds} paired rounds, ms)")
    for column in ("path", "median", "min", "p90"):
        latency.add_column(column, justify="right" if column != "path" else "left")
    for name, stats in (("engine alone: one window, no timestamps (in-process)", report.engine_ms),
                        ("same pipeline as /invocations, in-process", report.direct_ms),
                        ("HTTP /invocations end to end", report.http_ms)):
        latency.add_row(name, *(f"{stats[k]:.1f}" for k in ("median", "min", "p90")))
    latency.add_row("serving overhead: HTTP - in-process pipeline (paired median)",
                    f"{report.overhead_ms_median:.1f}", "", "")
    console.print(latency)
    load = Table(title="HTTP throughput")
    for column in ("concurrency", "requests", "req/s", "audio s / s", "p50 ms", "p90 ms"):
        load.add_column(column, justify="right")
    for row in report.throughput:
        load.add_row(str(row["concurrency"]), str(row["requests"]), f"{row['requests_per_s']:.2f}",
                     f"{row['audio_s_per_s']:.1f}", f"{row['latency_ms']['median']:.0f}",
                     f"{row['latency_ms']['p90']:.0f}")
    console.print(load)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--audio", help="audio file to use (default: espeak-ng speech, ~8 s)")
    parser.add_argument("--url", help="an already running serve (default: start one on free ports)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=32, help="requests per throughput level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "spine.json"))
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(report), indent=2) + "\n")
    logger.warning("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
