"""Load and soak: N requests at concurrency C against a fresh `serve` (started here, or --url),
a mix of short speech, long speech (several windows) and bad inputs, each with its expected answer.

Reports failures (an unexpected status, a wrong transcript, a timeout or a reset), latency
percentiles per kind, and the memory (RSS) of serve's whole process tree (proxy, tritonserver,
Python-backend stubs) sampled over time: a table on stdout, JSON under bench/results/, and a PNG.
Not a test (tests/test_soak.py runs a short version and asserts on it)."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable
from testkit.serve_process import start_serve, stop_serve, tree_rss_mb

from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences
from whisper_triton.pipeline.evaluation import word_error_rate

logger = logging.getLogger("whisper_triton.bench.soak")
MAX_WER = 0.25  # tiny.en on espeak-ng speech is far below this; above it a transcript is wrong


@dataclass
class Job:
    kind: str  # short | long | bad-<what>
    body: bytes
    headers: dict
    expect_status: int
    reference: str | None = None  # the transcript a 200 must match
    expect_param: str | None = None


@dataclass
class Outcome:
    kind: str
    status: int | None
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Report:
    requests: int
    concurrency: int
    failures: int
    refused_busy: int
    wall_s: float
    latency_s: dict = field(default_factory=dict)  # kind -> {p50, p90, p99, max}
    rss_mb: list = field(default_factory=list)  # [(t, MB)]
    rss_growth_pct: float = 0.0
    failure_details: list = field(default_factory=list)


# ---- the workload --------------------------------------------------------------------------------------
def encode(samples: np.ndarray, container: str, codec: str, rate: int = 16000) -> bytes:
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.format, layout="mono", rate=rate)
        for resampled in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(resampled):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def workload(folder: Path, long_sentences: int) -> dict[str, list[Job]]:
    clips = spoken_sentences(folder)
    wav = {"Content-Type": "audio/wav"}
    short = [Job("short", encode(c, "wav", "pcm_s16le"), wav, 200, text) for c, text in zip(clips, SENTENCES)]
    samples, text, _ = long_recording(clips, list(SENTENCES), repeats=long_sentences)
    long = [Job("long", encode(samples, "flac", "flac"), {"Content-Type": "audio/flac"}, 200, text)]
    junk = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    nan = clips[0].copy()
    nan[4000::8000] = np.nan
    b64 = base64.b64encode(short[1].body).decode()
    bad = [
        Job("bad-mp3+junk", encode(clips[2], "mp3", "libmp3lame", 22050) + junk, {"Content-Type": "audio/mpeg"},
            200, SENTENCES[2]),
        Job("bad-not-audio", b"this is not audio " * 100, wav, 400, expect_param="audio"),
        Job("bad-nan-wav", encode(nan, "wav", "pcm_f32le"), wav, 400, expect_param="audio"),
        Job("bad-deep-json", ('{"audio": "%s", "x": %s}' % (b64, "[" * 5000 + "]" * 5000)).encode(),
            {"Content-Type": "application/json"}, 400, expect_param="body"),
        Job("bad-huge-prompt", json.dumps({"audio": b64, "initial_prompt": "w " * 300_000}).encode(),
            {"Content-Type": "application/json"}, 400, expect_param="initial_prompt"),
        Job("bad-truncated", short[3].body[:60], wav, 400, expect_param="audio"),
    ]
    return {"short": short, "long": long, "bad": bad}


def schedule(jobs: dict[str, list[Job]], n: int, long_fraction: float, bad_fraction: float, seed: int) -> list[Job]:
    rng = random.Random(seed)
    chosen = []
    for _ in range(n):
        draw = rng.random()
        group = "long" if draw < long_fraction else "bad" if draw < long_fraction + bad_fraction else "short"
        chosen.append(rng.choice(jobs[group]))
    return chosen


# ---- serve and its memory ----------------------------------------------------------------------------------
class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((round(time.monotonic() - self.t0, 2), round(tree_rss_mb(self.pid), 1)))
            self.stop.wait(self.every_s)


# ---- the run ----------------------------------------------------------------------------------------------------
def send(url: str, job: Job, timeout_s: float) -> Outcome:
    import httpx

    started = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            reply = client.post("/invocations", content=job.body, headers=job.headers)
    except Exception as exc:  # noqa: BLE001 - a timeout or a reset is a failure, counted, not raised
        return Outcome(job.kind, None, time.monotonic() - started, False, f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    if reply.status_code == 503 and reply.headers.get("retry-after"):
        return Outcome(job.kind, 503, seconds, True, "busy")
    if reply.status_code != job.expect_status:
        return Outcome(job.kind, reply.status_code, seconds, False, reply.text[:300])
    try:
        payload = reply.json()
    except ValueError:
        return Outcome(job.kind, reply.status_code, seconds, False, "not JSON: " + reply.text[:200])
    if job.expect_status == 200:
        wer = word_error_rate(job.reference, payload.get("text", ""))
        return Outcome(job.kind, 200, seconds, wer <= MAX_WER, "" if wer <= MAX_WER else f"WER {wer:.2f}")
    param = (payload.get("error") or {}).get("param")
    return Outcome(job.kind, reply.status_code, seconds, param == job.expect_param, f"param {param}")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(values), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}


def growth_pct(samples: list[tuple[float, float]]) -> float:
    """Mean RSS of the last tenth of the run over that of the first tenth after warm-up."""
    values = [mb for _, mb in samples if mb > 0]
    if len(values) < 10:
        return 0.0
    tenth = max(1, len(values) // 10)
    first, last = statistics.mean(values[tenth : 2 * tenth]), statistics.mean(values[-tenth:])
    return round(100 * (last - first) / first, 2)


def run(requests: int, concurrency: int, url: str, pid: int, long_fraction: float = 0.1, bad_fraction: float = 0.2,
        long_sentences: int = 10, timeout_s: float = 600, seed: int = 13) -> Report:
    with tempfile.TemporaryDirectory() as folder:
        jobs = schedule(workload(Path(folder), long_sentences), requests, long_fraction, bad_fraction, seed)
    sampler = MemorySampler(pid)
    sampler.start()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda job: send(url, job, timeout_s), jobs))
    wall = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    by_kind: dict[str, list[float]] = {}
    for outcome in outcomes:
        if outcome.ok and outcome.detail != "busy":
            by_kind.setdefault(outcome.kind.split("-")[0], []).append(outcome.seconds)
    failures = [o for o in outcomes if not o.ok]
    return Report(requests=requests, concurrency=concurrency, failures=len(failures),
                  refused_busy=sum(o.detail == "busy" for o in outcomes), wall_s=round(wall, 1),
                  latency_s={kind: percentiles(v) for kind, v in sorted(by_kind.items())},
                  rss_mb=sampler.samples, rss_growth_pct=growth_pct(sampler.samples),
                  failure_details=[asdict(o) for o in failures[:20]])


def print_table(report: Report) -> None:
    print(f"{report.requests} requests at concurrency {report.concurrency} in {report.wall_s} s: "
          f"{report.failures} failures, {report.refused_busy} refused busy")
    print(f"{'kind':8s} {'n':>5s} {'p50 s':>8s} {'p90 s':>8s} {'p99 s':>8s} {'max s':>8s}")
    for kind, p in report.latency_s.items():
        print(f"{kind:8s} {p['n']:5d} {p['p50']:8.3f} {p['p90']:8.3f} {p['p99']:8.3f} {p['max']:8.3f}")
    values = [mb for _, mb in report.rss_mb if mb > 0]
    if values:
        print(f"RSS of serve's process tree: start {values[0]:.0f} MB, max {max(values):.0f} MB, "
              f"end {values[-1]:.0f} MB; growth (last tenth vs first tenth after warm-up) {report.rss_growth_pct} %")
    for failure in report.failure_details[:5]:
        print("failure:", failure)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot([t for t, _ in report.rss_mb], [mb for _, mb in report.rss_mb])
    axis.set_xlabel("seconds into the run")
    axis.set_ylabel("RSS of serve's process tree (MB)")
    axis.set_title(f"soak: {report.requests} requests at concurrency {report.concurrency}, "
                   f"{report.failures} failures, growth {report.rss_growth_pct} %")
    axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--long-fraction", type=float, default=0.1)
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--long-sentences", type=int, default=10, help="sentences in the long file (~5 s each)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    process, url = start_serve(args.out / f"soak-{stamp}-serve.log")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # still stop serve
    try:
        report = run(args.requests, args.concurrency, url, process.pid, args.long_fraction, args.bad_fraction,
                     args.long_sentences)
    finally:
        stop_serve(process)
    print_table(report)
    (args.out / f"soak-{stamp}.json").write_text(json.dumps(asdict(report), indent=1))
    plot(report, args.out / f"soak-{stamp}.png")
    print(f"wrote {args.out / f'soak-{stamp}.json'} and .png")
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
