"""The served benchmark's arithmetic and output (bench/served.py), without servers and without timing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def served():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_served", BENCH / "served.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_served"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_served", None)
        sys.path.remove(str(BENCH))


def triton_stats(executions: int, inferences: int, infer_ns: int, batches: dict[int, int], queue_ns: int = 0) -> dict:
    """The shape of Triton's statistics extension answer (GET /v2/models/stats) for one model."""
    return {"name": "whisper_window", "version": "1", "last_inference": 1, "inference_count": inferences,
            "execution_count": executions,
            "inference_stats": {"success": {"count": inferences, "ns": infer_ns + queue_ns},
                                "queue": {"count": inferences, "ns": queue_ns},
                                "compute_input": {"count": inferences, "ns": 10},
                                "compute_infer": {"count": inferences, "ns": infer_ns},
                                "compute_output": {"count": inferences, "ns": 20}},
            "batch_stats": [{"batch_size": size, "compute_input": {"count": count, "ns": 1},
                             "compute_infer": {"count": count, "ns": 100 * count}, "compute_output": {"count": count, "ns": 3}}
                            for size, count in batches.items()]}


def test_statistics_are_diffed_per_model_and_batch_size(served):
    before = served.stats_snapshot({"model_stats": [triton_stats(3, 5, 1_000, {1: 1, 2: 2})]})
    after = served.stats_snapshot({"model_stats": [triton_stats(6, 17, 4_000, {1: 1, 2: 3, 8: 1, 2 + 1: 1},
                                                                queue_ns=700)]})
    diff = served.diff_stats(before, after)["whisper_window"]
    assert diff["executions"] == 3 and diff["inferences"] == 12
    assert diff["compute_infer_ns"] == 3_000 and diff["queue_ns"] == 700
    assert diff["execution_infer_ns"] == 300  # per execution: three more executions of 100 ns
    assert diff["batch_sizes"] == {2: 1, 3: 1, 8: 1}  # sizes that did not run in between are left out
    total = served.add_stats(served.add_stats({}, {"whisper_window": diff}), {"whisper_window": diff})
    assert total["whisper_window"]["inferences"] == 24 and total["whisper_window"]["batch_sizes"] == {2: 2, 3: 2, 8: 2}


def test_proc_stat_parsing_survives_odd_command_names(served):
    ticks = os.sysconf("SC_CLK_TCK")
    text = f"4242 (a (b) c) S 77 1 1 0 -1 0 0 0 0 0 {3 * ticks} {ticks} 0 0 20 0 1 0 0 0 0"
    ppid, cpu = served.parse_stat(text)
    assert ppid == 77 and cpu == pytest.approx(4.0)


def test_process_tree_holds_children_and_their_cpu(served):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = served.ProcessSet(os.getpid(), "bench")
        assert {os.getpid(), child.pid} <= set(tree.pids())
        assert set(tree.cpu_seconds()) == {"bench"} and tree.cpu_seconds()["bench"] > 0
        assert tree.rss_bytes()["bench"] > 0
    finally:
        child.kill()
        child.wait(timeout=10)


def test_percentile_is_a_measured_value(served):
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0]
    assert served.percentile(samples, 90) == 9.0
    assert served.percentile(samples, 100) == 10.0
    assert served.percentile([3.0], 90) == 3.0
    assert served.ideal_executions(12, 8) == 2 and served.ideal_executions(8, 8) == 1
    assert served.ideal_executions(None, 8) is None


def sample(served, wall: float, engine_s: float, cpu: dict[str, float], batches: dict[int, int]):
    stats = {"whisper_window": {"executions": sum(batches.values()), "inferences": sum(k * v for k, v in batches.items()),
                         "compute_infer_ns": int(engine_s * 1e9) * 8, "execution_infer_ns": int(engine_s * 1e9),
                         "queue_ns": 0, "batch_sizes": batches}}
    return served.Sample(wall, cpu, stats, "text")


