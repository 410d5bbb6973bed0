"""Hallucination benchmark: how many words each system invents on audio with no or little speech.

Not a test: no assertions. Inputs (16 kHz, built here, deterministic): digital silence, room tone
(pink noise) at several levels, beeps, chords, English sentences between long silences, very quiet
and clipped speech, and speech in languages the model does poorly. Systems side by side on the same
model files:

- `project`: this project over HTTP, a fresh `./serve` on free ports, default options;
- `fw-vad`: faster-whisper `WhisperModel.transcribe(vad_filter=True)`, its defaults otherwise;
- `fw-batched`: faster-whisper `BatchedInferencePipeline.transcribe` (its own VAD), batch_size 8;
- `openai`: openai-whisper `transcribe()` defaults, on a checkpoint converted from the same
  CTranslate2 weights (`whisper_triton.export.ct2_weights`; exact, no arithmetic).

An invented word is a word of the answer that is not in the reference (multiset difference, after
lower-casing and dropping punctuation): on a no-speech input every word is invented. `missed` counts
the reference's words the answer lacks, so that silence is not bought by dropping speech.

    .venv/bin/python bench/hallucination.py [--models tiny.en,base] [--systems ...] [--inputs ...]

Prints a table per model, writes bench/results/hallucination.json and hallucination.png.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import tempfile
import time
import unicodedata
import wave
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable

from testkit.multilingual_speech import VOICES as LANGUAGE_VOICES
from testkit.real_models import tiny_en_dir, whisper_base_dir
from testkit.synthetic_speech import SENTENCES, speak
from whisper_triton.pipeline.audio import SAMPLE_RATE, decode_audio

logger = logging.getLogger("whisper_triton.bench.hallucination")
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("project", "fw-vad", "fw-batched", "openai")
MODELS = ("tiny.en", "base")
# speech Whisper handles poorly: espeak-ng's Portuguese and Dutch voices (base calls them hu / en)
POOR_LANGUAGE = {
    "pt": ("pt", "Eu gosto muito de caminhar na praia ao fim da tarde com os meus amigos."),
    "nl": ("nl", "Morgen gaan we met de fiets naar het strand als het mooi weer is."),
}


@dataclass
class Input:
    name: str
    kind: str  # no-speech | sparse-speech | degraded-speech | poor-language
    samples: np.ndarray = field(repr=False)
    reference: str = ""

    @property
    def seconds(self) -> float:
        return round(self.samples.size / SAMPLE_RATE, 2)


@dataclass
class Answer:
    model: str
    system: str
    input: str
    kind: str
    text: str
    invented: int
    missed: int
    seconds: float
    error: str | None = None


# ---- inputs ---------------------------------------------------------------------------------------
def _pink_noise(seconds: float, rms_dbfs: float, seed: int) -> np.ndarray:
    """Room tone: 1/f noise, scaled to `rms_dbfs` dB below full scale."""
    n = int(seconds * SAMPLE_RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    frequencies = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum /= np.sqrt(np.maximum(frequencies, 20.0))
    noise = np.fft.irfft(spectrum, n)
    return (noise / np.sqrt(np.mean(noise**2)) * 10 ** (rms_dbfs / 20)).astype(np.float32)


def _beeps(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    on = (t % 1.0) < 0.15  # a 150 ms 1 kHz beep every second
    return (0.3 * np.sin(2 * np.pi * 1000 * t) * on).astype(np.float32)


def _chords(seconds: float) -> np.ndarray:
    """Music-like: a C-G-Am-F progression, one chord a second, harmonics and a decaying envelope."""
    progression = ((261.6, 329.6, 392.0), (196.0, 246.9, 293.7), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6))
    beat = SAMPLE_RATE
    t = np.arange(beat) / SAMPLE_RATE
    envelope = np.minimum(t / 0.02, 1.0) * np.exp(-3.0 * t)
    out = []
    for k in range(int(seconds)):
        chord = sum(np.sin(2 * np.pi * f * h * t) / h**1.5 for f in progression[k % 4] for h in (1, 2, 3, 4))
        out.append(chord * envelope)
    audio = np.concatenate(out)
    return (0.25 * audio / np.max(np.abs(audio))).astype(np.float32)


def _spoken(text: str, folder: Path, name: str, voice: str = "en-us") -> np.ndarray:
    return decode_audio(speak(text, folder / f"{name}.wav", voice=voice).read_bytes())


def build_inputs(folder: Path) -> list[Input]:
    seconds = 20.0
    inputs = [
        Input("silence", "no-speech", np.zeros(int(seconds * SAMPLE_RATE), np.float32)),
        Input("room-tone-60dB", "no-speech", _pink_noise(seconds, -60, 1)),
        Input("room-tone-45dB", "no-speech", _pink_noise(seconds, -45, 2)),
        Input("room-tone-30dB", "no-speech", _pink_noise(seconds, -30, 3)),
        Input("beeps", "no-speech", _beeps(seconds)),
        Input("chords", "no-speech", _chords(seconds)),
    ]
    sentences = [_spoken(text, folder, f"en{i}") for i, text in enumerate(SENTENCES[:3])]
    gap = np.zeros(10 * SAMPLE_RATE, np.float32)
    sparse = np.concatenate([gap[:SAMPLE_RATE], sentences[0], gap, sentences[1], gap, sentences[2], gap])
    sparse = sparse + _pink_noise(sparse.size / SAMPLE_RATE, -65, 4)
    inputs.append(Input("long-silences", "sparse-speech", sparse.astype(np.float32), " ".join(SENTENCES[:3])))
    two = np.concatenate([sentences[0], np.zeros(SAMPLE_RATE, np.float32), sentences[1]])
    reference = " ".join(SENTENCES[:2])
    quiet = two / np.max(np.abs(two)) * 10 ** (-45 / 20)  # peak 45 dB below full scale
    inputs.append(Input("quiet-speech-45dB", "degraded-speech", quiet.astype(np.float32), reference))
    clipped = np.clip(two / np.max(np.abs(two)) * 8.0, -1.0, 1.0)  # 18 dB of hard clipping
    inputs.append(Input("clipped-speech", "degraded-speech", clipped.astype(np.float32), reference))
    for code, (voice, text) in POOR_LANGUAGE.items():
        inputs.append(Input(f"speech-{code}", "poor-language", _spoken(text, folder, code, voice), text))
    assert LANGUAGE_VOICES  # the languages the base model handles well are tested in tests/, not here
    return inputs


# ---- scoring ----------------------------------------------------------------------------------------
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation; each CJK character counts as a word."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _CJK.sub(lambda m: f" {m.group(0)} ", text)
    return re.findall(r"[\w']+", text)


def score(answer: str, reference: str) -> tuple[int, int]:
    said, expected = Counter(words(answer)), Counter(words(reference))
    return sum((said - expected).values()), sum((expected - said).values())


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


# ---- systems ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProjectOverHttp:
    """A fresh `./serve` (Triton + proxy) for one model, on free ports, default options."""

    def __init__(self, model_dir: Path, log_path: Path):
        import httpx

        ports = [_free_port() for _ in range(4)]
        env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(ports[0]), WHISPER_TRITON_BIND_HOST="127.0.0.1",
                   WHISPER_TRITON_TRITON_HTTP_PORT=str(ports[1]), WHISPER_TRITON_TRITON_GRPC_PORT=str(ports[2]),
                   WHISPER_TRITON_TRITON_METRICS_PORT=str(ports[3]), WHISPER_TRITON_MODEL_DIR=str(model_dir))
        self.url = f"http://127.0.0.1:{ports[0]}"
        self.log_path = log_path
        self.process = subprocess.Popen([str(ROOT / "serve")], env=env, stdout=log_path.open("wb"),
                                        stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.client = httpx.Client(timeout=600)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}; see {log_path}")
            try:
                if self.client.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"serve was not ready within 300 s; see {log_path}")

    def transcribe(self, samples: np.ndarray) -> str:
        reply = self.client.post(self.url + "/invocations", content=wav_bytes(samples),
                                 headers={"Content-Type": "audio/wav"})
        reply.raise_for_status()
        return reply.json()["text"]

    def close(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


class FasterWhisper:
    def __init__(self, model_dir: Path, batched: bool, threads: int):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=threads)
        self.batched = BatchedInferencePipeline(self.model) if batched else None

    def transcribe(self, samples: np.ndarray) -> str:
        if self.batched is not None:
            segments, _ = self.batched.transcribe(samples, batch_size=8)
        else:
            segments, _ = self.model.transcribe(samples, vad_filter=True)
        return "".join(segment.text for segment in segments).strip()

    def close(self) -> None:
        del self.model


class OpenAIWhisper:
    """openai-whisper on a checkpoint converted exactly from the CTranslate2 model (fp32, CPU)."""

    def __init__(self, model_dir: Path, threads: int):
        import torch
        import whisper
        from whisper.model import ModelDimensions, Whisper

        from whisper_triton.export.ct2_weights import openai_checkpoint_from_ct2

        torch.set_num_threads(threads)
        checkpoint = openai_checkpoint_from_ct2(model_dir, dtype="float32")
        dims = checkpoint["dims"]
        self.model = Whisper(ModelDimensions(**(dims if isinstance(dims, dict) else dims.to_dict())))
        state = {name: torch.as_tensor(np.asarray(value)) for name, value in checkpoint["model_state_dict"].items()}
        self.model.load_state_dict(state)
        self.model.eval()
        self.whisper = whisper

    def transcribe(self, samples: np.ndarray) -> str:
        import torch

        torch.manual_seed(0)  # temperature fallback samples
        return self.whisper.transcribe(self.model, samples.astype(np.float32), fp16=False)["text"].strip()

    def close(self) -> None:
        del self.model


def open_system(name: str, model_dir: Path, work: Path, threads: int):
    if name == "project":
        return ProjectOverHttp(model_dir, work / f"serve-{model_dir.name}.log")
    if name in ("fw-vad", "fw-batched"):
        return FasterWhisper(model_dir, batched=name == "fw-batched", threads=threads)
    if name == "openai":
        return OpenAIWhisper(model_dir, threads)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


# ---- run ------------------------------------------------------------------------------------------------
def run(models: list[str], systems: list[str], inputs: list[Input], work: Path, threads: int) -> list[Answer]:
    answers: list[Answer] = []
    for model in models:
        model_dir = tiny_en_dir() if model == "tiny.en" else whisper_base_dir()
        for system_name in systems:
            logger.info("%s / %s: starting", model, system_name)
            system = open_system(system_name, model_dir, work, threads)
            try:
                for item in inputs:
                    started = time.perf_counter()
                    try:
                        text, error = system.transcribe(item.samples), None
                    except Exception as exc:  # a failing system is a result, not the end of the run
                        text, error = "", f"{type(exc).__name__}: {exc}"
                    invented, missed = score(text, item.reference)
                    answers.append(Answer(model, system_name, item.name, item.kind, text, invented, missed,
                                          round(time.perf_counter() - started, 2), error))
                    logger.info("%s / %s / %s: %d invented, %r", model, system_name, item.name, invented, text[:80])
            finally:
                system.close()
    return answers


def print_table(answers: list[Answer], inputs: list[Input], systems: list[str]) -> None:
    for model in dict.fromkeys(a.model for a in answers):
        print(f"\n## {model}: invented words (missed reference words)")
        print("| input | kind | seconds | " + " | ".join(systems) + " |")
        print("|---|---|---|" + "---|" * len(systems))
        for item in inputs:
            cells = []
            for system in systems:
                found = [a for a in answers if a.model == model and a.system == system and a.input == item.name]
                if not found:
                    cells.append("-")
                    continue
                a = found[0]
                cells.append("error" if a.error else (f"{a.invented}" + (f" ({a.missed})" if item.reference else "")))
            print(f"| {item.name} | {item.kind} | {item.seconds} | " + " | ".join(cells) + " |")
        print("\nper kind, total invented words:")
        for kind in dict.fromkeys(i.kind for i in inputs):
            totals = {s: sum(a.invented for a in answers if a.model == model and a.system == s and a.kind == kind)
                      for s in systems}
            peers = [v for s, v in totals.items() if s != "project"]
            verdict = ""
            if "project" in totals and peers:
                verdict = "  <= best peer" if totals["project"] <= min(peers) else "  MORE than the best peer"
            print(f"  {kind:16s} " + "  ".join(f"{s}={v}" for s, v in totals.items()) + verdict)


def plot(answers: list[Answer], inputs: list[Input], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(a.model for a in answers))
    figure, axes = plt.subplots(len(models), 1, figsize=(12, 3.8 * len(models)), squeeze=False)
    width = 0.8 / len(systems)
    x = np.arange(len(inputs))
    for row, model in enumerate(models):
        axis = axes[row][0]
        for k, system in enumerate(systems):
            values = []
            for item in inputs:
                found = [a.invented for a in answers if a.model == model and a.system == system and a.input == item.name]
                values.append(found[0] if found else 0)
            axis.bar(x + (k - (len(systems) - 1) / 2) * width, values, width, label=system)
        axis.set_xticks(x, [i.name for i in inputs], rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("invented words")
        axis.set_title(f"Whisper {model}: words not in the reference (no-speech inputs: every word)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: tiny.en, base")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated: {', '.join(SYSTEMS)}")
    parser.add_argument("--inputs", default="", help="comma-separated input names (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the peers")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    models, systems = args.models.split(","), args.systems.split(",")
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hallucination-") as work:
        inputs = build_inputs(Path(work))
        if args.inputs:
            wanted = set(args.inputs.split(","))
            inputs = [i for i in inputs if i.name in wanted]
        answers = run(models, systems, inputs, Path(work), args.threads)
    print_table(answers, inputs, systems)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "inputs": [{"name": i.name, "kind": i.kind, "seconds": i.seconds, "reference": i.reference} for i in inputs],
              "answers": [asdict(a) for a in answers]}
    (args.output / "hallucination.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    plot(answers, inputs, systems, args.output / "hallucination.png")
    print(f"\nwrote {args.output / 'hallucination.json'} and {args.output / 'hallucination.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
