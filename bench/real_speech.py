"""Real-speech benchmark: the served stack against faster-whisper on recorded human speech, cold.

Recorded speech with texts (`testkit/real_speech.py`: Debian's asterisk telephony prompts in en, es,
fr, it, ru as 16 kHz G.722 and 8 kHz GSM, and LibriVox audiobook clips), fetched at pinned versions
and cached. Sets:

- `clips-<codec>-<lang>`: single prompts (>= 3 words, <= 30 s), an even draw per language; the GSM
  draw is another one (other prompts), sent at 8 kHz as a telephone system would;
- `librivox-en`: the five audiobook clips;
- `non-speech-<lang>`: tones, beeps, a recording of monkeys, silence: every word written is invented;
- `long-<codec>-<lang>-gaps|pauses`: prompts back to back with ordinary gaps (0.35-1.2 s) or long
  pauses (2.5-14 s) over faint room noise, FLAC, each under the 6 MiB body limit;
- `synthetic-long-en`: the espeak-ng file of bench/served.py (60 sentences, ~279 s).

Systems, on the same weights (tiny.en for English, the multilingual base for every language) and
threads: `served` (HTTP `POST /invocations` to a fresh `serve`), `fw-batched` (faster-whisper
`BatchedInferencePipeline`, batch 8) and `fw-sequential` (`WhisperModel.transcribe`, VAD on), with
and without timestamps, language detected (auto) and given. Every request is cold: the encoder
cache of `whisper_window` is scoped to one request (nothing is reused across requests), and each
file is sent once per mode.

Per set, system and mode: WER with substitutions / deletions / insertions (normalised:
testkit/scoring.py), language-ID accuracy (auto), loops, words on non-speech, wall time, RTF,
windows / decodes / fallback / follow-up decodes per audio minute (served: `info.work`; faster-whisper:
its engine calls counted), and the two-sided reading of empty outputs: for every clip one system
leaves empty while the other writes text, whether that text was right (WER <= 50 %: speech
dropped) or wrong (junk withheld). Translate (es/fr/it/ru clips, base): the share of English
function words in the output. Prints tables, writes bench/results/real_speech.json and .png.

    .venv/bin/python bench/real_speech.py --limit 6          # a quick look
    nice -n 5 .venv/bin/python bench/real_speech.py          # the full run
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable

from testkit import real_speech
from testkit.scoring import WordErrors, normalize, word_errors

logger = logging.getLogger("whisper_triton.bench.real_speech")
RESULTS = ROOT / "bench" / "results"
MAX_BODY = 6 * 1024 * 1024
EN_FUNCTION_WORDS = set("""the a an of to in and is are was be for on with that this it you your please press
enter not have has at by from or as if will can to your his her they we i he she there their our been
do does did no yes which what when who how all any more one""".split())


# ---- inputs ------------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    language: str
    reference: str
    body: bytes
    content_type: str
    seconds: float
    speech: bool = True
    samples: np.ndarray | None = field(default=None, repr=False)  # 16 kHz, for faster-whisper
    rate: int = 16_000


@dataclass
class Set:
    name: str
    kind: str  # clips | long | non-speech
    language: str
    items: list[Item]
    models: tuple[str, ...]

    @property
    def seconds(self) -> float:
        return sum(item.seconds for item in self.items)


def flac(samples: np.ndarray, rate: int) -> bytes:
    from served import encode_flac

    return encode_flac(samples, rate)


def clip_item(recording: real_speech.Recording) -> Item:
    native = recording.native()
    return Item(recording.name, recording.language, recording.text, real_speech.wav_bytes(native, recording.rate),
                "audio/wav", native.size / recording.rate, recording.speech, recording.samples(), recording.rate)


def long_item(long: real_speech.LongFile) -> Item:
    body = flac(long.samples, long.rate)
    if len(body) > MAX_BODY:
        raise ValueError(f"{long.name} is {len(body)} bytes, over the 6 MiB body limit: use fewer prompts")
    from whisper_triton.pipeline.audio import decode_audio

    return Item(long.name, long.language, long.reference, body, "audio/flac", long.seconds, True,
                decode_audio(body), long.rate)


def build_sets(args) -> list[Set]:
    sets: list[Set] = []
    languages = args.languages
    limit = args.limit
    for language in languages:
        models = ("tiny.en", "base") if language == "en" else ("base",)
        if "clips" in args.parts:
            for codec, offset in (("g722", 0), ("gsm", 7)):
                pool = real_speech.prompts(language, codec)
                drawn = real_speech.draw(pool, limit or args.clips, offset=offset, min_words=3, max_seconds=29)
                sets.append(Set(f"clips-{codec}-{language}", "clips", language, [clip_item(r) for r in drawn], models))
        if "non-speech" in args.parts:
            pool = real_speech.prompts(language, "g722", kind="non-speech")
            pool = [r for r in pool if not r.name.split("/", 2)[2].startswith("silence/")] + \
                [r for r in pool if r.name.endswith("silence/5")]
            sets.append(Set(f"non-speech-{language}", "non-speech", language, [clip_item(r) for r in pool], models))
        if "long" in args.parts:
            for codec in ("g722", "gsm") if args.long_gsm else ("g722",):
                pool = real_speech.draw(real_speech.prompts(language, codec), 400, min_words=2, max_seconds=20)
                rate = real_speech.CODECS[codec]
                count = limit * 3 if limit else args.long_prompts
                for style, pauses, offset in (("gaps", real_speech.ORDINARY_PAUSES, 0),
                                              ("pauses", real_speech.LONG_PAUSES, 1)):
                    if codec == "gsm" and style == "pauses":
                        continue
                    chosen = [pool[(offset + 2 * k) % len(pool)] for k in range(count)]
                    long = real_speech.long_file(f"long-{codec}-{language}-{style}", chosen, pauses, rate, seed=offset)
                    sets.append(Set(long.name, "long", language, [long_item(long)], models))
    if "en" in languages and "librivox" in args.parts:
        sets.append(Set("librivox-en", "clips", "en", [clip_item(r) for r in real_speech.librivox()],
                        ("tiny.en", "base")))
    if "en" in languages and "synthetic" in args.parts:
        from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences

        folder = Path(tempfile.mkdtemp(prefix="bench-real-"))
        samples, reference, _ = long_recording(spoken_sentences(folder), list(SENTENCES),
                                               repeats=12 if limit else 60)
        sets.append(Set("synthetic-long-en", "long", "en", [Item("synthetic-long-en", "en", reference,
                                                                 flac(samples, 16000), "audio/flac",
                                                                 samples.size / 16000, True, samples)], ("tiny.en",)))
    return sets


# ---- systems -----------------------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    language: str | None
    wall_s: float
    work: dict = field(default_factory=dict)  # windows, decodes, fallback, follow-ups, seconds
    left_out: int = 0


class Served:
    def __init__(self, model_dir: Path, threads: int, log_dir: Path):
        import httpx
        from served import start_serve

        env = {"WHISPER_TRITON_MODEL_DIR": str(model_dir), "WHISPER_TRITON_CPU_THREADS": str(threads),
               "WHISPER_TRITON_COMPUTE_TYPE": "float32"}
        try:
            self.server = start_serve(log_dir / f"serve-{model_dir.name}.log", env)
        except RuntimeError as exc:  # tritonserver may abort while starting on a loaded machine: once more
            logger.warning("serve did not start (%s); trying once more", exc)
            self.server = start_serve(log_dir / f"serve-{model_dir.name}-2.log", env)
        self.client = httpx.Client(timeout=3600)

    def transcribe(self, item: Item, without_timestamps: bool, language: str | None, task: str = "transcribe") -> Answer:
        params = {"without_timestamps": str(without_timestamps).lower(), "batch_size": "8"}
        if language:
            params["language"] = language
        if task != "transcribe":
            params["task"] = task
        started = time.perf_counter()
        reply = self.client.post(self.server.url + "/invocations", content=item.body, params=params,
                                 headers={"Content-Type": item.content_type, "Accept": "application/json"})
        wall = time.perf_counter() - started
        if reply.status_code != 200:
            raise RuntimeError(f"{item.name}: /invocations answered {reply.status_code}: {reply.text[:300]}")
        body = reply.json()
        info = body.get("info", {})
        return Answer(body["text"].strip(), body.get("language"), wall, info.get("work", {}),
                      len(info.get("left_out", [])))

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


class _Counting:
    """Forwards to a ctranslate2 Whisper model, counting the rows of each kind of call."""

    def __init__(self, model):
        self._model = model
        self.counts = {"encode": 0, "generate": 0, "detect_language": 0, "align": 0}

    def __getattr__(self, name):
        attribute = getattr(self._model, name)
        if name in self.counts and callable(attribute):
            def counted(features, *args, **kwargs):
                self.counts[name] += int(features.shape[0]) if hasattr(features, "shape") else 1
                return attribute(features, *args, **kwargs)
            return counted
        return attribute


class FasterWhisper:
    def __init__(self, model_dir: Path, threads: int, batched: bool):
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=threads)
        self.counting = _Counting(self.model.model)
        self.model.model = self.counting
        self.pipeline = BatchedInferencePipeline(self.model) if batched else self.model
        self.batched = batched

    def transcribe(self, item: Item, without_timestamps: bool, language: str | None, task: str = "transcribe") -> Answer:
        before = dict(self.counting.counts)
        kwargs = {"batch_size": 8} if self.batched else {"vad_filter": True}
        started = time.perf_counter()
        segments, info = self.pipeline.transcribe(item.samples, language=language, task=task,
                                                  without_timestamps=without_timestamps, **kwargs)
        text = "".join(segment.text for segment in segments).strip()  # lazy: this runs the decode
        wall = time.perf_counter() - started
        counts = {k: v - before[k] for k, v in self.counting.counts.items()}
        return Answer(text, info.language, wall, {"decodes": counts["generate"], "windows": None,
                                                  "detections": counts["detect_language"]})


# ---- scoring -----------------------------------------------------------------------------------
def is_loop(text: str) -> bool:
    """Too repetitive to be speech: zlib ratio over 2.4 (Whisper's rule) or a word 5 times in a row."""
    data = text.encode()
    if len(data) > 40 and len(data) / len(zlib.compress(data)) > 2.4:
        return True
    words = text.lower().split()
    return any(len(set(words[i : i + 5])) == 1 for i in range(max(0, len(words) - 4)))


def english_share(text: str) -> float:
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in EN_FUNCTION_WORDS for w in words) / len(words) if words else 0.0


