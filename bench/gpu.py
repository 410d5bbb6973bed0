"""GPU benchmark, ready for a g5: throughput (RTFx), latency (p50/p90), accuracy (WER) and cost per
audio hour of a running `serve`, at several concurrencies.

    python bench/gpu.py --audio-dir librispeech-sample/ --concurrency 1,4,8,16 \\
        --price-per-hour 1.408 --instance ml.g5.xlarge [--url http://127.0.0.1:8080]

The folder holds `name.wav` (any format `serve` decodes) with its reference transcript `name.txt`
beside it. Every file is sent `--repeats` times per concurrency level to `POST /invocations` (the
SageMaker contract; options go in the custom attributes as a client would send them). Per level:

- RTFx = seconds of audio transcribed / wall-clock seconds (higher is faster);
- p50 / p90 of the per-request latency (send to full reply);
- WER over the corpus (all files' word errors / all reference words, after Whisper-style
  normalisation), from the first repeat;
- cost per audio hour = price per instance hour / RTFx (the instance is paid by the hour whether
  it is busy or not: this is the cost at the measured throughput).

Writes JSON under bench/results/ and a PNG plot (RTFx and latency against concurrency). Not a test:
the arithmetic is unit-tested in tests/test_bench_gpu.py, which also runs it against a CPU `serve`.
Nothing here claims a GPU figure; the JSON records the host and the URL it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _path import ROOT  # the repository root, made importable

from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio
from whisper_triton.pipeline.evaluation import normalize

logger = logging.getLogger("whisper_triton.bench.gpu")

RESULTS_DIR = ROOT / "bench" / "results"


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioItem:
    name: str
    path: Path
    reference: str
    seconds: float


@dataclass
class RequestResult:
    name: str
    seconds: float  # audio duration
    latency_s: float
    status: int
    text: str = ""
    repeat: int = 0


@dataclass
class LevelSummary:
    concurrency: int
    requests: int
    errors: int
    audio_seconds: float
    wall_seconds: float
    rtfx: float
    latency_p50_s: float
    latency_p90_s: float
    wer: float | None
    cost_per_audio_hour: float | None
    error_statuses: dict = field(default_factory=dict)


# ---- arithmetic (pure) --------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0-100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word errors over all files / reference words over all files (not a mean of per-file WERs)."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]  # a file without reference words has no WER to add
    if not pairs:
        return 0.0
    measures = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors = measures.substitutions + measures.deletions + measures.insertions
    return errors / sum(len(r.split()) for r, _ in pairs)


def cost_per_audio_hour(price_per_hour: float | None, rtfx: float) -> float | None:
    """What one hour of audio costs on an instance paid `price_per_hour`, at throughput `rtfx`."""
    if price_per_hour is None or rtfx <= 0 or math.isnan(rtfx):
        return None
    return price_per_hour / rtfx


def summarize(concurrency: int, results: list[RequestResult], wall_seconds: float, items: dict[str, AudioItem],
              price_per_hour: float | None) -> LevelSummary:
    ok = [r for r in results if r.status == 200]
    audio = sum(r.seconds for r in ok)
    rtfx = audio / wall_seconds if wall_seconds > 0 else math.nan
    latencies = [r.latency_s for r in ok]
    first = {r.name: r for r in sorted(ok, key=lambda r: r.repeat, reverse=True)}  # repeat 0 wins
    wer = corpus_wer([items[n].reference for n in sorted(first)], [first[n].text for n in sorted(first)]) if first else None
    statuses: dict[str, int] = {}
    for r in results:
        if r.status != 200:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return LevelSummary(concurrency=concurrency, requests=len(results), errors=len(results) - len(ok),
                        audio_seconds=audio, wall_seconds=wall_seconds, rtfx=rtfx,
                        latency_p50_s=percentile(latencies, 50), latency_p90_s=percentile(latencies, 90),
                        wer=wer, cost_per_audio_hour=cost_per_audio_hour(price_per_hour, rtfx), error_statuses=statuses)


# ---- inputs -------------------------------------------------------------------------------------
def load_folder(folder: Path, audio_suffixes: tuple[str, ...] = (".wav", ".flac", ".mp3", ".ogg", ".m4a")) -> list[AudioItem]:
    """Every audio file with a `name.txt` reference beside it; files without one are skipped (logged)."""
    items = []
    for path in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in audio_suffixes):
        reference = path.with_suffix(".txt")
        if not reference.is_file():
            logger.warning("%s has no %s beside it: skipped", path.name, reference.name)
            continue
        seconds = decode_audio(path.read_bytes()).size / SAMPLE_RATE
        items.append(AudioItem(path.stem, path, reference.read_text().strip(), seconds))
    if not items:
        raise SystemExit(f"{folder} holds no audio file with a reference (name.wav + name.txt).")
    return items


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--concurrency takes integers separated by commas, e.g. 1,4,8; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--concurrency levels must be 1 or more, got {text!r}")
    return levels


# ---- running ------------------------------------------------------------------------------------
def _content_type(path: Path) -> str:
    return {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg"}.get(
        path.suffix.lower(), "application/octet-stream")


def send(client, url: str, item: AudioItem, body: bytes, attributes: str, repeat: int) -> RequestResult:
    headers = {"Content-Type": _content_type(item.path), "Accept": "application/json"}
    if attributes:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = attributes
    start = time.perf_counter()
    try:
        reply = client.post(url + "/invocations", content=body, headers=headers)
        latency = time.perf_counter() - start
        text = reply.json().get("text", "") if reply.status_code == 200 else ""
        return RequestResult(item.name, item.seconds, latency, reply.status_code, text, repeat)
    except Exception as exc:  # noqa: BLE001 - a failed request is a measured error, not a crash
        logger.warning("%s: %s", item.name, exc)
        return RequestResult(item.name, item.seconds, time.perf_counter() - start, 0, "", repeat)


def run_level(url: str, items: list[AudioItem], concurrency: int, repeats: int, attributes: str,
              timeout_s: float) -> tuple[list[RequestResult], float]:
    import httpx

    bodies = {item.name: item.path.read_bytes() for item in items}
    jobs = [(item, repeat) for repeat in range(repeats) for item in items]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout_s, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda job: send(client, url, job[0], bodies[job[0].name], attributes, job[1]), jobs))
        wall = time.perf_counter() - start
    return results, wall


def warm_up(url: str, item: AudioItem, attributes: str, timeout_s: float) -> None:
    """One request first: model load and CUDA graph / kernel selection are not part of the figures."""
    import httpx

    with httpx.Client(timeout=timeout_s) as client:
        result = send(client, url, item, item.path.read_bytes(), attributes, -1)
    if result.status != 200:
        raise SystemExit(f"The warm-up request to {url}/invocations failed (status {result.status}); is serve up?")


# ---- output -------------------------------------------------------------------------------------
def table(levels: list[LevelSummary]) -> str:
    lines = [f"{'conc':>4} {'reqs':>5} {'err':>4} {'RTFx':>8} {'p50 s':>7} {'p90 s':>7} {'WER %':>6} {'$/audio h':>9}"]
    for s in levels:
        wer = f"{100 * s.wer:6.2f}" if s.wer is not None else f"{'-':>6}"
        cost = f"{s.cost_per_audio_hour:9.4f}" if s.cost_per_audio_hour is not None else f"{'-':>9}"
        lines.append(f"{s.concurrency:>4} {s.requests:>5} {s.errors:>4} {s.rtfx:8.2f} {s.latency_p50_s:7.3f} "
                     f"{s.latency_p90_s:7.3f} {wer} {cost}")
    return "\n".join(lines)


def plot(levels: list[LevelSummary], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.concurrency for s in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [s.rtfx for s in levels], marker="o")
    left.set(xlabel="concurrent requests", ylabel="RTFx (audio s / wall s)", title="throughput")
    right.plot(x, [s.latency_p50_s for s in levels], marker="o", label="p50")
    right.plot(x, [s.latency_p90_s for s in levels], marker="s", label="p90")
    right.set(xlabel="concurrent requests", ylabel="latency (s)", title="latency")
    right.legend()
    for axis in (left, right):
        axis.set_xticks(x)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict:
    items = load_folder(Path(args.audio_dir))
    levels = parse_concurrency(args.concurrency)
    url = args.url.rstrip("/")
    warm_up(url, items[0], args.attributes, args.timeout)
    by_name = {item.name: item for item in items}
    summaries = []
    for concurrency in levels:
        results, wall = run_level(url, items, concurrency, args.repeats, args.attributes, args.timeout)
        summaries.append(summarize(concurrency, results, wall, by_name, args.price_per_hour))
        logger.info("concurrency %d: RTFx %.2f", concurrency, summaries[-1].rtfx)
    return {
        "benchmark": "gpu", "url": url, "instance": args.instance, "price_per_hour": args.price_per_hour,
        "attributes": args.attributes, "repeats": args.repeats, "files": len(items),
        "audio_seconds_per_pass": sum(item.seconds for item in items), "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "levels": [asdict(s) for s in summaries],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-dir", required=True, help="folder of name.wav + name.txt (reference) pairs")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the serve to measure")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated concurrency levels")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the folder per level")
    parser.add_argument("--price-per-hour", type=float, default=None,
                        help="the instance's price per hour (USD), for the cost per audio hour")
    parser.add_argument("--instance", default="", help="label recorded in the results, e.g. ml.g5.xlarge")
    parser.add_argument("--attributes", default="temperature=0",
                        help="X-Amzn-SageMaker-Custom-Attributes sent with every request")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--output", default=None, help="JSON path (default: bench/results/gpu-<time>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be 1 or more")
    if args.price_per_hour is not None and args.price_per_hour < 0:
        raise SystemExit("--price-per-hour must not be negative")
    report = run(args)
    output = Path(args.output) if args.output else RESULTS_DIR / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    levels = [LevelSummary(**level) for level in report["levels"]]
    png = plot(levels, output.with_suffix(".png"), f"{args.instance or url_label(report['url'])}: {report['files']} files")
    print(table(levels))
    print(f"JSON: {output}\nplot: {png}")
    return 0


def url_label(url: str) -> str:
    return url.split("://", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
