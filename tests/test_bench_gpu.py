"""bench/gpu.py: its arithmetic as pure functions, and one short real run against a CPU `serve`."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu", None)
        sys.path.remove(str(ROOT / "bench"))


def test_percentile_is_numpys_linear_one(gpu):
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 10, 101):
        values = list(rng.uniform(0.1, 9.0, size))
        for q in (0, 50, 90, 100):
            assert gpu.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(gpu.percentile([], 50))
    with pytest.raises(ValueError):
        gpu.percentile([1.0], 101)


def test_corpus_wer_counts_words_over_the_whole_corpus(gpu):
    # 1 substitution in 4 words + 1 deletion in 2 words: 2 / 6, not the mean of 1/4 and 1/2
    assert gpu.corpus_wer(["the cat sat down", "hello world"], ["the cat sat up", "Hello."]) == pytest.approx(2 / 6)
    assert gpu.corpus_wer(["It's fine, thanks!"], ["its fine thanks"]) == pytest.approx(1 / 3)  # normalised
    assert gpu.corpus_wer([], []) == 0.0


def test_cost_per_audio_hour(gpu):
    assert gpu.cost_per_audio_hour(1.5, 100.0) == pytest.approx(0.015)  # 100 audio hours per instance hour
    assert gpu.cost_per_audio_hour(None, 100.0) is None
    assert gpu.cost_per_audio_hour(1.5, 0.0) is None


def test_summary_of_one_level(gpu, tmp_path):
    items = {name: gpu.AudioItem(name, tmp_path / f"{name}.wav", ref, seconds)
             for name, ref, seconds in (("a", "one two three", 10.0), ("b", "four five", 20.0))}
    results = [
        gpu.RequestResult("a", 10.0, 1.0, 200, "one two three", 0),
        gpu.RequestResult("b", 20.0, 3.0, 200, "four", 0),
        gpu.RequestResult("a", 10.0, 2.0, 200, "wrong wrong wrong", 1),  # a repeat: counted for speed, not WER
        gpu.RequestResult("b", 20.0, 9.0, 500, "", 1),
    ]
    summary = gpu.summarize(4, results, wall_seconds=4.0, items=items, price_per_hour=2.0)
    assert (summary.requests, summary.errors, summary.error_statuses) == (4, 1, {"500": 1})
    assert summary.audio_seconds == 40.0 and summary.rtfx == pytest.approx(10.0)  # failed requests transcribed nothing
    assert summary.latency_p50_s == pytest.approx(2.0) and summary.latency_p90_s == pytest.approx(2.8)
    assert summary.wer == pytest.approx(1 / 5)
    assert summary.cost_per_audio_hour == pytest.approx(0.2)
    assert "  10.00" in gpu.table([summary])


def test_bad_arguments_stop_with_a_message(gpu, tmp_path):
    with pytest.raises(SystemExit, match="integers separated by commas"):
        gpu.parse_concurrency("1,four")
    with pytest.raises(SystemExit, match="1 or more"):
        gpu.parse_concurrency("0,2")
    (tmp_path / "lonely.wav").write_bytes(b"")
    with pytest.raises(SystemExit, match="no audio file with a reference"):
        gpu.load_folder(tmp_path)


@pytest.mark.triton
def test_a_short_real_run_against_serve(gpu, serve, speech_clips, tmp_path, capsys):
    folder = tmp_path / "audio"
    folder.mkdir()
    for i, clip in enumerate(speech_clips[:2]):
        shutil.copy(clip.wav_path, folder / f"clip{i}.wav")
        (folder / f"clip{i}.txt").write_text(clip.text)
    output = tmp_path / "result.json"
    assert gpu.main(["--audio-dir", str(folder), "--url", serve.url, "--concurrency", "1,2", "--price-per-hour", "1.0",
                     "--instance", "cpu-test", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seconds = sum(clip.samples.size / 16000 for clip in speech_clips[:2])
    assert report["audio_seconds_per_pass"] == pytest.approx(seconds)
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["requests"] == 2 and level["errors"] == 0
        assert level["audio_seconds"] == pytest.approx(seconds)
        assert level["rtfx"] == pytest.approx(level["audio_seconds"] / level["wall_seconds"])
        assert 0 < level["latency_p50_s"] <= level["latency_p90_s"] <= level["wall_seconds"]
        assert level["wer"] < 0.5  # tiny.en on espeak-ng speech: real transcripts
        assert level["cost_per_audio_hour"] == pytest.approx(1.0 / level["rtfx"])
    assert "RTFx" in capsys.readouterr().out
