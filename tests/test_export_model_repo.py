"""Model repository layout: config.pbtxt rendered structurally (parsed back with Triton's protobuf),
batch size limits, GPU vs CPU instance groups, n_mels checks, manifest, CLI, load-time resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from whisper_triton.export import cli
from whisper_triton.export.common import ExportError, is_complete, sha256_file
from whisper_triton.export.ct2_weights import bundled_tiny_en_dir
from whisper_triton.contract.engine_manifest import BuildConfig, EngineManifest
from whisper_triton.export.model_repo import (ENGINE_SUBDIR, REPOSITORY_MANIFEST, ModelRepoConfig, RenderValues,
                                              check_model_repository, default_template_dir, render_whisper_config,
                                              resolve_model_dir_parameter, write_model_repository)
from whisper_triton.contract.release import TENSORRT_LLM_VERSION, TRITON_SERVER_VERSION

KIND = model_config_pb2.ModelInstanceGroup.Kind


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def template_models() -> set[str]:
    return {p.name for p in default_template_dir().iterdir() if (p / "config.pbtxt").is_file()}


@pytest.fixture
def engine_dir(tmp_path) -> Path:
    """An engine directory as `build-engines` writes it (built for batch 4, 128 mels); the engine
    files themselves are stand-ins: layout and rendering only read the manifest and config.json."""
    root = tmp_path / "engines"
    for part in ("encoder", "decoder"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps({"version": TENSORRT_LLM_VERSION,
                                                            "build_config": {"max_batch_size": 4, "max_beam_width": 4}}))
        (root / part / "rank0.engine").write_bytes(part.encode() * 1000)
    shutil.copy(bundled_tiny_en_dir() / "tokenizer.json", root / "tokenizer.json")
    build = BuildConfig(max_batch_size=4, n_mels=128)
    EngineManifest(tensorrt_llm_version=TENSORRT_LLM_VERSION, gpu_arch="sm_86", gpu_name="NVIDIA A10G", build=build,
                   model={"n_mels": 128, "vocab_size": 51866, "is_multilingual": True}).save(root)
    return root


def test_render_parses_back_with_gpu_or_cpu_instance_group():
    template = (default_template_dir() / "whisper_window" / "config.pbtxt").read_text()
    original = text_format.Parse(template, model_config_pb2.ModelConfig())
    for device, kind in (("cuda", KIND.KIND_GPU), ("cpu", KIND.KIND_CPU)):
        values = RenderValues(max_batch_size=3, engine="tensorrtllm" if device == "cuda" else "ctranslate2",
                              model_dir=ENGINE_SUBDIR, device=device, compute_type="int8" if device == "cpu" else "",
                              cpu_threads=2 if device == "cpu" else 0)
        config = text_format.Parse(render_whisper_config(template, values), model_config_pb2.ModelConfig())
        assert config.max_batch_size == 3
        assert [(g.kind, g.count) for g in config.instance_group] == [(kind, 1)]
        assert params(config) == {"engine": values.engine, "model_dir": "whisper/1/engine", "device": device,
                                  "compute_type": values.compute_type, "cpu_threads": "2" if device == "cpu" else "",
                                  "encoder_cache_mb": ""}
        # everything else is the template's, field for field
        for name in ("name", "backend", "input", "output", "dynamic_batching"):
            assert getattr(config, name) == getattr(original, name), name


def test_ctranslate2_repository_layout_and_manifest(tmp_path):
    model = bundled_tiny_en_dir()
    out = write_model_repository(ModelRepoConfig(model_dir=str(model), output_dir=str(tmp_path / "repo")))
    assert is_complete(out, "model-repo")
    assert {p.name for p in out.iterdir() if p.is_dir()} == template_models()  # every model of the template
    config = parse(out / "whisper_window" / "config.pbtxt")
    assert config.max_batch_size == parse(default_template_dir() / "whisper_window" / "config.pbtxt").max_batch_size
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_CPU, 1)]
    assert params(config)["engine"] == "ctranslate2" and params(config)["device"] == "cpu"
    assert params(config)["model_dir"] == ENGINE_SUBDIR
    for name in ("model.bin", "tokenizer.json"):
        assert sha256_file(out / ENGINE_SUBDIR / name) == sha256_file(model / name)
    assert (out / "whisper" / "1" / "model.py").read_text() == (default_template_dir() / "whisper" / "1" / "model.py").read_text()
    assert not list(out.rglob("__pycache__"))

    manifest = json.loads((out / REPOSITORY_MANIFEST).read_text())
    assert manifest["engine"] == "ctranslate2" and manifest["n_mels"] == 80 and manifest["max_batch_size"] == 8
    assert manifest["versions"]["tensorrt_llm"] == TENSORRT_LLM_VERSION
    assert manifest["versions"]["triton_server"] == TRITON_SERVER_VERSION
    assert manifest["model"]["ctranslate2_version"]
    files = manifest["files"]
    assert f"{ENGINE_SUBDIR}/model.bin" in files and "whisper/config.pbtxt" in files
    for rel, info in files.items():
        assert (out / rel).stat().st_size == info["size"] and sha256_file(out / rel) == info["sha256"], rel
    check_model_repository(out)


def test_tensorrtllm_repository_takes_the_engine_build(engine_dir, tmp_path):
    out = write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(tmp_path / "repo")))
    config = parse(out / "whisper_window" / "config.pbtxt")
    assert config.max_batch_size == 4
    assert [(g.kind, g.count) for g in config.instance_group] == [(KIND.KIND_GPU, 1)]
    # no `gpus` list: Triton makes one instance on each GPU (model_instance_device_id tells it which),
    # instead of every instance on GPU 0
    assert [list(g.gpus) for g in config.instance_group] == [[]]
    assert params(config)["engine"] == "tensorrtllm" and params(config)["device"] == "cuda"
    assert (out / ENGINE_SUBDIR / "manifest.json").is_file() and (out / ENGINE_SUBDIR / "decoder" / "rank0.engine").is_file()
    manifest = json.loads((out / REPOSITORY_MANIFEST).read_text())
    assert manifest["model"]["gpu_arch"] == "sm_86" and manifest["build"]["max_batch_size"] == 4

    smaller = write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(tmp_path / "repo2"),
                                                     build=BuildConfig(max_batch_size=2, n_mels=128)))
    assert parse(smaller / "whisper_window" / "config.pbtxt").max_batch_size == 2


def test_batch_size_above_the_engine_and_wrong_n_mels_are_refused(engine_dir, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(ExportError, match=r"max_batch_size 8 is above the engine's build limit of 4.*--max-batch-size 4"):
        write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(out),
                                               build=BuildConfig(max_batch_size=8, n_mels=128)))
    with pytest.raises(ExportError, match=r"n_mels=80 but the model has n_mels=128.*--n-mels 128"):
        write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(out), n_mels=80))
    with pytest.raises(ExportError, match=r"n_mels=128 but the model has n_mels=80"):
        write_model_repository(ModelRepoConfig(model_dir=str(bundled_tiny_en_dir()), output_dir=str(out), n_mels=128))
    with pytest.raises(ExportError, match="GPU only"):
        write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(out), device="cpu"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]  # nothing half-written


def test_bad_inputs_give_clear_errors(tmp_path):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    with pytest.raises(ExportError, match="neither a TensorRT-LLM engine directory.*nor a CTranslate2"):
        write_model_repository(ModelRepoConfig(model_dir=str(not_a_model), output_dir=str(tmp_path / "a")))
    with pytest.raises(ExportError, match="does not exist"):
        write_model_repository(ModelRepoConfig(model_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "b")))
    no_tokenizer = tmp_path / "ct2"
    no_tokenizer.mkdir()
    shutil.copy(bundled_tiny_en_dir() / "model.bin", no_tokenizer / "model.bin")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        write_model_repository(ModelRepoConfig(model_dir=str(no_tokenizer), output_dir=str(tmp_path / "c")))
    with pytest.raises(ExportError, match="not a Whisper model repository template"):
        write_model_repository(ModelRepoConfig(model_dir=str(bundled_tiny_en_dir()), output_dir=str(tmp_path / "d"),
                                               template_dir=str(tmp_path)))
    with pytest.raises(ExportError, match="no whisper_window/config.pbtxt"):
        check_model_repository(tmp_path)


def test_other_template_models_declaring_model_dir_share_it(tmp_path):
    template = tmp_path / "template"
    for name in ("whisper", "whisper_window"):
        shutil.copytree(default_template_dir() / name, template / name, ignore=shutil.ignore_patterns("__pycache__"))
    (template / "helper" / "1").mkdir(parents=True)
    (template / "helper" / "config.pbtxt").write_text(
        'name: "helper"\nbackend: "python"\nparameters { key: "model_dir" value: { string_value: "" } }\n')
    (template / "plain" / "1").mkdir(parents=True)
    plain = 'name: "plain"\nbackend: "python"\n'
    (template / "plain" / "config.pbtxt").write_text(plain)
    out = write_model_repository(ModelRepoConfig(model_dir=str(bundled_tiny_en_dir()), output_dir=str(tmp_path / "repo"),
                                                 template_dir=str(template)))
    assert params(parse(out / "helper" / "config.pbtxt")) == {"model_dir": ENGINE_SUBDIR}
    assert (out / "plain" / "config.pbtxt").read_text() == plain  # nothing to render: copied as it is


def test_relative_model_dir_resolves_against_the_repository_root(tmp_path):
    repo = tmp_path / "repo"
    config = {"name": "whisper", "parameters": {"model_dir": {"string_value": ENGINE_SUBDIR},
                                                "engine": {"string_value": "ctranslate2"}}}
    resolved = resolve_model_dir_parameter(config, repo / "whisper")  # Triton's args["model_repository"]
    assert resolved["parameters"]["model_dir"]["string_value"] == str((repo / ENGINE_SUBDIR).resolve())
    assert resolved["parameters"]["engine"] == {"string_value": "ctranslate2"}
    assert config["parameters"]["model_dir"]["string_value"] == ENGINE_SUBDIR  # input untouched
    for unchanged in ({"parameters": {"model_dir": {"string_value": "/abs/model"}}},
                      {"parameters": {"model_dir": {"string_value": ""}}}, {"parameters": {}}, {}):
        assert resolve_model_dir_parameter(unchanged, repo / "whisper") == unchanged


def test_incomplete_repository_is_refused(tmp_path):
    out = write_model_repository(ModelRepoConfig(model_dir=str(bundled_tiny_en_dir()), output_dir=str(tmp_path / "repo")))
    shutil.rmtree(out / ENGINE_SUBDIR)
    with pytest.raises(ExportError, match="points model_dir at whisper/1/engine.*does not exist"):
        check_model_repository(out)


def test_cli_model_repo(tmp_path, engine_dir, caplog):
    out = tmp_path / "repo"
    assert cli.main(["model-repo", "--model-dir", str(bundled_tiny_en_dir()), "--output", str(out), "--max-batch-size", "4",
                     "--compute-type", "int8"]) == 0
    config = parse(out / "whisper_window" / "config.pbtxt")
    assert config.max_batch_size == 4 and params(config)["compute_type"] == "int8"
    assert cli.main(["model-repo", "--model-dir", str(engine_dir), "--output", str(tmp_path / "trt"),
                     "--max-batch-size", "16"]) == 2
    assert "above the engine's build limit of 4" in caplog.text
    assert not (tmp_path / "trt").exists()


def test_whisper_model_loads_a_relative_model_dir(tmp_path):
    from whisper_triton.triton_models.window_model import WindowModel

    out = write_model_repository(ModelRepoConfig(model_dir=str(bundled_tiny_en_dir()), output_dir=str(tmp_path / "repo")))
    config = json_format.MessageToDict(parse(out / "whisper_window" / "config.pbtxt"), preserving_proto_field_name=True)
    args = {"model_config": json.dumps(config), "model_repository": str(out / "whisper_window"), "model_version": "1"}
    model = WindowModel(None, args)  # the process' cwd is not the repository: only resolution finds the engine
    assert model.tokenizer is not None
