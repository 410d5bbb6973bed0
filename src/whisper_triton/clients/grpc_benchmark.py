"""gRPC benchmark client against Triton: many audio files, N concurrent requests, to the
NVIDIA-compatible `whisper` model (padded WAV + WAV_LENS + TEXT_PREFIX, windows of <= 30 s) or to the
long-form `transcribe` model (file bytes + JSON options). Prints a table and writes JSON: wall time,
audio seconds per second (RTFx), latency percentiles, and WER where references are given
(`name.txt` beside `name.wav`)."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, decode_audio
from ..evaluation import word_error_rate

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


def run(args: argparse.Namespace) -> Report:
    import tritonclient.grpc as grpcclient

    items = load_items(Path(args.folder))
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
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        answers = list(pool.map(one, items))
    wall = time.perf_counter() - started
    latencies = sorted(latency for _, latency in answers)
    scored = [(item.reference, text) for item, (text, _) in zip(items, answers) if item.reference is not None]
    wer = None
    if scored:
        wer = word_error_rate(" ".join(r for r, _ in scored), " ".join(t for _, t in scored))
    audio_seconds = sum(item.seconds for item in items)
    return Report(
        model=args.model, files=len(items), concurrency=args.concurrency, audio_seconds=audio_seconds,
        wall_seconds=wall, rtfx=audio_seconds / wall,
        latency_ms={"p50": 1000 * statistics.median(latencies),
                    "p90": 1000 * latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
                    "max": 1000 * latencies[-1]},
        wer=wer, transcripts={item.path.name: text for item, (text, _) in zip(items, answers)},
    )


def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Triton gRPC benchmark: model {report.model}, concurrency {report.concurrency}")
    for column in ("files", "audio s", "wall s", "RTFx", "p50 ms", "p90 ms", "WER"):
        table.add_column(column, justify="right")
    table.add_row(str(report.files), f"{report.audio_seconds:.1f}", f"{report.wall_seconds:.2f}", f"{report.rtfx:.1f}",
                  f"{report.latency_ms['p50']:.0f}", f"{report.latency_ms['p90']:.0f}",
                  "-" if report.wer is None else f"{100 * report.wer:.1f} %")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="folder of audio files (optional name.txt references beside them)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--model", choices=["whisper", "transcribe"], default="whisper")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--text-prefix", default=DEFAULT_PREFIX, help="whisper model: TEXT_PREFIX")
    parser.add_argument("--pad-seconds", type=int, default=30, help="whisper model: pad WAV to a multiple (0: none)")
    parser.add_argument("--options", default="", help='transcribe model: JSON options, e.g. \'{"beam_size": 4}\'')
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", default="bench/results/grpc_benchmark.json")
    args = parser.parse_args(argv)
    report = run(args)
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
