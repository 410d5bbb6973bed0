"""large-v3-turbo end to end on a random-weight model of its layout (32 encoder layers, 4 decoder
layers, 128 mel bins, 100 languages; width shrunk to 64 so it runs here): Hugging Face -> merge
(openai layout) -> TensorRT-LLM checkpoint -> the trtllm-build plan and a stand-in build -> model
repositories for both engines; the CTranslate2 export loads and decodes in the CTranslate2 engine and
is served by a real `serve`. The model says it cannot translate (whisper_model.json)."""

from __future__ import annotations

import json
import os
import stat
import textwrap

import httpx
import numpy as np
import pytest

from conftest import start_serve
from multilingual import multilingual_tokenizer_json
from whisper_triton.export.ctranslate2_export import CT2ExportConfig, export_ctranslate2
from whisper_triton.export.engine_build import build_engines, build_plan, resolve_build_config
from whisper_triton.contract.engine_manifest import BuildConfig
from whisper_triton.export.merge import MergeConfig, run_merge
from whisper_triton.export.model_card import ModelCard
from whisper_triton.export.model_repo import ENGINE_SUBDIR, ModelRepoConfig, write_model_repository
from whisper_triton.export.trtllm_checkpoint import CheckpointConfig, trtllm_to_openai, write_trtllm_checkpoint
from whisper_triton.contract.release import TENSORRT_LLM_VERSION

TURBO = dict(vocab_size=51866, num_mel_bins=128, encoder_layers=32, decoder_layers=4)


