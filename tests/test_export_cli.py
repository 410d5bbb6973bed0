"""`whisper-export all`: every step in order, resumes after a failure, uploads to S3 (moto on loopback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3

import export_fixtures as fx
from test_export_s3 import BUCKET, s3_endpoint  # noqa: F401  (module-scoped moto server fixture)
from whisper_triton.export import cli
from whisper_triton.export.common import DONE_MARKER, ExportError, is_complete

ROOT = Path(__file__).resolve().parents[1]


def test_all_resumes_after_a_failure_and_uploads(s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    import whisper_triton.export.ctranslate2_export as ct2_export

    work = tmp_path / "work"
    argv = ["all", "--base", str(fx.tiny_hf_dir()), "--adapter", str(fx.make_adapter("lora-nonzero", 0.02)),
            "--work", str(work), "--uri", f"s3://{BUCKET}/cli-run", "--engines", "auto"]
    real_export = ct2_export.export_ctranslate2

    def failing(*args, **kwargs):
        raise ExportError("simulated crash in the ctranslate2 step")

    monkeypatch.setattr(ct2_export, "export_ctranslate2", failing)
    assert cli.main(argv) == 2
    assert is_complete(work / "merged", "merge") and is_complete(work / "trtllm_checkpoint", "trtllm-checkpoint")
    assert not (work / "ctranslate2").exists()
    merged_marker = (work / "merged" / DONE_MARKER).stat().st_mtime_ns
    checkpoint_marker = (work / "trtllm_checkpoint" / DONE_MARKER).stat().st_mtime_ns

    monkeypatch.setattr(ct2_export, "export_ctranslate2", real_export)
    assert cli.main(argv) == 0
    assert (work / "merged" / DONE_MARKER).stat().st_mtime_ns == merged_marker  # verified outputs were not redone
    assert (work / "trtllm_checkpoint" / DONE_MARKER).stat().st_mtime_ns == checkpoint_marker
    assert is_complete(work / "ctranslate2", "ctranslate2")
    assert not (work / "engines").exists()  # no trtllm-build here: commands logged, nothing half-built
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="cli-run/")["Contents"]}
    assert is_complete(work / "model_repo_ctranslate2", "model-repo")  # the CTranslate2 model as a Triton repository
    repo = "cli-run/model_repo_ctranslate2"
    assert {f"{repo}/whisper/1/engine/model.bin", f"{repo}/whisper/1/engine/tokenizer.json", f"{repo}/whisper/config.pbtxt",
            f"{repo}/repository_manifest.json", f"{repo}/whisper-export-manifest.json"} <= keys


def test_single_step_errors_exit_nonzero_with_a_message(tmp_path, caplog):
    assert cli.main(["merge", "--base", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in caplog.text
    assert cli.main(["upload", "--source", str(tmp_path), "--uri", "s3:///prefix"]) == 2
    assert "no bucket" in caplog.text


def test_entry_script_runs_the_cli():
    result = subprocess.run([sys.executable, str(ROOT / "export" / "whisper_export"), "--help"],
                            capture_output=True, text=True, timeout=120, check=True)
    for command in ("merge", "trtllm-checkpoint", "build-engines", "ctranslate2", "model-repo", "upload", "download", "all"):
        assert command in result.stdout