def test_served_row_splits_own_time_from_engine_time(served):
    rows = [sample(served, 10.0, 9.0, {"proxy": 0.1, "stub:whisper_window": 18.0, "tritonserver": 0.1}, {8: 1, 4: 1}),
            sample(served, 12.0, 10.0, {"proxy": 0.3, "stub:whisper_window": 20.0, "tritonserver": 0.1}, {8: 1, 4: 1}),
            sample(served, 11.0, 10.5, {"proxy": 0.2, "stub:whisper_window": 19.0, "tritonserver": 0.2}, {8: 1, 4: 1})]
    row = served.served_row(rows, audio_seconds=100.0)
    assert row["rtf"] == pytest.approx(0.11)
    assert row["own_wall_ms_per_audio_s"] == pytest.approx(10.0)  # median of 1.0, 2.0, 0.5 s over 100 s
    assert row["cpu_ms_per_audio_s"] == pytest.approx(194.0)  # totals 18.2, 20.4, 19.4 s
    assert row["own_cpu_ms_per_audio_s"] == pytest.approx(4.0)  # 0.2, 0.4, 0.4 s outside the engine stub
    assert row["triton_per_round"]["whisper_window"]["batch_sizes"] == {8: 1.0, 4: 1.0}
    assert row["triton_per_round"]["whisper_window"]["inferences"] == 12.0


def test_report_renders_as_table_json_and_plot(served, tmp_path, capsys):
    from testkit.synthetic_speech import SENTENCES

    long = served.Clip("long", b"", 100.0, " ".join(SENTENCES), "audio/flac")
    shorts = [served.Clip(f"short{i}", b"", 4.0, text, "audio/wav") for i, text in enumerate(SENTENCES[:2])]
    ours_long = [[sample(served, 10.0, 9.0, {"stub:whisper_window": 18.0}, {8: 1})] for _ in range(3)]
    for rounds in ours_long:
        rounds[0].text = " ".join(SENTENCES)
    ours_short = [[sample(served, 0.5, 0.4, {"stub:whisper_window": 0.8}, {1: 1}) for _ in shorts] for _ in range(3)]
    for rounds in ours_short:
        for s, clip in zip(rounds, shorts):
            s.text = clip.reference
    theirs_long = [[(" ".join(SENTENCES[:-1]), 20.0, 30.0)] for _ in range(3)]
    theirs_short = [[(clip.reference, 0.25, 0.5) for clip in shorts] for _ in range(3)]
    parts = {"long": {"ours": ours_long, "theirs": theirs_long}, "short": {"ours": ours_short, "theirs": theirs_short}}
    mode = served.mode_report(parts, long, shorts)
    assert mode["long"]["ratio"] == pytest.approx(0.5)
    assert mode["short"]["ratio"] == pytest.approx(2.0)
    assert mode["long"]["ours"]["wer"] == 0.0 and mode["long"]["theirs"]["wer"] > 0.0
    assert mode["long"]["wer_delta_points"] < 0
    assert mode["short"]["ours"]["overhead_ms_per_request"]["median"] == pytest.approx(100.0)
    report = {"long_seconds": 100.0, "short_seconds": 8.0, "short_clips": 2, "windows": 8, "engine_max_batch_size": 8,
              "ideal_first_round_executions": 1, "modes": {"timestamps": mode},
              "memory": {"served": {"peak_total_mib": 900.0, "peak_by_role_mib": {"proxy": 100.0}}},
              "settings": {"compute_type": "float32", "beam_size": 1, "batch_size": 8, "threads": 2, "rounds": 3},
              "machine": {"cpus": 2}}
    rows = served.table_rows(report)
    assert [r[0] for r in rows] == ["long, timestamps", "short, timestamps"]
    assert rows[0][3] == "0.50x" and rows[0][-1] == "8x1"
    served.print_report(report)
    assert "Served vs faster-whisper" in capsys.readouterr().out
    json.dumps(report)  # the JSON the benchmark writes
    served.plot(report, tmp_path / "served.png")
    assert (tmp_path / "served.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
