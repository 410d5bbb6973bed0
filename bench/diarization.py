"""Speaker diarization on conversations of recorded speech with known turns (issue 27).

Conversations are built by testkit/real_voices.py from different people's recorded voices (Asterisk
prompt sets, one person each; the LibriVox reader of pocketsphinx's sources): 1-4 speakers, turns of
1-15 s, some turn changes overlapping by 0.3 s, some conversations at 8 kHz. Two sets:
`dev` (en/fr/it/ru core voices + LibriVox: the diarizer's thresholds were chosen on these) and
`held-out` (es-co, fr-armelle, it-menardi: other people, languages and 8 kHz GSM recordings, + LibriVox).

Measured per conversation:
- DER (missed speech + false alarm + confusion, over reference speech; 0.25 s collar on each side of
  every reference boundary, overlaps scored) with pyannote.metrics, for: the diarizer with the count
  given, the diarizer estimating the count (1..8), and two baselines: "one speaker" (every VAD region
  is one speaker) and "a new speaker at every pause" (each VAD region a speaker of its own);
- speaker-count accuracy when estimated;
- with --words (the default): the share of transcribed words given to the right speaker (the word's
  speaker, mapped to the reference by the optimal mapping DER uses, against the reference speaker at
  the word's middle; words in overlaps or between turns are not counted), through the same
  `SpeakerTranscriber` the `transcribe` model runs, on Whisper base;
- time: diarization per audio second (after VAD), and a request's wall time with diarize=true
  against the same request without (paired, alternating, in one process; the diarized request also
  asks the engine for word timestamps, which it needs to split segments).

Writes a table, bench/results/diarization.json and bench/results/diarization.png (reference vs found
speakers on a timeline for a few conversations). About 15 minutes on 2 quiet cores (the transcriptions of
the 2-speaker conversations take most of it; --no-words leaves them out).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import _path  # noqa: F401  (testkit)
from testkit.real_voices import DEV_VOICES, HELD_OUT_VOICES, Conversation, conversation

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench.diarization")

# (speakers, how many) per set; seeds are fixed, so every run measures the same audio
PLAN = ((1, 2), (2, 4), (3, 4), (4, 2))


def conversations(set_name: str) -> list[Conversation]:
    pool = DEV_VOICES if set_name == "dev" else HELD_OUT_VOICES + ("librivox",)
    rng = np.random.default_rng(7 if set_name == "dev" else 11)
    built = []
    for speakers, count in PLAN:
        for index in range(count):
            voices = tuple(rng.choice(pool, size=speakers, replace=False).tolist())
            seed = (0 if set_name == "dev" else 1000) + 100 * speakers + index
            built.append(conversation(voices, seed=seed, turns=3 * speakers + 2, overlaps=index % 2,
                                      rate=8000 if index == 1 else 16000,
                                      name=f"{set_name}-{speakers}spk-{index}"))
    return built


def annotation(turns, key: str = "speaker"):
    from pyannote.core import Annotation, Segment

    result = Annotation()
    for turn in turns:
        result[Segment(turn.start, turn.end)] = getattr(turn, key)
    return result


def der(reference, hypothesis, duration: float) -> dict:
    """pyannote's DER over the whole file; `mapping`: hypothesis label -> reference label (the optimal one)."""
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=0.5, skip_overlap=False)  # pyannote's collar is total: 0.25 s a side
    uem = Timeline([Segment(0, duration)])
    detail = metric(reference, hypothesis, uem=uem, detailed=True)
    total = detail["total"] or 1.0
    return {"der": detail["diarization error rate"], "missed": detail["missed detection"] / total,
            "false_alarm": detail["false alarm"] / total, "confusion": detail["confusion"] / total,
            "mapping": {str(k): str(v) for k, v in metric.optimal_mapping(reference, hypothesis, uem=uem).items()}}


class _Turn:
    def __init__(self, start, end, speaker):
        self.start, self.end, self.speaker = start, end, speaker


def baselines(conv: Conversation, probabilities: np.ndarray) -> dict:
    from whisper_triton.speakers.diarize import BRIDGE_S, regions

    spans = [(first / 100, last / 100) for first, last in regions(probabilities, conv.audio.size)]
    reference = annotation(conv.turns)
    one: list[_Turn] = []
    for s, e in spans:  # bridged as the diarizer bridges a speaker's short pauses
        if one and s - one[-1].end <= BRIDGE_S:
            one[-1].end = e
        else:
            one.append(_Turn(s, e, "S0"))
    every = [_Turn(s, e, f"S{i}") for i, (s, e) in enumerate(spans)]
    return {"one_speaker": der(reference, annotation(one), conv.duration),
            "speaker_per_pause": der(reference, annotation(every), conv.duration)}


