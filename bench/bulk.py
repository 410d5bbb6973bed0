"""Bulk benchmark: `whisper-transcribe-bucket` on the local stack (moto S3 + control plane, the runtime
emulator, a fresh `serve`), and the planning table for 1,000 audio hours it feeds.

    .venv/bin/python bench/bulk.py [--files 24] [--vias local transform] [--model-dir DIR] [--concurrency 4]

A corpus of espeak-ng speech (files of 2 to 9 sentences with pauses, FLAC and MP3) is put in S3,
then transcribed bucket to bucket once per `--via`, each into its own output prefix, cold (no file
sent twice). Per via: files, audio seconds, wall seconds of the whole command (listing, probing,
transcription, writing four formats per file, manifest), RTFx = audio / wall, WER over the corpus.
The table for 1,000 audio hours uses the best measured RTFx for the CPU rows and, for the ml.g5
rows, the GPU figure given (`--gpu-rtfx`, default an ESTIMATE that no GPU has confirmed), plus hosted
APIs at their published prices. Writes bench/results/bulk.json; the load average is recorded with
it (other work on the machine slows the CPU figures). Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _path import ROOT  # the repository root, made importable
from served import free_port, start_serve

logger = logging.getLogger("whisper_triton.bench.bulk")
BUCKET_IN, BUCKET_OUT = "bench-audio", "bench-text"
HOURS = 1000.0


def corpus(folder: Path, files: int, prefix: str, offset: int) -> dict[str, tuple[bytes, str, float]]:
    """key -> (bytes, reference text, seconds). Each via gets its own compositions (`offset`), so no
    window reaches the server twice (its encoder cache would make a second via look faster)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from speech import encode
    from testkit.synthetic_speech import SENTENCES, long_recording, spoken_sentences
    from whisper_triton.pipeline.audio import SAMPLE_RATE

    clips = spoken_sentences(folder)
    out = {}
    for i in range(files):
        count = 2 + (i * 5) % 8  # 2..9 sentences
        order = [(i + offset + k) % len(clips) for k in range(count)]
        samples, reference, _ = long_recording([clips[k] for k in order], [SENTENCES[k] for k in order], repeats=count)
        fmt = ("flac", "flac", 1, 16000) if i % 2 == 0 else ("mp3", "libmp3lame", 1, 22050)
        key = f"{prefix}/{i:03d}.{fmt[0]}"
        out[key] = (encode(samples, SAMPLE_RATE, *fmt), reference, samples.size / SAMPLE_RATE)
    return out


def run_via(via: str, served_url: str, concurrency: int) -> dict:
    from whisper_triton.bulk.cli import main

    argv = [f"s3://{BUCKET_IN}/{via}/", f"s3://{BUCKET_OUT}/{via}/", "--via", via, "--no-progress"]
    if via == "local":
        argv += ["--url", served_url, "--concurrency", str(concurrency)]
    else:
        argv += ["--model-name", "whisper-bench", "--max-concurrent-transforms", str(concurrency),
                 "--poll-interval", "0.5"]
    started = time.monotonic()
    code = main(argv)
    wall = time.monotonic() - started
    return {"exit": code, "wall_seconds": round(wall, 2)}


def word_error(s3, via: str, files: dict) -> float:
    """WER over the via's corpus (outputs are at <via>/<path under the input folder>.txt)."""
    from whisper_triton.pipeline.evaluation import word_error_rate

    errors = words = 0.0
    for key, (_, reference, _) in files.items():
        text = s3.get_object(Bucket=BUCKET_OUT, Key=f"{key}.txt")["Body"].read().decode()
        n = len(reference.split())
        errors += word_error_rate(reference, text) * n
        words += n
    return errors / words


