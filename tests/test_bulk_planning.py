"""The parts of `whisper-transcribe-bucket` that decide before anything is sent: audio lengths from
the first bytes of an object, the plan (resume, size limit, refused files), the transform job's
data-log as the command reads it back, and the refusals of the command line. No server needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speech import FORMATS, encode
from whisper_triton.bulk.cli import main, size_bytes
from whisper_triton.bulk.listing import AudioObject, Filters, probe_seconds
from whisper_triton.bulk.manifest import Record
from whisper_triton.bulk.plan import cost_model, make_plan, rtfx_from_json
from whisper_triton.bulk.runners.transform import failure_from_log, parse_data_log

HEAD = 64 * 1024


@pytest.fixture(scope="module")
def minute() -> np.ndarray:
    t = np.arange(60 * 16000) / 16000
    return (0.2 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 0.5 * t)) / 2).astype(np.float32)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "webm", "wav-stereo-44k", "wav-8k"])
def test_lengths_stated_in_the_header_are_exact_from_the_first_bytes(minute, fmt):
    data = encode(minute, 16000, *FORMATS[fmt])
    assert len(data) > HEAD  # the probe sees only the start
    seconds, exact = probe_seconds(data[:HEAD], len(data))
    assert exact and seconds == pytest.approx(60.0, abs=0.1)


@pytest.mark.parametrize("fmt", ["ogg-vorbis", "m4a-aac"])
def test_other_lengths_are_estimates_and_say_so(minute, fmt):
    data = encode(minute, 16000, *FORMATS[fmt])
    seconds, exact = probe_seconds(data[:HEAD], len(data))
    assert not exact and 15.0 < seconds < 240.0  # within a factor of four of the truth


def test_a_file_inside_the_probe_is_measured_whole(minute):
    data = encode(minute[:3 * 16000], 16000, *FORMATS["opus"])
    assert len(data) < HEAD
    seconds, exact = probe_seconds(data, len(data))
    assert exact and seconds == pytest.approx(3.0, abs=0.05)
    assert probe_seconds(b"not audio at all" * 10, 160) == (160 * 8 / 64_000, False)


def objects(*spec: tuple[str, int]) -> list[AudioObject]:
    return [AudioObject(key, key, size, 10.0, True) for key, size in spec]


def test_the_plan_skips_what_is_done_or_refused_and_what_is_too_large():
    items = objects(("done.wav", 100), ("big.wav", 2000), ("corrupt.wav", 100), ("flaky.wav", 100), ("new.wav", 100))
    previous = {"corrupt.wav": Record("corrupt.wav", "failed", error="400: not audio", error_kind="client"),
                "flaky.wav": Record("flaky.wav", "failed", error="503: busy", error_kind="server")}
    plan = make_plan(items, {"done.wav": True}, previous, limit_bytes=1000, retry_failed=False)
    assert [o.key for o in plan.done] == ["done.wav"] and [o.key for o in plan.too_large] == ["big.wav"]
    assert [o.key for o in plan.failed_before] == ["corrupt.wav"]
    assert [o.key for o in plan.todo] == ["flaky.wav", "new.wav"] and plan.todo_seconds == 20.0
    again = make_plan(items, {"done.wav": True}, previous, limit_bytes=1000, retry_failed=True)
    assert [o.key for o in again.todo] == ["corrupt.wav", "flaky.wav", "new.wav"]


def test_filters_by_suffix_and_size():
    filters = Filters((".wav", ".MP3"), min_bytes=10, max_bytes=size_bytes("1k"))
    assert filters.admits("a/b.WAV", 500) and filters.admits("c.mp3", 1024)
    assert not filters.admits("a/b.txt", 500) and not filters.admits("a/b.wav", 9) and not filters.admits("a/b.wav", 1025)
    assert not filters.admits("folder/", 0)
    assert Filters((), 1, None).admits("anything", 1)
    assert [size_bytes(t) for t in ("1500", "64k", "5MB", "1.5GiB")] == [1500, 65536, 5 * 1024 ** 2, int(1.5 * 1024 ** 3)]


def test_the_data_log_is_read_back_per_object_even_with_colons_and_spaces_in_keys():
    messages = [
        "2026-12-07T10:00:00.001:[sagemaker logs]: MaxConcurrentTransforms=2, MaxPayloadInMB=1, BatchStrategy=SINGLE_RECORD",
        "2026-12-07T10:00:01.002:[sagemaker logs]: audio/calls/a: b.wav: ClientError: 400",
        "2026-12-07T10:00:01.002:[sagemaker logs]: audio/calls/a: b.wav: ",
        "2026-12-07T10:00:01.002:[sagemaker logs]: audio/calls/a: b.wav: Message:",
        '2026-12-07T10:00:01.003:[sagemaker logs]: audio/calls/a: b.wav: {"error": {"message": "not audio", "type": "invalid_audio"}}',
        "2026-12-07T10:00:02.000:[sagemaker logs]: audio/calls/slow one.wav: Bad HTTP status received from algorithm: 503",
        "2026-12-07T10:00:02.000:[sagemaker logs]: audio/calls/slow one.wav: ",
        "2026-12-07T10:00:02.000:[sagemaker logs]: audio/calls/slow one.wav: Message:",
        "2026-12-07T10:00:02.000:[sagemaker logs]: audio/calls/slow one.wav: busy",
        "2026-12-07T10:00:05.000:[sagemaker logs]: audio/calls/slow one.wav: Model server did not respond to "
        "/invocations request within 60 seconds",
    ]
    log = parse_data_log(messages, {"audio/calls/a: b.wav", "audio/calls/slow one.wav", "audio/calls/fine.wav"})
    assert sorted(log) == ["audio/calls/a: b.wav", "audio/calls/slow one.wav"]
    assert failure_from_log(log["audio/calls/a: b.wav"]) == ("ClientError: 400: not audio", "client")
    assert failure_from_log(log["audio/calls/slow one.wav"]) == (
        "Model server did not respond to /invocations request within 60 seconds", "server")


def test_throughput_from_benchmark_output(tmp_path):
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"benchmark": "gpu", "levels": [{"concurrency": 1, "rtfx": 31.5}, {"concurrency": 8, "rtfx": 88.0}]}))
    assert rtfx_from_json(gpu) == 88.0
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"via": "local", "rtfx": 4.2}))
    model = cost_model("ml.g5.xlarge", 3, None, None, summary, 0.0)
    assert (model.rtfx, model.price_per_hour) == (4.2, 1.408)
    assert model.cost(3600 * 4.2 * 3) == pytest.approx(3 * 1.408)
    estimate = cost_model("ml.g5.xlarge", 1, None, None, None, 0.0)
    assert estimate.rtfx_source.startswith("ESTIMATE")
    assert cost_model(None, 1, None, None, None, 0.0).wall_seconds(100.0) is None


@pytest.mark.parametrize("argv, message", [
    (["s3://in/a/", "s3://out/b/", "--via", "transform", "--model-name", "m", "--language", "de"],
     "--via transform sends no per-request options"),
    (["s3://in/a/", "s3://out/b/", "--via", "async"], "--via async needs --endpoint"),
    (["s3://in/a/", "s3://in/a/", "--via", "local"], "The output prefix is the input prefix"),
    (["in/a/", "s3://out/b/", "--via", "local"], "is not an s3:// URI"),
    (["s3://in/a/", "s3://out/b/", "--via", "local", "--formats", "json,docx"], "Unknown output format(s) docx"),
])
def test_the_command_refuses_what_it_cannot_do_before_touching_anything(argv, message, capsys):
    assert main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