@dataclass
class Row:
    set: str
    kind: str
    language: str
    model: str
    system: str
    mode: str  # "timestamps" | "no timestamps"
    given: bool
    task: str = "transcribe"
    errors: WordErrors = field(default_factory=WordErrors)
    items: int = 0
    seconds: float = 0.0
    wall_s: float = 0.0
    language_right: int = 0
    loops: int = 0
    nonspeech_words: int = 0
    empty: int = 0
    left_out: int = 0
    english_share: list[float] = field(default_factory=list)
    work: dict = field(default_factory=dict)
    per_item: list[dict] = field(default_factory=list)

    def add(self, item: Item, answer: Answer) -> None:
        self.items += 1
        self.seconds += item.seconds
        self.wall_s += answer.wall_s
        self.left_out += answer.left_out
        if not answer.text:
            self.empty += 1
        if self.task == "translate":
            self.english_share.append(english_share(answer.text))
        elif item.speech:
            self.errors = self.errors + word_errors(item.reference, answer.text, item.language)
        else:
            self.nonspeech_words += len(normalize(answer.text, item.language).split())
        if answer.language == item.language:
            self.language_right += 1
        self.loops += is_loop(answer.text)
        for key, value in answer.work.items():
            if isinstance(value, (int, float)) and value is not None:
                self.work[key] = self.work.get(key, 0) + value
            elif isinstance(value, dict):
                into = self.work.setdefault(key, {})
                for stage, seconds in value.items():
                    into[stage] = round(into.get(stage, 0.0) + seconds, 4)
        item_wer = word_errors(item.reference, answer.text, item.language).wer if item.speech else None
        self.per_item.append({"item": item.name, "text": answer.text, "language": answer.language,
                              "wall_s": round(answer.wall_s, 3), "wer": item_wer, "left_out": answer.left_out})

    def summary(self) -> dict:
        minutes = self.seconds / 60 or 1
        out = {"set": self.set, "kind": self.kind, "language": self.language, "model": self.model,
               "system": self.system, "mode": self.mode, "language_given": self.given, "task": self.task,
               "items": self.items, "audio_s": round(self.seconds, 2), "wall_s": round(self.wall_s, 3),
               "rtf": round(self.wall_s / max(self.seconds, 1e-9), 4), **self.errors.as_dict(),
               "language_id": round(self.language_right / max(self.items, 1), 3), "loops": self.loops,
               "nonspeech_words": self.nonspeech_words, "empty": self.empty, "left_out": self.left_out,
               "per_minute": {k: round(v / minutes, 2) for k, v in self.work.items() if isinstance(v, (int, float))},
               "stage_seconds": self.work.get("seconds", {})}
        if self.english_share:
            out["english_share"] = round(statistics.mean(self.english_share), 3)
        return out


