"""Several models on one endpoint: what a second, third, fourth model costs a fresh `serve`.

What it measures (Linux /proc; the serve tree is proxy + tritonserver + every Python-backend stub):
- cold load time per model: the first request that names a model, end to end (render, Triton load,
  the engine's weights, the request itself), against the same request once it is loaded;
- requests per second with 1, 2 and 4 models in rotation (request i names model i mod k) at a fixed
  concurrency, against one model alone; the models are hard-linked copies of the same CTranslate2
  weights under different ids, so every request costs the same engine work and the difference is
  what serving several models costs (one engine model and stub per model, shared scheduler);
- peak memory (RSS) of the serve tree with 1, 2, 3, 4 models loaded, and the measured RSS of each
  engine model's stub (what /v1/models reports) beside the registry's budget estimate.
Every request is cold: each clip is a different sentence at a different gain, never sent before.
Rounds are interleaved (k = 1, 2, 4, 1, 2, 4, ...); medians. Not a test: no assertions.

    .venv/bin/python bench/models.py [--rounds 3] [--requests 16] [--concurrency 4] [--base]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _path import ROOT
from served import ProcessSet, encode_flac, start_serve

logger = logging.getLogger("whisper_triton.bench.models")
KS = (1, 2, 4)


def model_copies(folder: Path, source: Path, count: int) -> dict[str, Path]:
    """`count` ids for the same weights (hard links: no disk, separate engine instances when loaded)."""
    copies = {}
    for index in range(count):
        target = folder / f"copy-{index}"
        target.mkdir()
        for path in source.iterdir():
            if path.is_file():
                os.link(path, target / path.name)
        copies[f"copy-{index}"] = target
    return copies


class ColdClips:
    """Cold requests: espeak-ng sentences, each at a gain never used before (the encoder cache and any
    other cache keyed by the samples sees new audio every time)."""

    def __init__(self, folder: Path):
        from testkit.synthetic_speech import spoken_sentences

        folder.mkdir(parents=True, exist_ok=True)
        self.clips = spoken_sentences(folder)
        self.count = 0

    def next(self) -> tuple[bytes, float]:
        samples = self.clips[self.count % len(self.clips)] * (0.5 + 0.4 * ((self.count * 0.618) % 1.0))
        self.count += 1
        return encode_flac(samples.astype(np.float32)), samples.size / 16_000


def post(client, url: str, body: bytes, model: str | None) -> float:
    started = time.perf_counter()
    reply = client.post(url + "/invocations", content=body, params={"model": model} if model else {},
                        headers={"Content-Type": "audio/flac"})
    if reply.status_code != 200:
        raise RuntimeError(f"/invocations ({model}) answered {reply.status_code}: {reply.text[:300]}")
    return time.perf_counter() - started


def tree_rss_mb(served) -> float:
    return sum(ProcessSet(served.process.pid).rss_bytes().values()) / 2**20


def statuses(client, url: str) -> dict[str, dict]:
    return {c["id"]: c.get("status") for c in client.get(url + "/v1/models").json()["data"] if c.get("status")}


def run(args: argparse.Namespace) -> dict:
    import httpx

    from whisper_triton.contract.models import ManifestModel, RegistryManifest
    from whisper_triton.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    tiny = load_settings().resolved_model_dir()
    copies = model_copies(work, tiny, max(KS))
    entries = [ManifestModel(id=name, path=str(path)) for name, path in copies.items()]
    if args.base:
        from testkit.real_models import whisper_base_dir

        entries.append(ManifestModel(id="whisper-base", path=str(whisper_base_dir())))
    RegistryManifest(default="copy-0", models=entries).save(work)
    served = start_serve(work / "serve.log", {"WHISPER_TRITON_MODEL_MANIFEST": str(work / "models.json")})
    clips = ColdClips(work / "clips")
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "date": time.strftime("%Y-%m-%d"), "concurrency": args.concurrency, "requests": args.requests}
    try:
        with httpx.Client(timeout=600) as client:
            url = served.url
            memory = {"loaded_1": tree_rss_mb(served)}
            loads = {}
            for name in [e.id for e in entries if e.id != "copy-0"]:
                cold = post(client, url, clips.next()[0], name)
                warm = post(client, url, clips.next()[0], name)
                loads[name] = {"first_request_s": round(cold, 2), "loaded_request_s": round(warm, 2),
                               "load_s": statuses(client, url)[name]["load_seconds"]}
                if name.startswith("copy-"):
                    memory[f"loaded_{int(name.split('-')[1]) + 1}"] = tree_rss_mb(served)
            report["cold_load"] = loads
            report["tree_rss_mb"] = {k: round(v) for k, v in memory.items()}
            report["per_model"] = {name: {"budget_estimate_mb": s["memory_mb"], "stub_rss_mb": s["rss_mb"]}
                                   for name, s in statuses(client, url).items()}
            rates: dict[int, list[float]] = {k: [] for k in KS}
            for _ in range(args.rounds):
                for k in KS:
                    jobs = [(clips.next()[0], f"copy-{i % k}") for i in range(args.requests)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(args.concurrency) as pool:
                        list(pool.map(lambda job: post(client, url, job[0], job[1]), jobs))
                    rates[k].append(args.requests / (time.perf_counter() - started))
            report["requests_per_s"] = {f"{k}_models": round(statistics.median(v), 3) for k, v in rates.items()}
            report["relative_to_one_model"] = {f"{k}_models": round(statistics.median(rates[k]) /
                                                                    statistics.median(rates[1]), 3) for k in KS}
    finally:
        served.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="requests per round and model count")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--base", action="store_true", help="also time the cold load of the multilingual base")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "models.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    report = run(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':<14} {'first request s':>16} {'loaded request s':>17} {'load s':>7}")
    for name, row in report["cold_load"].items():
        print(f"{name:<14} {row['first_request_s']:>16} {row['loaded_request_s']:>17} {row['load_s']:>7}")
    print(f"requests/s at concurrency {report['concurrency']}: " + ", ".join(
        f"{k}: {v} ({report['relative_to_one_model'][k]}x)" for k, v in report["requests_per_s"].items()))
    print("serve tree RSS MB by models loaded: " + ", ".join(f"{k}: {v}" for k, v in report["tree_rss_mb"].items()))
    print("per model (budget estimate / stub RSS MB): " + ", ".join(
        f"{k}: {v['budget_estimate_mb']}/{v['stub_rss_mb']}" for k, v in report["per_model"].items()))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