def word_share(conv: Conversation, segments: list[dict], mapping: dict[str, str]) -> tuple[int, int]:
    """(right, counted): words whose speaker, mapped to the reference, is the one speaking at their middle."""
    right = counted = 0
    for segment in segments:
        for word in segment.get("words") or []:
            middle = (word["start"] + word["end"]) / 2
            speakers = {t.speaker for t in conv.turns if t.start <= middle < t.end}
            if len(speakers) != 1:
                continue  # between turns or in an overlap: no single right answer
            counted += 1
            right += mapping.get(word.get("speaker"), None) in speakers
    return right, counted


def run(args: argparse.Namespace) -> dict:
    from whisper_triton.pipeline.vad import speech_probabilities
    from whisper_triton.speakers.diarize import diarize
    from whisper_triton.speakers.encoder import load_encoder
    from whisper_triton.speakers.weights import default_encoder_path

    encoder = load_encoder(str(default_encoder_path()))
    transcriber = _transcriber(args, encoder) if args.words else None
    rows = []
    for set_name in args.sets:
        for conv in conversations(set_name):
            if args.speakers and len(conv.speakers) not in args.speakers:
                continue
            probabilities = speech_probabilities(conv.audio)
            reference = annotation(conv.turns)
            row = {"set": set_name, "name": conv.name, "speakers": len(conv.speakers), "voices": list(conv.speakers),
                   "rate": conv.rate, "overlaps": len(conv.notes["overlaps"]), "duration": round(conv.duration, 2)}
            started = time.perf_counter()
            given = diarize(encoder, conv.audio, probabilities, num_speakers=len(conv.speakers))
            row["diarize_s_per_audio_s"] = (time.perf_counter() - started) / conv.duration
            row["given"] = der(reference, annotation(given.turns), conv.duration)
            estimated = diarize(encoder, conv.audio, probabilities)
            row["estimated"] = der(reference, annotation(estimated.turns), conv.duration)
            row["estimated_count"] = estimated.count
            row["count_details"] = estimated.details
            row.update(baselines(conv, probabilities))
            row["turns"] = [asdict(t) for t in given.turns]
            row["reference_turns"] = [asdict(t) for t in conv.turns]
            if transcriber is not None and len(conv.speakers) in args.words_for:
                row.update(_words_and_time(transcriber, conv, args.rounds))
            rows.append(row)
            logger.info("%-16s %5.1fs DER given %5.1f %% (miss %.1f fa %.1f conf %.1f) est %5.1f %% (n=%d/%d) "
                        "one %5.1f %% pause %5.1f %%%s", conv.name, conv.duration, 100 * row["given"]["der"],
                        100 * row["given"]["missed"], 100 * row["given"]["false_alarm"], 100 * row["given"]["confusion"],
                        100 * row["estimated"]["der"],
                        estimated.count, len(conv.speakers), 100 * row["one_speaker"]["der"],
                        100 * row["speaker_per_pause"]["der"],
                        f" words {100 * row['word_share']:.1f} % overhead {100 * row['overhead']:+.0f} %"
                        if "word_share" in row else "")
    return {"rows": rows, "summary": summarize(rows), "model": args.model if args.words else None,
            "date": time.strftime("%Y-%m-%d")}


def _transcriber(args, encoder):
    from whisper_triton.engines import load_engine
    from whisper_triton.pipeline.longform import LongFormTranscriber
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer
    from whisper_triton.pipeline.windows import EngineWindowDecoder
    from whisper_triton.settings import load_settings
    from whisper_triton.speakers.service import SpeakerTranscriber

    if args.model == "base":
        from testkit.real_models import whisper_base_dir

        model_dir = whisper_base_dir()
    else:
        model_dir = load_settings().resolved_model_dir()
    engine = load_engine("ctranslate2", str(model_dir))
    tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
    pipeline = LongFormTranscriber(EngineWindowDecoder(engine, tokenizer), tokenizer)
    transcriber = SpeakerTranscriber(pipeline, encoder)
    from whisper_triton.contract.options import TranscribeOptions

    warm = conversation(("en", "fr"), seed=1, turns=2, max_turn_s=4.0)  # not timed: first-call costs
    transcriber.transcribe(warm.audio, TranscribeOptions(diarize=True, temperature=[0.0]))
    return transcriber


def _cold(transcriber) -> None:
    """Forget the encoder outputs of earlier requests: every timed request is cold, as a new file is."""
    from whisper_triton.pipeline.windows import EncoderCache

    decoder = transcriber.pipeline.decoder
    if decoder.cache is not None:
        decoder.cache = EncoderCache(decoder.cache.max_bytes)


