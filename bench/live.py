"""Live transcription latency: N concurrent sessions fed at real-time pace from recorded speech
(the Asterisk prompts, testkit/real_speech.py) against a fresh `serve`, and a streamed vs
unstreamed long file.

Per level N: every session sends its own prompts separated by pauses, 100 ms appends on the audio's
clock. Measured on the client: end of an utterance's speech (when its last speech sample was sent)
to its `completed` event (p50/p90), speech start to the utterance's first delta, WER of the finals
against the prompts' texts, and whether the level was **held in real time** (every utterance got
its final, p90 under `--held-p90` seconds). Each session's audio carries its own -80 dBFS dither,
so no window is one the server has decoded before (benchmarks time cold requests).

File streaming: one long file of prompts and pauses, POST /invocations unstreamed and streamed
(`Accept: application/jsonlines`), interleaved rounds, each round cold: time to the last byte, and
for the stream the time to its first line with segments.

    .venv/bin/python bench/live.py --sessions 1 2 4 --utterances 4
Writes bench/results/live.json and live.png; prints the table with the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable

SR = 16_000
STEP_S = 0.1
RESULTS = ROOT / "bench" / "results"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def session_audio(count: int, offset: int, pause_s: float, seed: int):
    """(samples with dither, [(speech start, speech end) in samples], [texts])."""
    from testkit.real_speech import sentences

    parts, spans, texts, position = [np.zeros(SR // 2, np.float32)], [], [], SR // 2
    for samples, text in sentences(count, offset):
        spans.append((position, position + samples.size))
        texts.append(text)
        parts += [samples, np.zeros(int(pause_s * SR), np.float32)]
        position += samples.size + int(pause_s * SR)
    audio = np.concatenate(parts)
    audio = audio + np.random.default_rng(seed).normal(0, 1e-4, audio.size).astype(np.float32)
    return audio, spans, texts


async def one_session(url: str, audio: np.ndarray, spans, texts, start_at: float) -> dict:
    import websockets

    from whisper_triton.pipeline.audio import encode_pcm16
    from whisper_triton.pipeline.evaluation import word_error_rate

    pcm = encode_pcm16(audio)
    step = int(24_000 * 2 * STEP_S)
    events: list[tuple[float, dict]] = []
    async with websockets.connect(url + "/v1/realtime?intent=transcription", max_size=None) as socket:
        await socket.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"transcription": {"language": "en"}}}}}))
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()

        async def feed():
            for index in range(0, len(pcm), step):
                await socket.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(pcm[index:index + step]).decode()}))
                await asyncio.sleep(max(0.0, t0 + (index + step) / 48_000 - time.monotonic()))

        feeder = asyncio.ensure_future(feed())
        deadline = t0 + audio.size / SR + 60
        try:
            while sum(e["type"].endswith(".completed") for _, e in events) < len(spans) and time.monotonic() < deadline:
                try:
                    message = await asyncio.wait_for(socket.recv(), timeout=max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                events.append((time.monotonic(), json.loads(message)))
        finally:
            feeder.cancel()
    committed = [e["item_id"] for _, e in events if e["type"] == "input_audio_buffer.committed"]
    completed = {e["item_id"]: (t, e["transcript"]) for t, e in events if e["type"].endswith(".completed")}
    first_delta = {}
    for t, e in events:
        if e["type"].endswith(".delta"):
            first_delta.setdefault(e["item_id"], t)
    final_latency, delta_latency = [], []
    for (start, end), item in zip(spans, committed):
        sent_end = t0 + np.ceil(end / (SR * STEP_S)) * STEP_S  # the append holding the last speech sample
        if item in completed:
            final_latency.append(completed[item][0] - sent_end)
        if item in first_delta:
            delta_latency.append(first_delta[item] - (t0 + start / SR))
    finals = [completed[item][1] for item in committed if item in completed]
    return {"utterances": len(spans), "committed": len(committed), "completed": len(finals),
            "final_latency": final_latency, "first_delta": delta_latency,
            "wer": word_error_rate(" ".join(texts), " ".join(finals)),
            "errors": [e["error"] for _, e in events if e["type"] == "error"]}


async def level(url: str, sessions: int, utterances: int, pause_s: float, seed: int) -> list[dict]:
    start_at = time.monotonic() + 1.0
    jobs = [one_session(url, *session_audio(utterances, offset=(seed * 7 + index * 5) % 24, pause_s=pause_s,
                                            seed=seed * 1000 + index), start_at=start_at + 0.37 * index)
            for index in range(sessions)]
    return list(await asyncio.gather(*jobs))


def summarize(sessions: int, results: list[dict], held_p90: float) -> dict:
    finals = [v for r in results for v in r["final_latency"]]
    deltas = [v for r in results for v in r["first_delta"]]
    expected = sum(r["utterances"] for r in results)
    done = sum(r["completed"] for r in results)
    p90 = percentile(finals, 90)
    return {"sessions": sessions, "utterances": expected, "completed": done,
            "final_p50_s": percentile(finals, 50), "final_p90_s": p90,
            "first_delta_p50_s": percentile(deltas, 50), "deltas": len(deltas),
            "wer": statistics.mean(r["wer"] for r in results),
            "held": done == expected and p90 is not None and p90 <= held_p90,
            "errors": [e for r in results for e in r["errors"]][:5]}


def file_streaming(url: str, rounds: int, seconds: float) -> dict:
    """Unstreamed vs streamed POST /invocations of the same (cold) long file, interleaved."""
    import httpx

    from testkit.real_speech import sentences
    from whisper_triton.pipeline.audio import SAMPLE_RATE

    sys.path.insert(0, str(ROOT / "tests"))
    from speech import encode

    parts, total = [], 0.0
    for samples, _ in sentences(200):
        parts += [samples, np.zeros(int(1.2 * SAMPLE_RATE), np.float32)]
        total += samples.size / SAMPLE_RATE + 1.2
        if total >= seconds:
            break
    base = np.concatenate(parts)
    rows = {"unstreamed_s": [], "streamed_s": [], "first_event_s": []}
    with httpx.Client(base_url=url, timeout=600) as client:
        for round_ in range(rounds):
            for mode in ("unstreamed", "streamed") if round_ % 2 == 0 else ("streamed", "unstreamed"):
                noisy = base + np.random.default_rng(10_000 + 2 * round_ + (mode == "streamed")).normal(
                    0, 1e-4, base.size).astype(np.float32)
                body = encode(noisy, SAMPLE_RATE, "flac", "flac")
                headers = {"Content-Type": "audio/flac"}
                started = time.perf_counter()
                if mode == "unstreamed":
                    reply = client.post("/invocations", content=body, headers=headers)
                    reply.raise_for_status()
                    rows["unstreamed_s"].append(time.perf_counter() - started)
                    continue
                first = None
                with client.stream("POST", "/invocations", content=body,
                                   headers={**headers, "Accept": "application/jsonlines"}) as reply:
                    reply.raise_for_status()
                    for line in reply.iter_lines():
                        if line and first is None and json.loads(line)["segments"]:
                            first = time.perf_counter() - started
                rows["streamed_s"].append(time.perf_counter() - started)
                rows["first_event_s"].append(first)
    unstreamed, streamed = statistics.median(rows["unstreamed_s"]), statistics.median(rows["streamed_s"])
    return {"file_seconds": round(base.size / SAMPLE_RATE, 1), "rounds": rounds, **rows,
            "unstreamed_median_s": unstreamed, "streamed_median_s": streamed,
            "ratio": streamed / unstreamed, "first_event_median_s": statistics.median(
                [v for v in rows["first_event_s"] if v is not None] or [float("nan")])}


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    n = [row["sessions"] for row in summary]
    axis.plot(n, [row["final_p50_s"] or np.nan for row in summary], "o-", label="final p50")
    axis.plot(n, [row["final_p90_s"] or np.nan for row in summary], "s--", label="final p90")
    axis.plot(n, [row["first_delta_p50_s"] or np.nan for row in summary], "^:", label="first delta p50")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("concurrent live sessions (real-time pace)")
    axis.set_ylabel("seconds")
    axis.set_xticks(n)
    axis.legend()
    axis.set_title("end of speech -> completed transcript")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--utterances", type=int, default=4, help="per session")
    parser.add_argument("--pause", type=float, default=1.5, help="seconds of silence between utterances")
    parser.add_argument("--held-p90", type=float, default=2.0, help="p90 bound (s) for a level to count as held")
    parser.add_argument("--file-seconds", type=float, default=180.0, help="length of the streamed-vs-unstreamed file")
    parser.add_argument("--file-rounds", type=int, default=2)
    parser.add_argument("--url", default=None, help="a running serve (default: start a fresh one)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS / "live.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from served import start_serve

    load_before = os.getloadavg()
    served = None
    url = args.url
    if url is None:
        env = dict(item.split("=", 1) for item in args.serve_env)
        env.setdefault("WHISPER_TRITON_LIVE_MAX_SESSIONS", str(max(args.sessions) + 2))
        served = start_serve(Path(tempfile.mkdtemp(prefix="bench-live-")) / "serve.log", env)
        url = served.url
    try:
        summary = []
        for index, sessions in enumerate(args.sessions):
            results = asyncio.run(level(url.replace("http://", "ws://"), sessions, args.utterances, args.pause, index + 1))
            summary.append(summarize(sessions, results, args.held_p90))
            logging.info("%d sessions: %s", sessions, summary[-1])
        files = file_streaming(url, args.file_rounds, args.file_seconds) if args.file_rounds else None
    finally:
        if served is not None:
            served.stop()
    load_after = os.getloadavg()
    held = [row["sessions"] for row in summary if row["held"]]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model": "tiny.en (default)",
              "load_before": load_before, "load_after": load_after, "levels": summary,
              "highest_n_held": max(held) if held else 0, "file_streaming": files, "args": vars(args) | {"out": str(args.out)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    plot(summary, args.out.with_suffix(".png"))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} cores)")
    print("| sessions | utterances | completed | final p50 s | final p90 s | first delta p50 s | WER | held |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['sessions']} | {row['utterances']} | {row['completed']} | {fmt(row['final_p50_s'])} | "
              f"{fmt(row['final_p90_s'])} | {fmt(row['first_delta_p50_s'])} | {row['wer']:.3f} | {row['held']} |")
    print(f"highest N held in real time: {report['highest_n_held']}")
    if files:
        print(f"file of {files['file_seconds']} s: unstreamed {files['unstreamed_median_s']:.2f} s, streamed "
              f"{files['streamed_median_s']:.2f} s (ratio {files['ratio']:.2f}), first event "
              f"{files['first_event_median_s']:.2f} s")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
