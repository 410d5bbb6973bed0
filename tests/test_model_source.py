"""Where `serve` gets its model repository: S3 (moto server on 127.0.0.1, verified download),
a SageMaker /opt/ml/model repository, or the configured one; and the exported tiny.en served for
real from a laid-out repository and from S3."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import boto3
import httpx
import pytest

import export_fixtures as fx
from conftest import start_serve
from test_export_s3 import BUCKET, s3_endpoint  # noqa: F401  (module-scoped moto server fixture)
from whisper_triton.pipeline.audio import decode_audio
from whisper_triton.engines import DecodeOptions, load_engine
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.export.ctranslate2_export import CT2ExportConfig, export_ctranslate2
from whisper_triton.export.model_repo import ENGINE_SUBDIR, ModelRepoConfig, write_model_repository
from whisper_triton.export.s3 import upload_directory
from whisper_triton.pipeline.features import batch_log_mel
from whisper_triton.supervisor.model_source import ModelSourceError, choose_model_source, download_target
from whisper_triton.settings import load_settings
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve

SPOKEN = "Please send me the report before the meeting on Monday morning."


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """The CTranslate2 export of tiny.en laid out as a Triton model repository."""
    root = tmp_path_factory.mktemp("model-source")
    ct2 = export_ctranslate2(CT2ExportConfig(hf_dir=str(fx.tiny_hf_dir()), output_dir=str(root / "ct2")))
    return write_model_repository(ModelRepoConfig(model_dir=str(ct2), output_dir=str(root / "repo")))


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    from speech import speak

    return speak(SPOKEN, tmp_path_factory.mktemp("speech") / "speech.wav")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def original_transcript(wav: Path) -> str:
    """What the original tiny.en (the bundled CTranslate2 model) hears, decoded in this process."""
    from whisper_triton.export.ct2_weights import bundled_tiny_en_dir

    model_dir = bundled_tiny_en_dir()
    engine = load_engine("ctranslate2", str(model_dir))
    tokenizer = WhisperTokenizer.from_model_dir(model_dir)
    features = batch_log_mel([decode_audio(wav.read_bytes())], engine.n_mels)
    hypothesis = engine.generate(features, [tokenizer.prompt_ids(PromptSpec())], DecodeOptions(beam_size=1))[0]
    return tokenizer.decode(hypothesis.tokens)


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"WHISPER_TRITON_SAGEMAKER_MODEL_DIR": str(tmp_path / "no-sagemaker-model"),
            "WHISPER_TRITON_MODEL_CACHE_DIR": str(tmp_path / "cache"), "WHISPER_TRITON_CPU_THREADS": "2", **extra}


def transcribe_with_serve(tmp_path: Path, env: dict[str, str], wav: Path, args: tuple[str, ...] = (),
                          log: list | None = None) -> str:
    instance = start_serve(tmp_path, env, args)
    try:
        instance.wait_ready()
        reply = httpx.post(instance.url + "/invocations", content=wav.read_bytes(), timeout=120,
                           headers={"Content-Type": "audio/wav"})
        assert reply.status_code == 200, reply.text
        return reply.json()["text"]
    finally:
        instance.terminate()
        if log is not None:
            log.append(instance.log())


# ---- choosing the source, without Triton -------------------------------------------------------------
def test_order_s3_then_sagemaker_dir_then_configured(s3_endpoint, repository, tmp_path):  # noqa: F811
    default = tmp_path / "default-repo"
    configured = load_settings(sagemaker_model_dir=str(tmp_path / "absent"), model_cache_dir=str(tmp_path / "cache"))
    assert choose_model_source(configured, default).repository == default
    explicit = load_settings(model_repository=str(tmp_path / "mine"), sagemaker_model_dir=str(tmp_path / "absent"))
    assert choose_model_source(explicit, default).repository == tmp_path / "mine"

    sagemaker = load_settings(sagemaker_model_dir=str(repository), model_repository=str(tmp_path / "mine"))
    chosen = choose_model_source(sagemaker, default)
    assert (chosen.kind, chosen.repository) == ("sagemaker", repository)

    uri = f"s3://{BUCKET}/source-order/repo"
    upload_directory(repository, uri)
    from_s3 = load_settings(model_s3_uri=uri, sagemaker_model_dir=str(repository), model_cache_dir=str(tmp_path / "cache"))
    chosen = choose_model_source(from_s3, default)
    assert chosen.kind == "s3" and chosen.repository == download_target(from_s3, uri)
    assert chosen.repository.parent == tmp_path / "cache"
    assert (chosen.repository / ENGINE_SUBDIR / "model.bin").read_bytes() == (repository / ENGINE_SUBDIR / "model.bin").read_bytes()
    assert (chosen.repository / "whisper" / "config.pbtxt").read_text() == (repository / "whisper" / "config.pbtxt").read_text()


def test_reupload_of_an_unchanged_repository_transfers_nothing(s3_endpoint, repository):  # noqa: F811
    uri = f"s3://{BUCKET}/reupload/repo"
    first = upload_directory(repository, uri)
    assert f"{ENGINE_SUBDIR}/model.bin" in first.transferred and first.bytes_transferred > 0
    again = upload_directory(repository, uri)
    assert again.transferred == [] and again.bytes_transferred == 0 and len(again.skipped) == len(first.transferred)


def test_missing_upload_and_bad_uri_are_clear_errors(s3_endpoint, tmp_path):  # noqa: F811
    missing = load_settings(model_s3_uri=f"s3://{BUCKET}/never-uploaded", model_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="No whisper-export-manifest.json under .*whisper-export upload"):
        choose_model_source(missing, tmp_path)
    with pytest.raises(ModelSourceError, match="has no bucket"):
        choose_model_source(load_settings(model_s3_uri="s3:///prefix", model_cache_dir=str(tmp_path / "cache")), tmp_path)
    not_a_repo = tmp_path / "upload"
    (not_a_repo / "other").mkdir(parents=True)
    (not_a_repo / "other" / "file.txt").write_text("x")
    upload_directory(not_a_repo, f"s3://{BUCKET}/not-a-repo")
    with pytest.raises(ModelSourceError, match="not a Whisper model repository"):
        choose_model_source(load_settings(model_s3_uri=f"s3://{BUCKET}/not-a-repo", model_cache_dir=str(tmp_path / "c")),
                            tmp_path)


# ---- real serve ---------------------------------------------------------------------------------------
def test_corrupted_object_stops_serve_before_triton(s3_endpoint, repository, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/corrupted/repo"
    upload_directory(repository, uri)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="corrupted/repo/whisper/1/engine/tokenizer.json", Body=b"{}")
    instance = start_serve(tmp_path, serve_env(tmp_path, WHISPER_TRITON_MODEL_S3_URI=uri))
    try:
        code = instance.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        instance.terminate()
        pytest.fail(f"serve kept running with a corrupted model:\n{instance.log(3000)}")
    log = instance.log()
    assert code != 0
    assert "corrupted/repo/whisper/1/engine/tokenizer.json is corrupted: its sha256 is" in log
    assert "WHISPER_TRITON_MODEL_S3_URI" in log
    assert "starting tritonserver" not in log
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("s3-*/whisper"))  # nothing kept


def test_laid_out_repository_serves_the_export(repository, speech, tmp_path):
    text = transcribe_with_serve(tmp_path, serve_env(tmp_path, WHISPER_TRITON_MODEL_REPOSITORY=str(repository)), speech)
    assert words(text) == words(original_transcript(speech))
    assert word_error_rate(SPOKEN, text) <= 0.15


def test_serve_model_dir_wins_over_an_exported_repository(repository, speech, tmp_path):
    """`serve --model-dir` on a repository whose config.pbtxt names its own model: the command line
    wins (settings precedence), so the engine loads the given directory, not the repository's."""
    import shutil

    from whisper_triton.export.ct2_weights import bundled_tiny_en_dir

    broken = tmp_path / "repo"
    shutil.copytree(repository, broken, symlinks=True)
    (broken / ENGINE_SUBDIR / "model.bin").unlink()  # the repository's own model cannot load any more
    chosen = tmp_path / "chosen-model"
    shutil.copytree(bundled_tiny_en_dir(), chosen)
    log: list[str] = []
    text = transcribe_with_serve(tmp_path, serve_env(tmp_path, WHISPER_TRITON_MODEL_REPOSITORY=str(broken)), speech,
                                 args=("--model-dir", str(chosen)), log=log)
    assert word_error_rate(SPOKEN, text) <= 0.15
    assert f"model_dir={chosen}" in log[0]


def test_serve_fetches_the_repository_from_s3(s3_endpoint, repository, speech, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/served/repo"
    upload_directory(repository, uri)
    text = transcribe_with_serve(tmp_path, serve_env(tmp_path, WHISPER_TRITON_MODEL_S3_URI=uri), speech)
    assert words(text) == words(original_transcript(speech))
    assert word_error_rate(SPOKEN, text) <= 0.15
