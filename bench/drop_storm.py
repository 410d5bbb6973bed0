"""A storm of dropped streams: N streamed long requests whose clients close the connection right after
sending the body, against a fresh `serve` (started here, defaults). Measures the RSS of serve's whole
process tree (proxy, tritonserver, Python-backend stubs; psutil over serve's children) before the
storm, at its peak and once the server is idle again, the windows the engine decoded for requests
nobody reads, and checks that a normal request is served afterwards. Not a test
(tests/test_cancellation.py asserts on counts); the figure goes to docs/hardening.md.

    .venv/bin/python bench/drop_storm.py --requests 60 --minutes 10

The machine may be shared: CPU contention changes how long the storm takes, not what it leaves behind."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable
from testkit.serve_process import inference_count, start_serve, stop_serve, tree_cpu_seconds, tree_rss_mb

from served import ProcessSet
from soak import encode
from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences

logger = logging.getLogger("whisper_triton.bench.drop_storm")


def long_opus(folder: Path, minutes: float) -> bytes:
    """About `minutes` of synthetic speech with pauses, as Ogg Opus (under the default 6 MB body bound)."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = spoken_sentences(folder)
    samples, _, _ = long_recording(clips, SENTENCES[: len(clips)])
    repeats = int(np.ceil(minutes * 60 * 16000 / samples.size))
    return encode(np.tile(samples, repeats)[: int(minutes * 60 * 16000)], "ogg", "libopus", 48000)


def dropped_stream(port: int, body: bytes, index: int, when: str = "sent") -> None:
    """POST a streamed request (JSON lines) and close the connection: as soon as the body is sent
    (`sent`: the proxy may not have read it all yet, and stops reading), or once the answer has begun
    (`answered`: the body was read whole, admitted and its decoding started; the answer's first
    bytes, a 503 refusal's included, within 120 s)."""
    head = (f"POST /invocations?stream=true HTTP/1.1\r\nHost: x\r\nContent-Type: audio/ogg\r\n"
            f"Accept: application/jsonlines\r\nX-Request-Id: dropped-{index}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head.encode() + body)
        if when == "answered":
            try:
                sock.recv(1)
            except OSError:
                pass


def wait_idle(pid: int, quiet_s: float = 5.0, timeout_s: float = 600.0) -> float:
    """Seconds until serve's tree used under 0.3 CPU-seconds in each of `quiet_s` seconds (bounded)."""
    started = time.monotonic()
    quiet_since, last = time.monotonic(), tree_cpu_seconds(pid)
    while time.monotonic() - started < timeout_s:
        time.sleep(1.0)
        now = tree_cpu_seconds(pid)
        if now - last > 0.3:
            quiet_since = time.monotonic()
        last = now
        if time.monotonic() - quiet_since >= quiet_s:
            return round(time.monotonic() - started - quiet_s, 1)
    return float("nan")


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self.stop.wait(self.every_s)


def storm(process, url: str, body: bytes, requests: int, short: bytes, when: str = "sent") -> dict:
    port = int(url.rsplit(":", 1)[1])
    urllib.request.urlopen(urllib.request.Request(url + "/invocations", data=short,
                                                  headers={"Content-Type": "audio/ogg"}), timeout=300).read()
    wait_idle(process.pid)
    baseline = tree_rss_mb(process.pid)
    roles = ProcessSet(process.pid)
    baseline_by_role = roles.rss_bytes()
    windows_before = inference_count(process, "whisper_window")
    sampler = PeakSampler(process.pid)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=dropped_stream, args=(port, body, i, when)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    sent_s = time.monotonic() - started
    idle_after_s = wait_idle(process.pid)
    sampler.stop.set()
    sampler.join(5)
    after = tree_rss_mb(process.pid)
    after_by_role = roles.rss_bytes()
    by_role = {role: [round(baseline_by_role.get(role, 0) / 2**20), round(after_by_role.get(role, 0) / 2**20)]
               for role in sorted(set(baseline_by_role) | set(after_by_role))}
    windows = inference_count(process, "whisper_window") - windows_before
    with urllib.request.urlopen(urllib.request.Request(url + "/invocations", data=short,
                                                       headers={"Content-Type": "audio/ogg"}), timeout=300) as reply:
        served_after = reply.status
    return {"requests": requests, "drop": when, "body_bytes": len(body), "baseline_mb": round(baseline), "peak_mb": round(sampler.peak),
            "after_mb": round(after), "growth_mb": round(after - baseline), "windows_decoded": windows,
            "sent_s": round(sent_s, 1), "idle_after_s": idle_after_s, "served_after": served_after,
            "mb_by_role_before_after": by_role}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--minutes", type=float, default=10.0, help="audio minutes of each dropped request")
    parser.add_argument("--drop", choices=("sent", "answered"), default="sent",
                        help="close each connection once its body is sent, or once its answer has begun")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body = long_opus(args.out / f"drop-storm-{stamp}", args.minutes)
    short = long_opus(args.out / f"drop-storm-{stamp}", 0.1)
    process, url = start_serve(args.out / f"drop-storm-{stamp}-serve.log")
    try:
        report = storm(process, url, body, args.requests, short, args.drop)
    finally:
        stop_serve(process)
    print(json.dumps(report, indent=1))
    print(f"serve tree RSS: {report['baseline_mb']} MB before, {report['peak_mb']} MB at peak, "
          f"{report['after_mb']} MB after ({report['growth_mb']:+d} MB); {report['windows_decoded']} windows decoded "
          f"for {args.requests} dropped streams; a request after: {report['served_after']}")
    (args.out / f"drop-storm-{stamp}.json").write_text(json.dumps(report, indent=1))
    return 0 if report["served_after"] == 200 else 1


if __name__ == "__main__":
    raise SystemExit(main())