def _words_and_time(transcriber, conv: Conversation, rounds: int) -> dict:
    """Word share on the diarized answer; time of the same request with and without diarize=true.
    Temperature 0 only: fallback samples at random, so its extra decodes would differ between the two."""
    from whisper_triton.contract.options import TranscribeOptions

    plain_options = TranscribeOptions(language_detection="chunk", temperature=[0.0])
    # word_timestamps: the words are kept in the answer (diarize asks the engine for them either way)
    diarize_options = TranscribeOptions(language_detection="chunk", temperature=[0.0], diarize=True,
                                        num_speakers=len(conv.speakers), word_timestamps=True)
    plain, diarized, result = [], [], None
    for _ in range(rounds):  # alternating, so load on the machine hits both alike
        _cold(transcriber)
        started = time.perf_counter()
        transcriber.pipeline.transcribe(conv.audio, plain_options)
        plain.append(time.perf_counter() - started)
        _cold(transcriber)
        started = time.perf_counter()
        result = transcriber.transcribe(conv.audio, diarize_options).to_dict(words=True)
        diarized.append(time.perf_counter() - started)
    hypothesis = annotation([_Turn(s["start"], s["end"], s["speaker"]) for s in result["segments"]])
    mapping = der(annotation(conv.turns), hypothesis, conv.duration)["mapping"]
    right, counted = word_share(conv, result["segments"], mapping)
    return {"word_share": right / max(counted, 1), "words_counted": counted,
            "plain_s": statistics.median(plain), "diarized_s": statistics.median(diarized),
            "overhead": statistics.median(diarized) / statistics.median(plain) - 1}


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for set_name in sorted({r["set"] for r in rows}):
        for speakers in sorted({r["speakers"] for r in rows}):
            group = [r for r in rows if r["set"] == set_name and r["speakers"] == speakers]
            if not group:
                continue
            entry = {"conversations": len(group),
                     "count_right": sum(r["estimated_count"] == speakers for r in group)}
            for system in ("given", "estimated", "one_speaker", "speaker_per_pause"):
                entry[f"der_{system}"] = _pooled(group, system)
            if any("word_share" in r for r in group):
                entry["word_share"] = statistics.mean(r["word_share"] for r in group if "word_share" in r)
                entry["overhead"] = statistics.median(r["overhead"] for r in group if "overhead" in r)
            entry["diarize_ms_per_audio_s"] = 1000 * statistics.median(r["diarize_s_per_audio_s"] for r in group)
            summary[f"{set_name}/{speakers}"] = entry
    return summary


def _pooled(group: list[dict], system: str) -> float:
    """DER over the group's speech time (each conversation weighted by its duration)."""
    weights = [r["duration"] for r in group]
    return sum(r[system]["der"] * w for r, w in zip(group, weights)) / sum(weights)


def table(result: dict) -> str:
    lines = ["| set / speakers | files | DER, count given | DER, count estimated | count right | one speaker | "
             "speaker per pause | words right | request time + | diarize ms per audio s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, e in result["summary"].items():
        words = f"{100 * e['word_share']:.1f} %" if "word_share" in e else "-"
        overhead = f"{100 * e['overhead']:+.0f} %" if "overhead" in e else "-"
        lines.append(f"| {key} | {e['conversations']} | {100 * e['der_given']:.1f} % | {100 * e['der_estimated']:.1f} % "
                     f"| {e['count_right']}/{e['conversations']} | {100 * e['der_one_speaker']:.1f} % | "
                     f"{100 * e['der_speaker_per_pause']:.1f} % | {words} | {overhead} | "
                     f"{e['diarize_ms_per_audio_s']:.0f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path, count: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["speakers"] >= 2][:count]
    figure, axes = plt.subplots(len(rows), 1, figsize=(14, 1.6 * len(rows) + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for axis, row in zip(axes[:, 0], rows):
        voices = {v: i for i, v in enumerate(row["voices"])}
        mapping = row["given"]["mapping"]  # hypothesis index -> reference voice
        for turn in row["reference_turns"]:
            axis.barh(1, turn["end"] - turn["start"], left=turn["start"], color=colors(voices[turn["speaker"]]))
        for turn in row["turns"]:
            voice = mapping.get(str(turn["speaker"]))
            axis.barh(0, turn["end"] - turn["start"], left=turn["start"],
                      color=colors(voices[voice]) if voice in voices else "lightgray")
        axis.set_yticks([0, 1], ["found", "reference"])
        axis.set_title(f"{row['name']} ({', '.join(row['voices'])}; {row['rate'] // 1000} kHz): "
                       f"DER {100 * row['given']['der']:.1f} %", fontsize=9, loc="left")
        axis.set_xlim(0, row["duration"])
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dev", "held-out"], choices=["dev", "held-out"])
    parser.add_argument("--no-words", dest="words", action="store_false",
                        help="diarization only (no transcription: no word share, no request time)")
    parser.add_argument("--model", default="base", choices=["base", "tiny.en"])
    parser.add_argument("--words-for", type=int, nargs="+", default=[2],
                        help="conversation sizes also transcribed (word share, request time); the slow part")
    parser.add_argument("--speakers", type=int, nargs="*", default=None, help="only conversations of these sizes")
    parser.add_argument("--rounds", type=int, default=2, help="paired timing rounds per conversation")
    parser.add_argument("--output", type=Path, default=RESULTS / "diarization.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    plot(result, args.output.with_suffix(".png"))
    print(table(result))
    print(f"\n{args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