@pytest.fixture(scope="module")
def turbo(tmp_path_factory, model_dir):
    """A random-weight large-v3-turbo-layout Hugging Face model, merged, converted both ways."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisper_triton.pipeline.tokenizer import WhisperTokenizer

    root = tmp_path_factory.mktemp("turbo")
    hf_dir = root / "hf"
    config = WhisperConfig(**TURBO, d_model=64, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256,
                           decoder_ffn_dim=256, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257)
    torch.manual_seed(11)
    model = WhisperForConditionalGeneration(config)
    multilingual_tokenizer_json(model_dir / "tokenizer.json", hf_dir)
    tokenizer = WhisperTokenizer.from_model_dir(hf_dir)
    model.generation_config.lang_to_id = {f"<|{code}|>": token for code, token in tokenizer.language_ids.items()}
    model.generation_config.task_to_id = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
    model.generation_config.is_multilingual = True
    model.generation_config.no_timestamps_token_id = tokenizer.no_timestamps
    model.generation_config._from_model_config = False
    model.save_pretrained(str(hf_dir))
    run_merge(MergeConfig(base_dir=str(hf_dir), output_dir=str(root / "merged")))
    checkpoint = write_trtllm_checkpoint(root / "merged" / "openai", root / "checkpoint", CheckpointConfig(dtype="float16"))
    ct2 = export_ctranslate2(CT2ExportConfig(hf_dir=str(root / "merged" / "hf"), output_dir=str(root / "ct2"),
                                             quantization="float32"))
    return {"root": root, "checkpoint": checkpoint, "ct2": ct2}


def test_the_checkpoint_has_the_turbo_layout(turbo):
    encoder = json.loads((turbo["checkpoint"] / "encoder" / "config.json").read_text())
    decoder = json.loads((turbo["checkpoint"] / "decoder" / "config.json").read_text())
    assert (encoder["num_hidden_layers"], encoder["n_mels"], encoder["num_languages"]) == (32, 128, 100)
    assert (decoder["num_hidden_layers"], decoder["vocab_size"], decoder["max_position_embeddings"]) == (4, 51866, 448)
    back = trtllm_to_openai(turbo["checkpoint"])  # the openai layout survives the round trip
    assert (back["dims"]["n_audio_layer"], back["dims"]["n_text_layer"], back["dims"]["n_mels"]) == (32, 4, 128)


def test_the_build_plan_takes_128_mels_from_the_checkpoint(turbo, tmp_path):
    config = resolve_build_config(BuildConfig(n_mels=None), turbo["checkpoint"])  # what the CLI passes by default
    assert config.n_mels == 128
    plan = build_plan(config, turbo["checkpoint"], tmp_path / "engines")
    assert plan.decoder[plan.decoder.index("--max_seq_len") + 1] == "448"
    assert plan.encoder[plan.encoder.index("--max_input_len") + 1] == "3000"


def test_the_ctranslate2_export_loads_decodes_and_cannot_translate(turbo):
    from whisper_triton.engines import DecodeOptions, load_engine

    card = ModelCard.load(turbo["ct2"])
    assert card == ModelCard(n_mels=128, n_audio_layer=32, n_text_layer=4, n_vocab=51866, multilingual=True,
                             translate=False, layout="large-v3-turbo")
    assert json.loads((turbo["ct2"] / "config.json").read_text())["translate"] is False  # where the engine reads it
    engine = load_engine("ctranslate2", str(turbo["ct2"]), cpu_threads=1)
    assert engine.n_mels == 128
    assert engine.capabilities.multilingual and not engine.capabilities.translate  # declared, not guessed
    features = np.random.default_rng(0).uniform(-1.0, 1.0, (1, 128, 3000)).astype(np.float32)
    [hypothesis] = engine.generate(features, [[50258, 50259, 50360, 50364]], DecodeOptions(beam_size=1, max_new_tokens=5))
    assert 1 <= len(hypothesis.tokens) <= 5 and all(0 <= t < 51866 for t in hypothesis.tokens)


def _fake_trtllm_build(bin_dir):
    """Stand-in with trtllm-build's interface: prints its version, writes an engine and its config."""
    bin_dir.mkdir()
    tool = bin_dir / "trtllm-build"
    tool.write_text("#!/bin/sh\n" + textwrap.dedent(f"""
        echo "[TensorRT-LLM] TensorRT-LLM version: {TENSORRT_LLM_VERSION}"
        while [ $# -gt 0 ]; do [ "$1" = "--output_dir" ] && out="$2"; shift; done
        mkdir -p "$out" && echo "engine" > "$out/rank0.engine" && echo '{{"version": "{TENSORRT_LLM_VERSION}"}}' > "$out/config.json"
        """))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_both_model_repositories_carry_the_no_translate_declaration(turbo, tmp_path, monkeypatch):
    _fake_trtllm_build(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    manifest = build_engines(BuildConfig(n_mels=None), turbo["checkpoint"], tmp_path / "engines", ctranslate2_dir=turbo["ct2"])
    assert manifest.build.n_mels == 128 and manifest.model["translate"] is False
    assert manifest.model["layout"] == "large-v3-turbo"
    for engine_dir in (tmp_path / "engines", turbo["ct2"]):
        engine = "tensorrtllm" if engine_dir.name == "engines" else "ctranslate2"
        repo = write_model_repository(ModelRepoConfig(model_dir=str(engine_dir), output_dir=str(tmp_path / f"repo-{engine}")))
        card = ModelCard.load(repo / ENGINE_SUBDIR)
        assert card is not None and card.translate is False and card.n_mels == 128, engine
    assert (tmp_path / "repo-tensorrtllm" / ENGINE_SUBDIR / "ctranslate2" / "model.bin").is_file()  # word alignment copy


@pytest.mark.triton
def test_the_turbo_layout_is_served_on_ctranslate2(turbo, tmp_path, speech_clips):
    repo = write_model_repository(ModelRepoConfig(model_dir=str(turbo["ct2"]), output_dir=str(tmp_path / "repo"),
                                                  cpu_threads=1))
    instance = start_serve(tmp_path, {"WHISPER_TRITON_MODEL_REPOSITORY": str(repo), "WHISPER_TRITON_CPU_THREADS": "1"})
    try:
        instance.wait_ready()
        reply = httpx.post(instance.url + "/invocations?language=en", content=speech_clips[0].wav_bytes, timeout=180,
                           headers={"Content-Type": "audio/wav",
                                    "X-Amzn-SageMaker-Custom-Attributes": "max_new_tokens=6,temperature=0"})
        assert reply.status_code == 200, reply.text + instance.log(40)
        assert reply.json()["language"] == "en" and isinstance(reply.json()["text"], str)
        refused = httpx.post(instance.url + "/invocations?language=fr&task=translate", content=speech_clips[0].wav_bytes,
                             timeout=180, headers={"Content-Type": "audio/wav"})
        assert refused.status_code == 400, refused.text  # the model declares it cannot translate
        assert "task" in refused.text and "Traceback" not in refused.text
    finally:
        instance.terminate()
