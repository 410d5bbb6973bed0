"""The live benchmark's arithmetic (bench/live.py), without servers and without timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def live():
    sys.path.insert(0, str(BENCH))
    try:
        import live as module

        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_percentile_is_a_measured_value(live):
    assert live.percentile([], 50) is None
    assert live.percentile([3.0, 1.0, 2.0], 50) == 2.0 and live.percentile([3.0, 1.0, 2.0], 90) == 3.0


def session(latencies, completed, utterances=3, wer=0.1):
    return {"utterances": utterances, "completed": completed, "final_latency": latencies, "first_delta": [0.5],
            "wer": wer, "errors": []}


def test_a_level_is_held_only_when_every_final_came_within_the_p90_bound(live):
    held = live.summarize(2, [session([0.4, 0.6, 0.8], 3), session([0.5, 0.7, 0.9], 3)], held_p90=2.0)
    assert held["held"] and held["completed"] == held["utterances"] == 6 and held["final_p50_s"] in (0.6, 0.7)
    missing = live.summarize(2, [session([0.4, 0.6], 2), session([0.5, 0.7, 0.9], 3)], held_p90=2.0)
    assert not missing["held"]
    slow = live.summarize(1, [session([0.4, 2.5, 3.0], 3)], held_p90=2.0)
    assert not slow["held"] and slow["final_p90_s"] == 3.0


def test_session_audio_marks_each_prompt_and_carries_dither(live):
    audio, spans, texts = live.session_audio(3, offset=2, pause_s=1.0, seed=5)
    assert len(spans) == len(texts) == 3 and all(end > start for start, end in spans)
    assert spans[1][0] - spans[0][1] == live.SR  # the pause between prompts
    assert 0 < abs(audio[: live.SR // 4]).max() < 1e-3  # the silence before speech is dithered, not zero
    other, _, _ = live.session_audio(3, offset=2, pause_s=1.0, seed=6)
    assert not (audio == other).all()  # another session's audio differs: no window is decoded twice
