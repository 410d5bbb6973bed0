"""Overload benchmark (issue 21): a burst of concurrent long files at a fresh `serve` (tiny.en,
default settings), as a SageMaker real-time endpoint would get it. SageMaker gives an invocation
60 s: an endpoint should answer within it or refuse at once (503 + Retry-After, which SageMaker and
its callers retry), never let everything time out.

Per request: the HTTP status (or `timeout` when no answer came within the client's limit), the time
to the answer, Retry-After, and the reason the refusal names. Summary: served within 60 s, served
later, refused (and how long a refusal took), timed out. Prints a table, writes JSON and the table to
bench/results/overload-<label>.{json,txt}. Not a test: no assertions.

    .venv/bin/python bench/overload.py --label after
    # the code of another checkout (e.g. main's, for the figure before), with this checkout's .venv:
    .venv/bin/python bench/overload.py --label before --root /tmp/main-checkout
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from _path import ROOT  # the repository root, made importable
from testkit.serve_process import start_serve, stop_serve

logger = logging.getLogger("bench.overload")
RESULTS = ROOT / "bench" / "results"
SAGEMAKER_LIMIT_S = 60.0


@dataclass
class Outcome:
    index: int
    status: str  # "200", "503", ..., or "timeout" / "error"
    seconds: float  # from the burst's start to the answer (or to the client giving up)
    retry_after: str | None = None
    reason: str | None = None
    words: int = 0


def long_file(folder: Path, sentences: int, warmup_s: float) -> tuple[bytes, float, bytes]:
    """The long file of bench/served.py (espeak-ng sentences with pauses, FLAC; 60 sentences: 305 s
    with today's espeak-ng voices), and its first `warmup_s` seconds."""
    from served import encode_flac
    from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences

    samples, _, _ = long_recording(spoken_sentences(folder), list(SENTENCES), repeats=sentences)
    return encode_flac(samples), samples.size / 16_000, encode_flac(samples[: int(warmup_s * 16_000)])


def warm_up(url: str, body: bytes) -> dict:
    """One request alone before the burst, as an endpoint in service has answered some: the server has
    measured its speed (before this change nothing used it; the same request is sent either way)."""
    import httpx

    begin = time.perf_counter()
    reply = httpx.post(url + "/invocations", content=body, headers={"Content-Type": "audio/flac"}, timeout=600)
    return {"status": reply.status_code, "seconds": round(time.perf_counter() - begin, 2)}


def burst(url: str, body: bytes, requests: int, client_timeout_s: float) -> list[Outcome]:
    import httpx

    ready = threading.Barrier(requests)
    started = [0.0]

    def one(index: int) -> Outcome:
        ready.wait()
        if index == 0:
            started[0] = time.perf_counter()
        begin = time.perf_counter()
        try:
            reply = httpx.post(url + "/invocations", content=body, headers={"Content-Type": "audio/flac"},
                               timeout=client_timeout_s)
        except httpx.TimeoutException:
            return Outcome(index, "timeout", time.perf_counter() - begin)
        except httpx.HTTPError as exc:
            return Outcome(index, f"error: {type(exc).__name__}", time.perf_counter() - begin)
        elapsed = time.perf_counter() - begin
        outcome = Outcome(index, str(reply.status_code), elapsed, reply.headers.get("retry-after"))
        try:
            payload = reply.json()
        except ValueError:
            payload = {}
        if reply.status_code == 200:
            outcome.words = len(str(payload.get("text", "")).split())
        else:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            outcome.reason = error.get("reason") or str(error.get("message", ""))[:120]
        return outcome

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(one, range(requests)))


def summary(outcomes: list[Outcome]) -> dict:
    served = [o for o in outcomes if o.status == "200"]
    refused = [o for o in outcomes if o.status in ("429", "503")]
    timed_out = [o for o in outcomes if o.status == "timeout"]
    return {
        "requests": len(outcomes),
        "served_within_60s": sum(o.seconds <= SAGEMAKER_LIMIT_S for o in served),
        "served_after_60s": sum(o.seconds > SAGEMAKER_LIMIT_S for o in served),
        "refused": len(refused),
        "refused_max_s": round(max((o.seconds for o in refused), default=0.0), 2),
        "refused_median_s": round(statistics.median([o.seconds for o in refused]), 2) if refused else None,
        "timed_out": len(timed_out),
        "other": len(outcomes) - len(served) - len(refused) - len(timed_out),
        "served_max_s": round(max((o.seconds for o in served), default=0.0), 2),
        "retry_after_s": sorted({o.retry_after for o in refused if o.retry_after}),
    }


def table(label: str, outcomes: list[Outcome], totals: dict, audio_s: float, client_timeout_s: float) -> str:
    lines = [f"overload burst ({label}): {totals['requests']} concurrent POST /invocations of {audio_s:.0f} s FLAC, "
             f"client timeout {client_timeout_s:.0f} s",
             f"{'#':>3} {'status':>8} {'seconds':>8} {'retry-after':>11}  reason / words"]
    for o in sorted(outcomes, key=lambda o: o.seconds):
        lines.append(f"{o.index:>3} {o.status:>8} {o.seconds:>8.2f} {o.retry_after or '-':>11}  "
                     f"{o.reason or (str(o.words) + ' words' if o.status == '200' else '')}")
    lines.append(f"served within 60 s: {totals['served_within_60s']}, served after 60 s: {totals['served_after_60s']}, "
                 f"refused: {totals['refused']} (at most {totals['refused_max_s']} s to the refusal), "
                 f"timed out: {totals['timed_out']}, other: {totals['other']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=60, help="sentences in the long file (60: ~279 s)")
    parser.add_argument("--client-timeout", type=float, default=120.0, help="how long a client waits for its answer")
    parser.add_argument("--warmup-seconds", type=float, default=60.0,
                        help="one request of the file's first seconds alone before the burst (0: none)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code serves (default: this one)")
    parser.add_argument("--label", default="after", help="names the result files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        folder = Path(tmp)
        body, audio_s, warmup_body = long_file(folder, args.sentences, args.warmup_seconds)
        logger.info("long file: %.0f s, %d bytes; starting serve from %s", audio_s, len(body), args.root)
        process, url = start_serve(RESULTS / f"overload-{args.label}-serve.log", root=args.root.resolve())
        try:
            warmup = warm_up(url, warmup_body) if args.warmup_seconds > 0 else None
            logger.info("warm-up: %s", warmup)
            outcomes = burst(url, body, args.requests, args.client_timeout)
        finally:
            stop_serve(process)
    totals = summary(outcomes)
    text = table(args.label, outcomes, totals, audio_s, args.client_timeout)
    text += f"\nwarm-up before the burst ({args.warmup_seconds:.0f} s alone): {warmup}; load average at the end: " \
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
    print(text)
    (RESULTS / f"overload-{args.label}.txt").write_text(text + "\n")
    (RESULTS / f"overload-{args.label}.json").write_text(json.dumps({
        "label": args.label, "root": str(args.root), "audio_seconds": audio_s, "bytes": len(body),
        "client_timeout_s": args.client_timeout, "warmup": warmup, "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "summary": totals, "requests": [asdict(o) for o in outcomes],
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
