"""Time Whisper's rules processor (engines/tensorrtllm/rules.py) per executor step, as TensorRT-LLM calls it.

For a device with CUDA and PyTorch but no TensorRT-LLM: one processor call over `batch` requests of
large-v3's vocabulary (51,866, padded to 51,872), float16 logits on the GPU, with and without timestamp
rules, on a CUDA stream of its own standing for the executor's. Prints ms per step (median over the
repeats, after warm-up) and writes bench/results/gpu_rules.json. On a machine without CUDA it runs on CPU
torch in float32: the figures then mean nothing, the arithmetic is the same (tests/test_bench_gpu_rules.py).

    python bench/gpu_rules.py                 # batches 1, 8, 32, 64
    python bench/gpu_rules.py --batches 1,8 --repeats 20

A rules cost of r ms per step slows a decoder step of d ms by r / (d + r): `bottleneck_ms` is the r at
which that loss reaches a given share (10 % by default); docs/gpu.md compares it with the decoder steps
of large-v3 and turbo on an A10G.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _path  # noqa: F401 - the repository root on sys.path
import numpy as np

from whisper_triton.engines.tensorrtllm.rules import RuleState, WhisperRulesProcessor
from whisper_triton.engines.whisper_rules import RequestPlan, RuleTokens

LARGE_V3_VOCAB = 51866
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_rules.json"
EOT, SOT, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50257, 50258, 50364, 50365  # large-v3's layout


def large_v3_tokens(vocab: int = LARGE_V3_VOCAB) -> RuleTokens:
    """large-v3's rule tokens (ids of its multilingual layout; 100 languages)."""
    languages = tuple(range(50259, 50359))
    return RuleTokens(eot=EOT, sot=SOT, no_timestamps=NO_TIMESTAMPS, timestamp_begin=TIMESTAMP_BEGIN,
                      no_speech=50363, blank=(220, EOT), suppress=tuple(range(1, 90)) + (50358, 50359, 50360),
                      language_ids=languages, language_codes=tuple(f"l{i}" for i in range(len(languages))),
                      vocab_size=vocab)


def histories(batch: int, timestamps: bool, length: int = 24, seed: int = 0) -> list[list[int]]:
    """Token histories as decoding makes them: text with (increasing) timestamp pairs when timestamps are on."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        tokens, stamp = [], TIMESTAMP_BEGIN
        for position in range(length):
            if timestamps and position % 8 in (0, 7):
                stamp += int(rng.integers(1, 20))
                tokens.append(stamp)
            else:
                tokens.append(int(rng.integers(100, 50000)))
        out.append(tokens)
    return out


def bottleneck_ms(decoder_step_ms: float, share: float = 0.1) -> float:
    """The rules' per-step cost at which they take `share` of each step: r / (d + r) = share."""
    if not 0 < share < 1:
        raise ValueError("share must be between 0 and 1")
    return decoder_step_ms * share / (1 - share)


def summarise(samples_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "samples": len(samples_ms)}


def time_step(batch: int, timestamps: bool, *, torch, device: str, dtype, vocab: int = LARGE_V3_VOCAB,
              repeats: int = 10, warmup: int = 3) -> dict:
    """Median ms of one processor call over `batch` requests (a fresh logits copy each call)."""
    tokens = large_v3_tokens(vocab)
    padded = -(-vocab // 8) * 8
    processor = WhisperRulesProcessor(tokens, torch, capacity=batch)
    prompt = [SOT, 50259, 50360] + ([] if timestamps else [NO_TIMESTAMPS])
    plan = RequestPlan(timestamps=timestamps)
    for client in range(batch):
        processor.register(client, RuleState(plan=plan, prompt_length=len(prompt)))
    ids = [[prompt + history] for history in histories(batch, timestamps)]
    generator = torch.Generator(device=device).manual_seed(0)
    source = torch.randn((batch, 1, 1, padded), generator=generator, device=device).to(dtype)
    cuda = device.startswith("cuda")
    stream = torch.cuda.Stream() if cuda else None
    samples = []
    for round_ in range(warmup + repeats):
        logits = [row.clone() for row in source]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        processor(list(range(batch)), logits, ids, stream.cuda_stream if cuda else None, list(range(batch)))
        if cuda:
            stream.synchronize()
        if round_ >= warmup:
            samples.append((time.perf_counter() - start) * 1000)
    return {"batch": batch, "timestamps": timestamps, **summarise(samples)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=LARGE_V3_VOCAB)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    rows = [time_step(int(batch), timestamps, torch=torch, device=device, dtype=dtype, vocab=args.vocab,
                      repeats=args.repeats)
            for batch in args.batches.split(",") for timestamps in (False, True)]
    where = torch.cuda.get_device_name() if cuda else "CPU (figures meaningless: no GPU)"
    print(f"rules processor per step on {where}, vocab {args.vocab}, {str(dtype).split('.')[-1]}")
    print(f"{'batch':>6} {'timestamps':>10} {'median ms':>10} {'min ms':>8}")
    for row in rows:
        print(f"{row['batch']:>6} {str(row['timestamps']):>10} {row['median_ms']:>10.3f} {row['min_ms']:>8.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"device": where, "dtype": str(dtype), "vocab": args.vocab, "rows": rows,
                                       "bottleneck_ms_at_10pct": {str(d): bottleneck_ms(d) for d in (1, 2, 6, 8)}},
                                      indent=2))
    return rows


if __name__ == "__main__":
    main()
