"""bench/gpu_rules.py on CPU torch: its arithmetic, and a short real run of the processor it times."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_rules", ROOT / "bench" / "gpu_rules.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu_rules"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu_rules", None)
        sys.path.remove(str(ROOT / "bench"))


def test_bottleneck_arithmetic(bench):
    assert bench.bottleneck_ms(9.0) == pytest.approx(1.0)  # 1 ms of 10 ms is 10 %
    assert bench.bottleneck_ms(2.0, share=0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.bottleneck_ms(2.0, share=1.0)
    assert bench.summarise([3.0, 1.0, 2.0]) == {"median_ms": 2.0, "min_ms": 1.0, "samples": 3}


def test_histories_have_timestamp_pairs_only_when_asked(bench):
    (with_ts,), (without,) = bench.histories(1, True), bench.histories(1, False)
    stamps = [t for t in with_ts if t >= bench.TIMESTAMP_BEGIN]
    assert stamps == sorted(stamps) and len(stamps) == 6
    assert all(t < bench.TIMESTAMP_BEGIN for t in without)


def test_a_short_run_on_cpu_times_every_batch_with_and_without_timestamps(bench, tmp_path):
    output = tmp_path / "rules.json"
    rows = bench.main(["--batches", "1,2", "--repeats", "2", "--output", str(output)])
    assert [(r["batch"], r["timestamps"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert all(r["median_ms"] > 0 and r["samples"] == 2 for r in rows)
    saved = json.loads(output.read_text())
    assert saved["vocab"] == 51866 and len(saved["rows"]) == 4 and "CPU" in saved["device"]
