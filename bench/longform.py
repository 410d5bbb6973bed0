"""Long-form benchmark: our pipeline vs faster-whisper's BatchedInferencePipeline, in one process,
on the same file, the same CTranslate2 model instance and the same settings. Prints RTF and WER of
both (paired, interleaved rounds; medians) and writes JSON. Not a test: no assertions. Every call is
cold: the pipeline scopes its encoder reuse to one call, so a round never reuses an earlier one's work."""

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable

from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.settings import load_settings
from whisper_triton.pipeline.tokenizer import WhisperTokenizer
from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences

logger = logging.getLogger("whisper_triton.bench")
@dataclass
class Row:
    setting: str
    ours_rtf: float
    theirs_rtf: float
    ours_wer: float
    theirs_wer: float
    ours_seconds: list = field(default_factory=list)
    theirs_seconds: list = field(default_factory=list)

    @property
    def speed_ratio(self) -> float:
        return self.ours_rtf / self.theirs_rtf


def long_file(sentences: int, folder: Path) -> tuple[np.ndarray, str]:
    samples, reference, _ = long_recording(spoken_sentences(folder), list(SENTENCES), repeats=sentences)
    return samples, reference


def run(args: argparse.Namespace) -> dict:
    import ctranslate2
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from whisper_triton.engines.ctranslate2_engine import CTranslate2Engine
    from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer
    from whisper_triton.pipeline.windows import EngineWindowDecoder

    settings = load_settings()
    model_dir = Path(args.model_dir) if args.model_dir else settings.resolved_model_dir()
    if args.audio:
        audio, reference = decode_audio(Path(args.audio).read_bytes()), Path(args.reference).read_text()
    else:
        audio, reference = long_file(args.sentences, Path(tempfile.mkdtemp(prefix="bench-")))
    duration = audio.size / SAMPLE_RATE
    threads = settings.cpu_thread_count()
    theirs_model = WhisperModel(str(model_dir), device="cpu", compute_type=args.compute_type, cpu_threads=threads)
    theirs = BatchedInferencePipeline(theirs_model)
    # the very same CTranslate2 model instance: engine speed is identical by construction
    engine = CTranslate2Engine(model_dir, WhisperTokenizer.from_model_dir(model_dir).special_tokens(),
                               compute_type=args.compute_type, model=theirs_model.model)
    tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
    ours = LongFormTranscriber(EngineWindowDecoder(engine, tokenizer), tokenizer)
    assert isinstance(theirs_model.model, ctranslate2.models.Whisper)

    rows = []
    for name, without_timestamps, beam in (("beam 1, no timestamps", True, 1), ("beam 1, timestamps", False, 1),
                                            ("beam 5, no timestamps", True, 5)):
        our_options = TranscribeOptions(batch_size=args.batch_size, beam_size=beam, without_timestamps=without_timestamps,
                                        language="en" if not engine.is_multilingual else None)

        def run_ours() -> str:
            return ours.transcribe(audio, our_options).text

        def run_theirs() -> str:
            segments, _ = theirs.transcribe(audio, batch_size=args.batch_size, beam_size=beam,
                                            without_timestamps=without_timestamps, vad_filter=True,
                                            language="en" if not engine.is_multilingual else None)
            return "".join(segment.text for segment in segments)

        run_ours(), run_theirs()  # warm-up
        ours_times, theirs_times, ours_text, theirs_text = [], [], "", ""
        for _ in range(args.rounds):
            started = time.perf_counter()
            ours_text = run_ours()
            ours_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            theirs_text = run_theirs()
            theirs_times.append(time.perf_counter() - started)
        rows.append(Row(name, statistics.median(ours_times) / duration, statistics.median(theirs_times) / duration,
                        word_error_rate(reference, ours_text), word_error_rate(reference, theirs_text),
                        ours_times, theirs_times))
        logger.warning("%s: ours RTF %.4f WER %.3f | theirs RTF %.4f WER %.3f", name, rows[-1].ours_rtf,
                       rows[-1].ours_wer, rows[-1].theirs_rtf, rows[-1].theirs_wer)
    return {"audio_seconds": duration, "rounds": args.rounds, "batch_size": args.batch_size,
            "compute_type": args.compute_type, "model_dir": str(model_dir),
            "machine": {"cpus": os.cpu_count(), "threads": threads, "python": platform.python_version()},
            "rows": [dict(asdict(row), speed_ratio=row.speed_ratio) for row in rows]}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Long-form, {report['audio_seconds']:.0f} s file, batch {report['batch_size']}, "
                        f"{report['compute_type']}, median of {report['rounds']} paired rounds")
    for column in ("setting", "ours RTF", "faster-whisper RTF", "ours/theirs", "ours WER", "faster-whisper WER"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in report["rows"]:
        table.add_row(row["setting"], f"{row['ours_rtf']:.4f}", f"{row['theirs_rtf']:.4f}", f"{row['speed_ratio']:.2f}x",
                      f"{100 * row['ours_wer']:.1f} %", f"{100 * row['theirs_wer']:.1f} %")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--audio", help="audio file (default: espeak-ng sentences with pauses)")
    parser.add_argument("--reference", help="reference transcript file for --audio")
    parser.add_argument("--sentences", type=int, default=60, help="sentences in the generated file")
    parser.add_argument("--model-dir", help="CTranslate2 Whisper directory (default: the embedded tiny.en)")
    parser.add_argument("--compute-type", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "longform.json"))
    args = parser.parse_args(argv)
    if args.audio and not args.reference:
        parser.error("--audio needs --reference")
    report = run(args)
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    logger.warning("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