def two_sided(served: Row, peer: Row, items: list[Item]) -> dict:
    """Clips one system leaves empty while the other writes text: was that text right (speech
    dropped) or wrong (junk withheld)?"""
    out = {"served_dropped_speech": [], "served_withheld_junk": [], "peer_dropped_speech": [],
           "peer_withheld_junk": []}
    for item, ours, theirs in zip(items, served.per_item, peer.per_item):
        if not item.speech or served.task != "transcribe":
            continue
        if not ours["text"] and theirs["text"]:
            key = "served_dropped_speech" if theirs["wer"] <= 0.5 else "served_withheld_junk"
            out[key].append({"item": item.name, "peer_text": theirs["text"], "peer_wer": round(theirs["wer"], 3)})
        elif ours["text"] and not theirs["text"]:
            key = "peer_dropped_speech" if ours["wer"] <= 0.5 else "peer_withheld_junk"
            out[key].append({"item": item.name, "served_text": ours["text"], "served_wer": round(ours["wer"], 3)})
    return out


# ---- the run -----------------------------------------------------------------------------------
def model_dirs() -> dict[str, Path]:
    from testkit.real_models import tiny_en_dir, whisper_base_dir

    return {"tiny.en": tiny_en_dir(), "base": whisper_base_dir()}


def modes(args, model: str) -> list[tuple[str, bool]]:
    """(timestamp mode, language given) pairs for this model (an English-only model has no detection)."""
    out = []
    for mode in args.modes:
        for given in ((True,) if model == "tiny.en" else tuple(g == "given" for g in args.language)):
            out.append((mode, given))
    return out


