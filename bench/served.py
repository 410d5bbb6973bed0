"""Served benchmark: HTTP `POST /invocations` to a fresh `serve` against faster-whisper's
`BatchedInferencePipeline` in-process, on the same model files, compute type, beam and batch size.

What it measures (paired, interleaved rounds; medians), with and without timestamps:
- a long file (espeak-ng sentences with pauses, ~279 s) and a set of short clips (~4 s each):
  wall time, RTF, WER, ours/theirs ratio, CPU time of all processes per audio second;
- Triton's statistics per model diffed around each request: executions, inferences, the batch
  sizes of the executions, queue and compute time; from them the stack's own time per audio second
  (end to end minus the compute time of `whisper_window`, the model that runs the engine);
- peak memory (RSS) of the whole served process tree (proxy, tritonserver, Python-backend stubs)
  and of the faster-whisper process, sampled while it runs;
- short-request overhead at concurrency 1, 8 concurrent short requests vs sequential, and
  fairness: a short clip sent while the long file is being transcribed vs alone.

Every request is cold: `whisper_window` keeps encoder outputs within one request only (its cache
is scoped to the request), so a round that sends the same file again pays for all of its work, as a
user's new file does (before 2026-12-07 repeated requests were answered from a cache kept across
requests, and the speed figures of that time were warm: see the README).

faster-whisper runs in its own worker process (its CPU time and memory are its own, and its
threads never share a process with the HTTP client). Prints a table, writes JSON and a PNG plot.
Not a test: no assertions. Linux only (/proc).

    .venv/bin/python bench/served.py            # or: make bench-served
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _path import ROOT  # the repository root, made importable

logger = logging.getLogger("whisper_triton.bench")

ENGINE_MODEL = "whisper_window"  # the Triton model that runs the engine: its compute time is the engine's
_STUB_MODELS = ("whisper_window", "whisper", "transcribe")
MODES = {"timestamps": False, "no timestamps": True}  # mode -> without_timestamps
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- audio ------------------------------------------------------------------------------------
@dataclass
class Clip:
    name: str
    body: bytes  # the file's bytes, as a client sends them
    seconds: float
    reference: str
    content_type: str


def encode_flac(samples: np.ndarray, rate: int = 16_000) -> bytes:
    """16-bit FLAC in memory (the long file as WAV would pass the proxy's default 6 MB body cap)."""
    import av

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="flac") as output:
        stream = output.add_stream("flac", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return buffer.getvalue()


def make_audio(folder: Path, sentences: int) -> tuple[Clip, list[Clip]]:
    """The long file (as bench/longform.py builds it) and one short clip per sentence."""
    from testkit.synthetic_speech import SENTENCES, long_recording, speak, spoken_sentences
    from whisper_triton.pipeline.audio import SAMPLE_RATE

    clips = spoken_sentences(folder)
    samples, reference, _ = long_recording(clips, list(SENTENCES), repeats=sentences)
    long = Clip("long", encode_flac(samples), samples.size / SAMPLE_RATE, reference, "audio/flac")
    shorts = [Clip(f"short{i}", speak(text, folder / f"short{i}.wav").read_bytes(), clip.size / SAMPLE_RATE, text,
                   "audio/wav") for i, (text, clip) in enumerate(zip(SENTENCES, clips))]
    return long, shorts


def window_count(body: bytes) -> int | None:
    """Windows the served pipeline cuts the file into with default options (VAD on, 30 s)."""
    try:
        from whisper_triton.pipeline.audio import decode_audio
        from whisper_triton.pipeline.longform import TranscribeOptions
        from whisper_triton.pipeline.segmenter import windows_from_speech
        from whisper_triton.pipeline.vad import speech_spans

        options = TranscribeOptions()
        vad = options.vad_options() if callable(options.vad_options) else options.vad_options
        return len(windows_from_speech(speech_spans(decode_audio(body), vad), options.chunk_length))
    except Exception as exc:  # the pipeline's layout may move; the figure is then left out
        logger.warning("could not count windows (%s)", exc)
        return None


# ---- processes: CPU time and memory from /proc ---------------------------------------------
def parse_stat(text: str) -> tuple[int, float]:
    """(ppid, utime + stime in seconds) from the text of /proc/<pid>/stat."""
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            text = _read(f"/proc/{entry}/stat")
            if text:
                children.setdefault(parse_stat(text)[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def role(pid: int) -> str:
    """What a process of the served tree is, from its command line."""
    cmdline = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
    if "triton_python_backend_stub" in cmdline:
        for model in _STUB_MODELS:
            if f"/{model}/" in cmdline:
                return f"stub:{model}"
        return "stub:other"
    if "tritonserver" in cmdline.split(" ")[0]:
        return "tritonserver"
    if "whisper_triton.supervisor.serve" in cmdline:
        return "proxy"
    return "other"


class ProcessSet:
    """CPU time and RSS of a process tree, by role."""

    def __init__(self, root: int, label: str | None = None):
        self.root = root
        self.label = label  # one role for the whole tree, else each process's own
        self._roles: dict[int, str] = {}

    def pids(self) -> list[int]:
        pids = process_tree(self.root)
        for pid in pids:
            if pid not in self._roles:
                self._roles[pid] = self.label or role(pid)
        return pids

    def cpu_seconds(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid in self.pids():
            text = _read(f"/proc/{pid}/stat")
            if text:
                totals[self._roles[pid]] = totals.get(self._roles[pid], 0.0) + parse_stat(text)[1]
        return totals

    def rss_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for pid in self.pids():
            text = _read(f"/proc/{pid}/statm")
            if text:
                totals[self._roles[pid]] = totals.get(self._roles[pid], 0) + int(text.split()[1]) * _PAGE
        return totals


def diff_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in sorted(set(before) | set(after))}


class MemorySampler(threading.Thread):
    """Peak RSS (sum over the tree, and per role) of each process set, sampled every `interval` s."""

    def __init__(self, sets: dict[str, ProcessSet], interval: float = 0.05):
        super().__init__(name="rss-sampler", daemon=True)
        self.sets = sets
        self.interval = interval
        self.peak_total: dict[str, int] = {name: 0 for name in sets}
        self.peak_by_role: dict[str, dict[str, int]] = {name: {} for name in sets}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for name, processes in self.sets.items():
            rss = processes.rss_bytes()
            self.peak_total[name] = max(self.peak_total[name], sum(rss.values()))
            peaks = self.peak_by_role[name]
            for key, value in rss.items():
                peaks[key] = max(peaks.get(key, 0), value)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def report(self) -> dict:
        mib = 1024 * 1024
        return {name: {"peak_total_mib": round(self.peak_total[name] / mib, 1),
                       "peak_by_role_mib": {k: round(v / mib, 1) for k, v in sorted(self.peak_by_role[name].items())}}
                for name in self.sets}


# ---- Triton statistics ------------------------------------------------------------------------
def stats_snapshot(raw: dict) -> dict[str, dict]:
    """Per model: executions, inferences, queue/compute ns and executions per batch size, from
    Triton's statistics extension (tritonclient.grpc's `as_json`: the same fields, 64-bit counts as strings)."""
    snapshot = {}
    for model in raw.get("model_stats", []):
        stats = model.get("inference_stats", {})
        batch_stats = model.get("batch_stats", [])
        batches = {int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0)) for b in batch_stats}
        snapshot[model["name"]] = {
            "executions": int(model.get("execution_count", 0)),
            "inferences": int(model.get("inference_count", 0)),
            "requests": int(stats.get("success", {}).get("count", 0)),
            "queue_ns": int(stats.get("queue", {}).get("ns", 0)),
            "compute_input_ns": int(stats.get("compute_input", {}).get("ns", 0)),
            "compute_infer_ns": int(stats.get("compute_infer", {}).get("ns", 0)),
            "compute_output_ns": int(stats.get("compute_output", {}).get("ns", 0)),
            # inference_stats count a batch's time once per request in it; batch_stats once per execution
            "execution_infer_ns": sum(int(b.get("compute_infer", {}).get("ns", 0)) for b in batch_stats),
            "batch_sizes": batches,
        }
    return snapshot


def diff_stats(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, now in after.items():
        then = before.get(name, {})
        row = {key: value - then.get(key, 0) for key, value in now.items() if key != "batch_sizes"}
        old = then.get("batch_sizes", {})
        row["batch_sizes"] = {size: count - old.get(size, 0) for size, count in sorted(now["batch_sizes"].items())
                              if count - old.get(size, 0) > 0}
        out[name] = row
    return out


def add_stats(total: dict[str, dict], part: dict[str, dict]) -> dict[str, dict]:
    for name, row in part.items():
        into = total.setdefault(name, {"batch_sizes": {}})
        for key, value in row.items():
            if key == "batch_sizes":
                for size, count in value.items():
                    into["batch_sizes"][size] = into["batch_sizes"].get(size, 0) + count
            else:
                into[key] = into.get(key, 0) + value
    return total


class TritonStats:
    """Triton's statistics over gRPC (serve starts Triton with its HTTP endpoint off)."""

    def __init__(self, grpc_port: int):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def snapshot(self) -> dict[str, dict]:
        return stats_snapshot(self.client.get_inference_statistics(as_json=True))

    def max_batch_size(self, model: str = ENGINE_MODEL) -> int:
        return int(self.client.get_model_config(model, as_json=True)["config"].get("max_batch_size", 0))


# ---- the served stack -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    triton_grpc_port: int
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start_serve(log_path: Path, extra_env: dict[str, str], timeout_s: float = 300) -> Served:
    import httpx

    ports = [free_port() for _ in range(4)]
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(ports[0]), WHISPER_TRITON_BIND_HOST="127.0.0.1",
               WHISPER_TRITON_TRITON_HTTP_PORT=str(ports[1]), WHISPER_TRITON_TRITON_GRPC_PORT=str(ports[2]),
               WHISPER_TRITON_TRITON_METRICS_PORT=str(ports[3]), **extra_env)
    process = subprocess.Popen([str(ROOT / "serve")], env=env, cwd=ROOT, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(process, f"http://127.0.0.1:{ports[0]}", ports[2], log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early with {process.returncode}; see {log_path}")
        try:
            if httpx.get(served.url + "/ping", timeout=2).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    served.stop()
    raise RuntimeError(f"serve was not ready within {timeout_s:.0f} s; see {log_path}")


def post(client, url: str, clip: Clip, without_timestamps: bool, options: dict | None = None) -> tuple[str, float]:
    params = dict(options or {}, **({"without_timestamps": "true"} if without_timestamps else {}))
    started = time.perf_counter()
    reply = client.post(url + "/invocations", content=clip.body, params=params,
                        headers={"Content-Type": clip.content_type, "Accept": "application/json"})
    elapsed = time.perf_counter() - started
    if reply.status_code != 200:
        raise RuntimeError(f"/invocations answered {reply.status_code}: {reply.text[:300]}")
    return reply.json()["text"], elapsed


# ---- faster-whisper in its own process --------------------------------------------------------
def _peer_worker(connection, model_dir: str, compute_type: str, threads: int, batch_size: int, beam_size: int,
                 clips: dict[str, bytes]) -> None:
    """Loads faster-whisper once, then transcribes named clips on request: (text, wall s, CPU s)."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=threads)
    pipeline = BatchedInferencePipeline(model)
    connection.send("ready")
    while True:
        message = connection.recv()
        if message is None:
            return
        name, without_timestamps = message
        started, cpu = time.perf_counter(), time.process_time()
        segments, _ = pipeline.transcribe(io.BytesIO(clips[name]), batch_size=batch_size, beam_size=beam_size,
                                          without_timestamps=without_timestamps, vad_filter=True, language="en")
        text = "".join(segment.text for segment in segments)  # segments are lazy: this runs the decode
        connection.send((text.strip(), time.perf_counter() - started, time.process_time() - cpu))


class Peer:
    def __init__(self, model_dir: Path, compute_type: str, threads: int, batch_size: int, beam_size: int,
                 clips: list[Clip]):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_peer_worker, daemon=True, name="faster-whisper", args=(
            child, str(model_dir), compute_type, threads, batch_size, beam_size, {c.name: c.body for c in clips}))
        self.process.start()
        if not self.connection.poll(300) or self.connection.recv() != "ready":
            raise RuntimeError("faster-whisper did not load within 300 s")

    def transcribe(self, clip: Clip, without_timestamps: bool) -> tuple[str, float, float]:
        self.connection.send((clip.name, without_timestamps))
        return self.connection.recv()

    def stop(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=30)


# ---- arithmetic -------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]): a value that was measured."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "p90": percentile(samples, 90), "all": list(samples)}


def wer_of(references: list[str], texts: list[str]) -> float:
    from whisper_triton.pipeline.evaluation import word_error_rate

    return word_error_rate(" ".join(references), " ".join(texts))


def ideal_executions(windows: int | None, max_batch_size: int) -> int | None:
    return None if windows is None or max_batch_size <= 0 else math.ceil(windows / max_batch_size)


@dataclass
class Sample:
    """One served request (or a set of them) measured from outside."""

    wall_s: float
    cpu_s: dict[str, float]  # by role of the served tree
    stats: dict[str, dict]  # Triton statistics diffed around it
    text: str = ""

    @property
    def engine_s(self) -> float:
        return self.stats.get(ENGINE_MODEL, {}).get("execution_infer_ns", 0) / 1e9

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def cpu_outside_engine_s(self) -> float:
        """CPU of every process but the engine model's stub (proxy, tritonserver, transcribe stubs)."""
        return sum(v for k, v in self.cpu_s.items() if k != f"stub:{ENGINE_MODEL}")


def served_row(samples: list[Sample], audio_seconds: float) -> dict:
    """Figures of one path over rounds: medians of wall, engine, own time, CPU per audio second."""
    wall = [s.wall_s for s in samples]
    own = [s.wall_s - s.engine_s for s in samples]
    cpu_by_role: dict[str, list[float]] = {}
    for s in samples:
        for key, value in s.cpu_s.items():
            cpu_by_role.setdefault(key, []).append(value)
    total_stats: dict[str, dict] = {}
    for s in samples:
        add_stats(total_stats, s.stats)
    per_round = {name: {key: (value / len(samples) if key != "batch_sizes" else
                              {size: count / len(samples) for size, count in value.items()})
                        for key, value in row.items()} for name, row in total_stats.items()}
    return {
        "wall_s": summary(wall),
        "rtf": statistics.median(wall) / audio_seconds,
        "engine_s_median": statistics.median(s.engine_s for s in samples),
        "own_wall_ms_per_audio_s": 1000 * statistics.median(own) / audio_seconds,
        "cpu_ms_per_audio_s": 1000 * statistics.median(s.cpu_total_s for s in samples) / audio_seconds,
        "own_cpu_ms_per_audio_s": 1000 * statistics.median(s.cpu_outside_engine_s for s in samples) / audio_seconds,
        "cpu_ms_per_audio_s_by_role": {k: 1000 * statistics.median(v) / audio_seconds for k, v in cpu_by_role.items()},
        "triton_per_round": per_round,
        "batch_sizes_each_round": [s.stats.get(ENGINE_MODEL, {}).get("batch_sizes", {}) for s in samples],
    }


def peer_row(walls: list[float], cpus: list[float], audio_seconds: float) -> dict:
    return {"wall_s": summary(walls), "rtf": statistics.median(walls) / audio_seconds,
            "cpu_ms_per_audio_s": 1000 * statistics.median(cpus) / audio_seconds}


# ---- the runs ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, served: Served, peer: Peer | None, long: Clip, shorts: list[Clip]):
        import httpx

        self.args, self.served, self.peer, self.long, self.shorts = args, served, peer, long, shorts
        self.tree = ProcessSet(served.process.pid)
        self.stats = TritonStats(served.triton_grpc_port)
        self.client = httpx.Client(timeout=3600)
        self.options = {"beam_size": str(args.beam_size), "batch_size": str(args.batch_size)}

    def post(self, clip: Clip, without_timestamps: bool, client=None) -> tuple[str, float]:
        return post(client or self.client, self.served.url, clip, without_timestamps, self.options)

    def measure(self, action) -> Sample:
        """Runs `action` (-> text, wall s) and diffs CPU and Triton statistics around it."""
        stats, cpu = self.stats.snapshot(), self.tree.cpu_seconds()
        text, wall = action()
        time.sleep(self.args.settle_s)  # Triton records statistics just after it answers
        return Sample(wall, diff_cpu(cpu, self.tree.cpu_seconds()), diff_stats(stats, self.stats.snapshot()), text)

    def ours(self, clip: Clip, without_timestamps: bool) -> Sample:
        return self.measure(lambda: self.post(clip, without_timestamps))

    def ours_set(self, clips: list[Clip], without_timestamps: bool) -> list[Sample]:
        return [self.ours(clip, without_timestamps) for clip in clips]

    def rounds(self) -> dict:
        """Paired, interleaved rounds: ours and theirs alternate, in both orders, on every input."""
        modes = {name: MODES[name] for name in self.args.modes}
        results = {}
        for name, without in modes.items():  # warm-up every path once
            self.post(self.long, without)
            self.post(self.shorts[0], without)
            if self.peer:
                self.peer.transcribe(self.long, without)
                self.peer.transcribe(self.shorts[0], without)
            results[name] = {"long": {"ours": [], "theirs": []}, "short": {"ours": [], "theirs": []}}
        for round_ in range(self.args.rounds):
            for name, without in modes.items():
                if "long" in self.args.parts:
                    self._pair(results[name]["long"], [self.long], without, ours_first=round_ % 2 == 0)
                if "short" in self.args.parts:
                    self._pair(results[name]["short"], self.shorts, without, ours_first=round_ % 2 == 1)
            logger.warning("round %d of %d done", round_ + 1, self.args.rounds)
        return results

    def _pair(self, into: dict, clips: list[Clip], without: bool, ours_first: bool) -> None:
        def theirs() -> None:
            if self.peer:
                into["theirs"].append([self.peer.transcribe(clip, without) for clip in clips])

        if not ours_first:
            theirs()
        into["ours"].append(self.ours_set(clips, without))
        if ours_first:
            theirs()

    def concurrency(self, requests: int) -> dict:
        """`requests` short clips one after another, then all at once (ours)."""
        import httpx

        clips = [self.shorts[i % len(self.shorts)] for i in range(requests)]
        sequential, concurrent = [], []
        for _ in range(self.args.rounds):
            started = time.perf_counter()
            for clip in clips:
                self.post(clip, False)
            sequential.append(time.perf_counter() - started)
            def one(clip: Clip) -> float:
                with httpx.Client(timeout=600) as client:
                    return self.post(clip, False, client)[1]

            stats = self.stats.snapshot()
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=requests) as pool:
                list(pool.map(one, clips))
            concurrent.append(time.perf_counter() - started)
            time.sleep(self.args.settle_s)
            batches = diff_stats(stats, self.stats.snapshot()).get(ENGINE_MODEL, {}).get("batch_sizes", {})
        return {"requests": requests, "sequential_s": summary(sequential), "concurrent_s": summary(concurrent),
                "speedup": statistics.median(sequential) / statistics.median(concurrent),
                "engine_batch_sizes_last_concurrent": batches}

    def fairness(self, tries: int, long_estimate_s: float) -> dict:
        """A short clip sent while the long file is being transcribed, at offsets spread over it;
        each try also times the short clip and the long file alone (paired: noise hits all alike)."""
        import httpx

        short = self.shorts[0]
        alone, during, long_alone, long_with = [], [], [], []
        for attempt in range(tries):
            alone.append(self.post(short, False)[1])
            long_alone.append(self.post(self.long, False)[1])
            holder: dict = {}

            def long_request() -> None:
                with httpx.Client(timeout=3600) as client:
                    holder["wall"] = self.post(self.long, False, client)[1]

            thread = threading.Thread(target=long_request)
            thread.start()
            time.sleep(0.1 + 0.8 * long_estimate_s * (attempt + 0.5) / tries)
            during.append(self.post(short, False)[1])
            thread.join(timeout=3600)
            long_with.append(holder.get("wall", float("nan")))
        return {"tries": tries, "short_alone_s": summary(alone), "short_during_long_s": summary(during),
                "p90_ratio": percentile(during, 90) / statistics.median(alone),
                "long_alone_s": summary(long_alone), "long_with_short_s": summary(long_with),
                "long_slowdown": statistics.median(w / a for w, a in zip(long_with, long_alone))}


def run(args: argparse.Namespace) -> dict:
    from whisper_triton.settings import load_settings

    folder = Path(tempfile.mkdtemp(prefix="bench-served-"))
    long, shorts = make_audio(folder, args.sentences)
    settings = load_settings()
    model_dir = Path(args.model_dir) if args.model_dir else settings.resolved_model_dir()
    threads = args.cpu_threads or (os.cpu_count() or 1)
    env = {"WHISPER_TRITON_COMPUTE_TYPE": args.compute_type, "WHISPER_TRITON_MODEL_DIR": str(model_dir),
           "WHISPER_TRITON_CPU_THREADS": str(threads)}
    env.update(dict(item.split("=", 1) for item in args.serve_env))
    windows = window_count(long.body)
    logger.warning("long file %.1f s (%d windows), %d short clips; starting serve and faster-whisper",
                   long.seconds, windows or -1, len(shorts))
    served = start_serve(folder / "serve.log", env)
    peer = None
    sampler = None
    try:
        peer = Peer(model_dir, args.compute_type, threads, args.batch_size, args.beam_size, [long, *shorts]) \
            if not args.no_peer else None
        bench = Bench(args, served, peer, long, shorts)
        sets = {"served": bench.tree}
        if peer:
            sets["faster-whisper"] = ProcessSet(peer.process.pid, "faster-whisper")
        sampler = MemorySampler(sets)
        sampler.start()
        max_batch = bench.stats.max_batch_size()
        results = bench.rounds()
        report = {"long_seconds": long.seconds, "short_seconds": sum(c.seconds for c in shorts),
                  "short_clips": len(shorts), "windows": windows, "engine_max_batch_size": max_batch,
                  "ideal_first_round_executions": ideal_executions(windows, max_batch), "modes": {}}
        for mode, parts in results.items():
            report["modes"][mode] = mode_report(parts, long, shorts)
        timestamps = report["modes"].get("timestamps", {}).get("long")
        long_alone = timestamps["ours"]["wall_s"]["median"] if timestamps else None
        if "concurrency" in args.parts:
            report["concurrency"] = bench.concurrency(args.concurrent)
        if "fairness" in args.parts:
            long_alone = long_alone or bench.post(long, False)[1]
            report["fairness"] = bench.fairness(args.tries, long_alone)
        sampler.stop()
        report["memory"] = sampler.report()
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if peer:
            peer.stop()
        served.stop()
    load = os.getloadavg()
    report["settings"] = {"compute_type": args.compute_type, "beam_size": args.beam_size, "batch_size": args.batch_size,
                          "threads": threads, "rounds": args.rounds, "model_dir": str(model_dir),
                          "serve_env": args.serve_env}
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(), "loadavg_at_end": [round(v, 2) for v in load]}
    return report


def mode_report(parts: dict, long: Clip, shorts: list[Clip]) -> dict:
    out = {}
    for part, clips in (("long", [long]), ("short", shorts)):
        ours_rounds, theirs_rounds = parts[part]["ours"], parts[part]["theirs"]
        if not ours_rounds:
            continue
        seconds = sum(c.seconds for c in clips)
        references = [c.reference for c in clips]
        # a round of the short set counts as one sample: its walls, CPU and statistics summed
        samples = [Sample(sum(s.wall_s for s in r), _sum_cpu(r), _sum_stats(r), " ".join(s.text for s in r))
                   for r in ours_rounds]
        row = {"ours": served_row(samples, seconds)}
        row["ours"]["wer"] = wer_of(references, [s.text for s in ours_rounds[-1]])
        if part == "short":
            per_request = [s.wall_s - s.engine_s for r in ours_rounds for s in r]
            row["ours"]["overhead_ms_per_request"] = summary([1000 * v for v in per_request])
            row["ours"]["latency_ms_per_request"] = summary([1000 * s.wall_s for r in ours_rounds for s in r])
        if theirs_rounds:
            row["theirs"] = peer_row([sum(t[1] for t in r) for r in theirs_rounds],
                                     [sum(t[2] for t in r) for r in theirs_rounds], seconds)
            row["theirs"]["wer"] = wer_of(references, [t[0] for t in theirs_rounds[-1]])
            # paired: ratio of each round's walls, then the median
            row["ratio"] = statistics.median(
                o.wall_s / sum(t[1] for t in r) for o, r in zip(samples, theirs_rounds))
            row["wer_delta_points"] = 100 * (row["ours"]["wer"] - row["theirs"]["wer"])
        out[part] = row
    return out


def _sum_cpu(samples: list[Sample]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in samples:
        for key, value in s.cpu_s.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _sum_stats(samples: list[Sample]) -> dict[str, dict]:
    total: dict[str, dict] = {}
    for s in samples:
        add_stats(total, s.stats)
    return total


# ---- output -----------------------------------------------------------------------------------
def table_rows(report: dict) -> list[list[str]]:
    """The main table: one row per mode and input."""
    rows = []
    for mode, parts in report["modes"].items():
        for part, row in parts.items():
            ours, theirs = row["ours"], row.get("theirs")
            engine = ours["triton_per_round"].get(ENGINE_MODEL, {})
            batches = ",".join(f"{size}x{count:g}" for size, count in sorted(engine.get("batch_sizes", {}).items()))
            rows.append([
                f"{part}, {mode}",
                f"{ours['wall_s']['median']:.2f}", f"{theirs['wall_s']['median']:.2f}" if theirs else "-",
                f"{row['ratio']:.2f}x" if theirs else "-",
                f"{ours['rtf']:.4f}", f"{theirs['rtf']:.4f}" if theirs else "-",
                f"{100 * ours['wer']:.1f}", f"{100 * theirs['wer']:.1f}" if theirs else "-",
                f"{ours['cpu_ms_per_audio_s']:.1f}", f"{theirs['cpu_ms_per_audio_s']:.1f}" if theirs else "-",
                f"{ours['own_wall_ms_per_audio_s']:.1f}", f"{ours['own_cpu_ms_per_audio_s']:.1f}",
                f"{engine.get('executions', 0):g}/{engine.get('inferences', 0):g}", batches,
            ])
    return rows


HEADERS = ["input, mode", "ours s", "fw s", "ours/fw", "ours RTF", "fw RTF", "ours WER %", "fw WER %",
           "ours CPU ms/s", "fw CPU ms/s", "own wall ms/s", "own CPU ms/s", "engine exec/rows", "batch size x execs"]


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220)
    settings = report["settings"]
    table = Table(title=f"Served vs faster-whisper batched: {report['long_seconds']:.0f} s file "
                        f"({report['windows']} windows, ideal first round {report['ideal_first_round_executions']} "
                        f"executions at max batch {report['engine_max_batch_size']}), {report['short_clips']} short "
                        f"clips ({report['short_seconds']:.0f} s); {settings['compute_type']}, beam "
                        f"{settings['beam_size']}, batch {settings['batch_size']}, {settings['threads']} threads; "
                        f"median of {settings['rounds']} paired rounds (per round for Triton figures)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "input, mode" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    for mode, parts in report["modes"].items():
        short = parts.get("short", {}).get("ours")
        if short:
            console.print(f"short requests, {mode}: latency median {short['latency_ms_per_request']['median']:.0f} ms, "
                          f"overhead (end to end - engine compute) median "
                          f"{short['overhead_ms_per_request']['median']:.1f} ms, p90 "
                          f"{short['overhead_ms_per_request']['p90']:.1f} ms")
        long = parts.get("long", {}).get("ours")
        if long:
            engine = long["triton_per_round"].get(ENGINE_MODEL, {})
            console.print(f"long, {mode}: engine compute {long['engine_s_median']:.2f} s per round (executions), queue "
                          f"{engine.get('queue_ns', 0) / max(1, engine.get('inferences', 1)) / 1e6:.0f} ms per row")
            roles = ", ".join(f"{k} {v:.1f}" for k, v in long["cpu_ms_per_audio_s_by_role"].items())
            console.print(f"long, {mode}: CPU ms per audio s by process: {roles}; engine batch sizes each round: "
                          f"{long['batch_sizes_each_round']}")
    if "concurrency" in report:
        c = report["concurrency"]
        console.print(f"{c['requests']} short requests: sequential {c['sequential_s']['median']:.2f} s, concurrent "
                      f"{c['concurrent_s']['median']:.2f} s: {c['speedup']:.2f}x throughput; engine batches "
                      f"{c['engine_batch_sizes_last_concurrent']}")
    if "fairness" in report:
        f = report["fairness"]
        console.print(f"fairness: short alone median {f['short_alone_s']['median']:.2f} s, during the long file p90 "
                      f"{f['short_during_long_s']['p90']:.2f} s ({f['p90_ratio']:.2f}x; all "
                      f"{[round(v, 2) for v in f['short_during_long_s']['all']]}); long file with it "
                      f"{f['long_slowdown']:.2f}x alone")
    for name, memory in report.get("memory", {}).items():
        console.print(f"peak RSS {name}: {memory['peak_total_mib']:.0f} MiB {memory['peak_by_role_mib']}")
    console.print(f"machine: {report['machine']}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ours, theirs, ours_cpu, theirs_cpu = [], [], [], [], []
    for mode, parts in report["modes"].items():
        for part, row in parts.items():
            labels.append(f"{part}\n{mode}")
            ours.append(row["ours"]["rtf"])
            theirs.append(row.get("theirs", {}).get("rtf", 0.0))
            ours_cpu.append(row["ours"]["cpu_ms_per_audio_s"])
            theirs_cpu.append(row.get("theirs", {}).get("cpu_ms_per_audio_s", 0.0))
    x = np.arange(len(labels))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, a, b, title in ((left, ours, theirs, "real-time factor (wall / audio s), lower is faster"),
                              (right, ours_cpu, theirs_cpu, "CPU ms per audio second, all processes")):
        axis.bar(x - 0.2, a, 0.4, label="served (HTTP /invocations)")
        axis.bar(x + 0.2, b, 0.4, label="faster-whisper batched, in-process")
        axis.set_xticks(x, labels)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=60, help="sentences in the long file (60: ~279 s)")
    parser.add_argument("--model-dir", help="CTranslate2 Whisper directory (default: the embedded tiny.en)")
    parser.add_argument("--compute-type", default="float32")
    parser.add_argument("--beam-size", type=int, default=1, help="beam of both")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch, both")
    parser.add_argument("--cpu-threads", type=int, default=0, help="engine threads of both (0: one per core)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--parts", nargs="+", choices=["long", "short", "concurrency", "fairness"],
                        default=["long", "short", "concurrency", "fairness"])
    parser.add_argument("--concurrent", type=int, default=8, help="short requests sent at once")
    parser.add_argument("--tries", type=int, default=5, help="fairness tries (p90 over them)")
    parser.add_argument("--settle-s", type=float, default=0.1, help="wait before reading Triton statistics")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for serve (e.g. WHISPER_TRITON_MODEL_REPOSITORY=...)")
    parser.add_argument("--no-peer", action="store_true", help="served figures only")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "served.json"))
    args = parser.parse_args(argv)
    report = run(args)
    print_report(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output.with_suffix(".png"))
    logger.warning("wrote %s and %s", output, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
