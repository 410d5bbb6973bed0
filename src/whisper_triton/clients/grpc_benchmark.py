"""gRPC benchmark client against Triton: many audio files, N concurrent requests, to the
NVIDIA-compatible `whisper` model (padded WAV + WAV_LENS + TEXT_PREFIX, windows of <= 30 s) or to the
long-form `transcribe` model (file bytes + JSON options), at each concurrency of a sweep
(`--concurrency 1 2 4 8 16`). Prints a table and writes JSON (one row per level: wall time, audio
seconds per second (RTFx), p50/p90/p99 latency, WER where references are given, `name.txt` beside
`name.wav`) and a PNG plot of throughput and latency against concurrency (`--plot`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..pipeline.audio import SAMPLE_RATE, decode_audio
from ..pipeline.evaluation import word_error_rate

logger = logging.getLogger("whisper_triton.grpc_benchmark")
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm"}
DEFAULT_PREFIX = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


@dataclass
class Item:
    path: Path
    data: bytes
    samples: np.ndarray
    reference: str | None

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


@dataclass
class Report:
    model: str
    files: int
    concurrency: int
    audio_seconds: float
    wall_seconds: float
    rtfx: float
    latency_ms: dict
    wer: float | None
    transcripts: dict = field(default_factory=dict)


def load_items(folder: Path) -> list[Item]:
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        reference = path.with_suffix(".txt")
        data = path.read_bytes()
        items.append(Item(path, data, decode_audio(data), reference.read_text().strip() if reference.is_file() else None))
    if not items:
        raise SystemExit(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {folder}")
    return items


def whisper_request(grpcclient, item: Item, text_prefix: str, pad_seconds: int):
    """NVIDIA's client convention: WAV zero-padded to a multiple of `pad_seconds`, true length in WAV_LENS."""
    pad = pad_seconds * SAMPLE_RATE
    width = max(pad, -(-item.samples.size // pad) * pad) if pad else item.samples.size
    wav = np.zeros((1, width), dtype=np.float32)
    wav[0, : item.samples.size] = item.samples
    inputs = [grpcclient.InferInput("WAV", list(wav.shape), "FP32"), grpcclient.InferInput("WAV_LENS", [1, 1], "INT32"),
              grpcclient.InferInput("TEXT_PREFIX", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(np.array([[item.samples.size]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[text_prefix.encode()]], dtype=object))
    return inputs, [grpcclient.InferRequestedOutput("TRANSCRIPTS")]


def transcribe_request(grpcclient, item: Item, options: dict):
    inputs = [grpcclient.InferInput("AUDIO", [1], "BYTES"), grpcclient.InferInput("OPTIONS", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([item.data], dtype=object))
    inputs[1].set_data_from_numpy(np.array([json.dumps(options).encode()], dtype=object))
    return inputs, [grpcclient.InferRequestedOutput("RESULT")]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..100): the smallest value with at least q % at or below it."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"p50": 1000 * percentile(ordered, 50), "p90": 1000 * percentile(ordered, 90),
            "p99": 1000 * percentile(ordered, 99), "max": 1000 * ordered[-1]}


def run(args: argparse.Namespace, concurrency: int, items: list[Item] | None = None) -> Report:
    import tritonclient.grpc as grpcclient

    items = items if items is not None else load_items(Path(args.folder))
    items = items * max(1, args.repeat)
    options = json.loads(args.options) if args.options else {}

    def one(item: Item) -> tuple[str, float]:
        with grpcclient.InferenceServerClient(args.url) as client:
            if args.model == "whisper":
                inputs, outputs = whisper_request(grpcclient, item, args.text_prefix, args.pad_seconds)
            else:
                inputs, outputs = transcribe_request(grpcclient, item, options)
            started = time.perf_counter()
            result = client.infer(args.model, inputs, outputs=outputs, client_timeout=args.timeout)
            latency = time.perf_counter() - started
        if args.model == "whisper":
            return result.as_numpy("TRANSCRIPTS").reshape(-1)[0].decode(), latency
        return json.loads(result.as_numpy("RESULT").reshape(-1)[0])["text"], latency

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(one, items))
    wall = time.perf_counter() - started
    latencies = [latency for _, latency in answers]
    scored = [(item.reference, text) for item, (text, _) in zip(items, answers) if item.reference is not None]
    wer = None
    if scored:
        wer = word_error_rate(" ".join(r for r, _ in scored), " ".join(t for _, t in scored))
    audio_seconds = sum(item.seconds for item in items)
    return Report(
        model=args.model, files=len(items), concurrency=concurrency, audio_seconds=audio_seconds,
        wall_seconds=wall, rtfx=audio_seconds / wall, latency_ms=latency_summary(latencies),
        wer=wer, transcripts={item.path.name: text for item, (text, _) in zip(items, answers)},
    )


def print_table(reports: list[Report]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Triton gRPC benchmark: model {reports[0].model}, {reports[0].files} files per level")
    for column in ("concurrency", "audio s", "wall s", "RTFx", "p50 ms", "p90 ms", "p99 ms", "WER"):
        table.add_column(column, justify="right")
    for report in reports:
        table.add_row(str(report.concurrency), f"{report.audio_seconds:.1f}", f"{report.wall_seconds:.2f}",
                      f"{report.rtfx:.1f}", f"{report.latency_ms['p50']:.0f}", f"{report.latency_ms['p90']:.0f}",
                      f"{report.latency_ms['p99']:.0f}", "-" if report.wer is None else f"{100 * report.wer:.1f} %")
    Console().print(table)


def plot(reports: list[Report], path: Path) -> Path:
    """Throughput (RTFx) and p50/p90/p99 latency against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    levels = [r.concurrency for r in reports]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(levels, [r.rtfx for r in reports], marker="o")
    left.set(xlabel="concurrent requests", ylabel="RTFx (audio s per wall s)", title="Throughput", xscale="log", xticks=levels)
    left.set_xticklabels([str(level) for level in levels])
    for key in ("p50", "p90", "p99"):
        right.plot(levels, [r.latency_ms[key] / 1000 for r in reports], marker="o", label=key)
    right.set(xlabel="concurrent requests", ylabel="latency (s)", title="Latency", xscale="log", xticks=levels)
    right.set_xticklabels([str(level) for level in levels])
    right.legend()
    figure.suptitle(f"Triton gRPC, model {reports[0].model}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="folder of audio files (optional name.txt references beside them)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--model", choices=["whisper", "transcribe"], default="whisper")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="concurrency levels to sweep, e.g. 1 2 4 8 16")
    parser.add_argument("--repeat", type=int, default=1, help="send the folder this many times per level")
    parser.add_argument("--text-prefix", default=DEFAULT_PREFIX, help="whisper model: TEXT_PREFIX")
    parser.add_argument("--pad-seconds", type=int, default=30, help="whisper model: pad WAV to a multiple (0: none)")
    parser.add_argument("--options", default="", help='transcribe model: JSON options, e.g. \'{"beam_size": 4}\'')
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", default="bench/results/grpc_benchmark.json")
    parser.add_argument("--plot", default="", help="PNG path (default: the --output path with .png)")
    args = parser.parse_args(argv)
    if any(level < 1 for level in args.concurrency):
        parser.error("--concurrency levels must be at least 1")
    items = load_items(Path(args.folder))
    reports = [run(args, level, items) for level in sorted(set(args.concurrency))]
    print_table(reports)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"levels": [asdict(r) for r in reports]}, indent=2) + "\n")
    picture = plot(reports, Path(args.plot) if args.plot else output.with_suffix(".png"))
    print(f"wrote {output} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