def planning(best_cpu: float, gpu_rtfx: float, model_label: str) -> list[dict]:
    from whisper_triton.bulk.plan import HOSTED_PER_AUDIO_HOUR, PRICES, CostModel

    rows = []
    for label, instance, count, rtfx, measured in (
        (f"CPU, 2 vCPUs ({model_label}), measured here", "ml.m5.large", 1, best_cpu, True),
        (f"CPU, 2 vCPUs ({model_label}), measured here", "ml.m5.large", 10, best_cpu, True),
        ("ml.g5.xlarge (A10G), large-v3, ESTIMATE", "ml.g5.xlarge", 1, gpu_rtfx, False),
        ("ml.g5.xlarge (A10G), large-v3, ESTIMATE", "ml.g5.xlarge", 4, gpu_rtfx, False),
        ("ml.g5.xlarge (A10G), large-v3, ESTIMATE", "ml.g5.xlarge", 10, gpu_rtfx, False),
    ):
        model = CostModel(instances=count, instance_type=instance, price_per_hour=PRICES[instance], rtfx=rtfx,
                          startup_s=8 * 60)
        seconds = HOURS * 3600
        rows.append({"setup": label, "instances": count, "rtfx_per_instance": round(rtfx, 2), "measured": measured,
                     "wall_hours": round(model.wall_seconds(seconds) / 3600, 2), "cost_usd": round(model.cost(seconds), 2),
                     "price_per_hour": PRICES[instance]})
    for name, price in HOSTED_PER_AUDIO_HOUR:
        rows.append({"setup": f"{name} (hosted)", "cost_usd": round(price * HOURS, 2), "measured": False})
    return rows


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3", "boto3", "httpx", "werkzeug", "whisper_triton"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--vias", nargs="+", choices=["local", "transform"], default=["local", "transform"])
    parser.add_argument("--concurrency", type=int, default=4, help="files in flight (transform: MaxConcurrentTransforms)")
    parser.add_argument("--model-dir", default=None, help="CTranslate2 Whisper directory (default: the embedded tiny.en)")
    parser.add_argument("--gpu-rtfx", type=float, default=None, help="a measured GPU RTFx (default: the estimate)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "bulk.json"))
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    from whisper_triton.bulk.plan import GPU_RTFX_ESTIMATE
    from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    corpora = {via: corpus(work, args.files, via, 3 * n) for n, via in enumerate(args.vias)}
    audio = sum(v[2] for v in corpora[args.vias[0]].values())
    logger.info("corpus: %d files a via, %.1f s of audio", args.files, audio)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    env = {"WHISPER_TRITON_MODEL_DIR": args.model_dir} if args.model_dir else {}
    served = start_serve(work / "serve.log", env)
    results: dict = {"benchmark": "bulk", "host": platform.node(), "cpus": os.cpu_count(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": args.files, "model": args.model_dir or "tiny.en (embedded)",
                     "load_average_before": os.getloadavg(), "vias": {}}
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=moto_url)
        with serve_in_thread(create_app(EmulatorOptions(container_url=served.url, aws_endpoint_url=moto_url))) as emulator:
            os.environ.update(AWS_ENDPOINT_URL_SAGEMAKER=emulator.url, AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=emulator.url)
            s3 = boto3.client("s3")
            for bucket in (BUCKET_IN, BUCKET_OUT):
                s3.create_bucket(Bucket=bucket)
            for files in corpora.values():
                for key, (data, _, _) in files.items():
                    s3.put_object(Bucket=BUCKET_IN, Key=key, Body=data)
            boto3.client("sagemaker").create_model(
                ModelName="whisper-bench", ExecutionRoleArn="arn:aws:iam::123456789012:role/bench",
                PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:bench"})
            for via in args.vias:
                row = run_via(via, served.url, args.concurrency)
                summary = json.loads(s3.get_object(Bucket=BUCKET_OUT, Key=f"{via}/summary.json")["Body"].read())
                row |= {"transcribed": summary["files"]["transcribed"], "audio_seconds": summary["audio_seconds"],
                        "rtfx": round(summary["audio_seconds"] / row["wall_seconds"], 2),
                        "wer": round(word_error(s3, via, corpora[via]), 4),
                        "load_average_after": os.getloadavg()}
                results["vias"][via] = row
                logger.info("via %s: %s", via, row)
    finally:
        served.stop()
        moto.stop()
    best = max(row["rtfx"] for row in results["vias"].values())
    gpu = args.gpu_rtfx or GPU_RTFX_ESTIMATE
    model_label = "tiny.en" if not args.model_dir else Path(args.model_dir).name
    results["planning_1000_hours"] = planning(best, gpu, model_label)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.files} files a via (~{audio / 60:.1f} min of audio), load average "
          f"{results['load_average_before'][0]:.1f} before")
    for via, row in results["vias"].items():
        print(f"  via {via:9s}: {row['wall_seconds']:7.1f} s wall, RTFx {row['rtfx']:6.2f}, WER {row['wer']:.3f}")
    print("\n| setup | instances | RTFx each | wall time | cost |\n|---|---|---|---|---|")
    for r in results["planning_1000_hours"]:
        if "instances" in r:
            print(f"| {r['setup']} | {r['instances']} | {r['rtfx_per_instance']} | {r['wall_hours']} h | ${r['cost_usd']:,.2f} |")
        else:
            print(f"| {r['setup']} | - | - | - | ${r['cost_usd']:,.2f} |")
    print(f"\nJSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