def report_of(rows: list[Row], comparisons: list[dict], args, threads: int) -> dict:
    return {"rows": [row.summary() for row in rows], "two_sided": comparisons,
            "per_item": [{"set": r.set, "model": r.model, "system": r.system, "mode": r.mode, "given": r.given,
                          "task": r.task, "items": r.per_item} for r in rows],
            "settings": {"threads": threads, "limit": args.limit, "clips": args.clips, "models": args.models,
                         "long_prompts": args.long_prompts, "languages": args.languages},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]}}


def save(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def run(args) -> dict:
    real_speech.fetch(real_speech.ALL_PACKAGES, librivox_too=True)
    sets = build_sets(args)
    logger.warning("%d sets, %.0f s of audio", len(sets), sum(s.seconds for s in sets))
    dirs = model_dirs()
    threads = args.cpu_threads or (os.cpu_count() or 1)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-real-serve-"))
    rows: list[Row] = []
    comparisons = []
    for model in args.models:
        chosen = [s for s in sets if model in s.models]
        if not chosen:
            continue
        systems = {"served": Served(dirs[model], threads, log_dir)}
        try:
            systems["fw-batched"] = FasterWhisper(dirs[model], threads, batched=True)
            if "fw-sequential" in args.systems:
                systems["fw-sequential"] = FasterWhisper(dirs[model], threads, batched=False)
            for s in chosen:
                for mode, given in modes(args, model):
                    without = mode == "no timestamps"
                    by_system = {}
                    for name, system in systems.items():
                        if name == "fw-sequential" and (s.kind == "non-speech" or mode != "timestamps"):
                            continue
                        row = Row(s.name, s.kind, s.language, model, name, mode, given)
                        for item in s.items:
                            row.add(item, system.transcribe(item, without, item.language if given else None))
                        rows.append(row)
                        by_system[name] = row
                        save(report_of(rows, comparisons, args, threads), Path(args.output))  # partial results
                        logger.warning("%-24s %-7s %-13s %-13s %-5s WER %5.1f %% (S%d D%d I%d) lang %.2f wall %6.2f s",
                                       s.name, model, name, mode, "given" if given else "auto",
                                       100 * row.errors.wer, row.errors.substitutions, row.errors.deletions,
                                       row.errors.insertions, row.language_right / max(row.items, 1), row.wall_s)
                    if s.kind == "clips":
                        comparisons.append({"set": s.name, "model": model, "mode": mode, "language_given": given,
                                            **two_sided(by_system["served"], by_system["fw-batched"], s.items)})
                if s.kind == "clips" and s.language != "en" and model == "base" and "translate" in args.parts \
                        and s.name.startswith("clips-g722"):
                    for name in ("served", "fw-batched"):
                        row = Row(s.name, s.kind, s.language, model, name, "no timestamps", True, task="translate")
                        for item in s.items:
                            row.add(item, systems[name].transcribe(item, True, item.language, "translate"))
                        rows.append(row)
        finally:
            systems["served"].stop()
    return report_of(rows, comparisons, args, threads)


# ---- output ------------------------------------------------------------------------------------
def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=230)
    table = Table(title="Real speech, cold requests: served vs faster-whisper (same weights, threads)")
    for header in ("set", "model", "mode", "lang", "system", "WER %", "S/D/I", "lang-ID", "loops", "non-sp. words",
                   "empty", "wall s", "RTF", "decodes/min", "fallback/min", "follow-up/min", "retries/min"):
        table.add_column(header, justify="left" if header in ("set", "model", "mode", "system", "lang") else "right")
    for row in report["rows"]:
        if row["task"] != "transcribe":
            continue
        per_minute = row["per_minute"]
        table.add_row(row["set"], row["model"], row["mode"], "given" if row["language_given"] else "auto",
                      row["system"], f"{100 * row['wer']:.1f}", f"{row['S']}/{row['D']}/{row['I']}",
                      f"{row['language_id']:.2f}", str(row["loops"]), str(row["nonspeech_words"]), str(row["empty"]),
                      f"{row['wall_s']:.2f}", f"{row['rtf']:.3f}", f"{per_minute.get('decodes', 0):.1f}",
                      f"{per_minute.get('fallback_decodes', 0):.1f}", f"{per_minute.get('follow_up_decodes', 0):.1f}",
                      f"{per_minute.get('language_retries', 0):.1f}")
    console.print(table)
    translate = [r for r in report["rows"] if r["task"] == "translate"]
    if translate:
        t = Table(title="Translate (base, language given): share of English function words; empty outputs")
        for header in ("set", "system", "English share", "empty", "left out"):
            t.add_column(header)
        for row in translate:
            t.add_row(row["set"], row["system"], f"{row.get('english_share', 0):.2f}", str(row["empty"]),
                      str(row["left_out"]))
        console.print(t)
    t = Table(title="Empty outputs, two-sided (clips): served empty where faster-whisper batched wrote text")
    for header in ("set", "model", "mode", "lang", "served: speech dropped", "served: junk withheld",
                   "fw: speech dropped", "fw: junk withheld"):
        t.add_column(header)
    for c in report["two_sided"]:
        t.add_row(c["set"], c["model"], c["mode"], "given" if c["language_given"] else "auto",
                  str(len(c["served_dropped_speech"])), str(len(c["served_withheld_junk"])),
                  str(len(c["peer_dropped_speech"])), str(len(c["peer_withheld_junk"])))
    console.print(t)
    console.print(f"machine: {report['machine']}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["task"] == "transcribe" and r["kind"] != "non-speech"
            and r["mode"] == "timestamps" and r["system"] in ("served", "fw-batched")]
    keys = sorted({(r["set"], r["model"], r["language_given"]) for r in rows})
    if not keys:
        return
    lookup = {(r["set"], r["model"], r["language_given"], r["system"]): r for r in rows}
    labels = [f"{s}\n{m} {'given' if g else 'auto'}" for s, m, g in keys]
    x = np.arange(len(keys))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(10, 0.6 * len(keys)), 8))
    for offset, system in ((-0.2, "served"), (0.2, "fw-batched")):
        top.bar(x + offset, [100 * lookup.get((*k, system), {}).get("wer", 0) for k in keys], 0.4, label=system)
        bottom.bar(x + offset, [lookup.get((*k, system), {}).get("rtf", 0) for k in keys], 0.4, label=system)
    top.set_title("WER % (timestamps), lower is better")
    bottom.set_title("real-time factor (cold wall / audio s), lower is faster")
    for axis in (top, bottom):
        axis.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", nargs="+", default=list(real_speech.LANGUAGES), choices=real_speech.LANGUAGES)
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"], choices=["tiny.en", "base"])
    parser.add_argument("--parts", nargs="+", default=["clips", "non-speech", "long", "librivox", "synthetic", "translate"],
                        choices=["clips", "non-speech", "long", "librivox", "synthetic", "translate"])
    parser.add_argument("--modes", nargs="+", default=["timestamps", "no timestamps"],
                        choices=["timestamps", "no timestamps"])
    parser.add_argument("--language", nargs="+", default=["auto", "given"], choices=["auto", "given"],
                        help="language detected, given, or both (multilingual model)")
    parser.add_argument("--systems", nargs="+", default=["served", "fw-batched", "fw-sequential"])
    parser.add_argument("--clips", type=int, default=20, help="clips per language and codec")
    parser.add_argument("--long-prompts", type=int, default=45, help="prompts per long file")
    parser.add_argument("--long-gsm", action=argparse.BooleanOptionalAction, default=True,
                        help="8 kHz telephony long files too")
    parser.add_argument("--limit", type=int, default=0, help="a small run: this many clips, 3x as many prompts a long file")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "real_speech.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))  # bench/served.py's helpers
    report = run(args)
    print_report(report)
    output = Path(args.output)
    save(report, output)
    plot(report, output.with_suffix(".png"))
    logger.warning("wrote %s and %s", output, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
