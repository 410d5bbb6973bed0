"""TensorRT-LLM checkpoint (layout of the pinned release) and the engine build orchestration."""

from __future__ import annotations

import json
import os
import stat
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from whisper_triton.export.common import ExportError, is_complete
from whisper_triton.export.ct2_weights import bundled_tiny_en_dir, openai_checkpoint_from_ct2
from whisper_triton.export.engine_build import build_engines, build_plan, engines_ready, write_manifest_for_existing
from whisper_triton.contract.engine_manifest import BuildConfig, EngineManifest
from whisper_triton.export.merge import fixed_inputs
from whisper_triton.export.openai_model import load_openai_model
from whisper_triton.export.trtllm_checkpoint import (CheckpointConfig, dequantize_per_channel, quantize_per_channel,
                                                     trtllm_to_openai, weight_only_logit_error, write_trtllm_checkpoint)
from whisper_triton.contract.release import TENSORRT_LLM_VERSION


class _Cfg:
    num_mel_bins, decoder_start_token_id, vocab_size = 80, 50257, 51864


@pytest.fixture(scope="module")
def openai_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "model.pt"
    torch.save(openai_checkpoint_from_ct2(bundled_tiny_en_dir(), dtype="float16"), path)
    return path


@pytest.fixture(scope="module")
def fp16_checkpoint(openai_pt, tmp_path_factory):
    return write_trtllm_checkpoint(openai_pt, tmp_path_factory.mktemp("trt") / "ckpt", CheckpointConfig(dtype="float16"))


def _expected_encoder_names(layers: int) -> dict[str, tuple]:
    d, mels = 384, 80
    names = {"conv1.weight": (d, mels, 3, 1), "conv1.bias": (d,), "conv2.weight": (d, d, 3, 1), "conv2.bias": (d,),
             "positional_embedding": (1500, d), "position_embedding.weight": (1500, d),
             "ln_post.weight": (d,), "ln_post.bias": (d,)}
    for i in range(layers):
        p = f"encoder_layers.{i}"
        names.update({f"{p}.attention_layernorm.weight": (d,), f"{p}.attention_layernorm.bias": (d,),
                      f"{p}.attention.qkv.weight": (3 * d, d), f"{p}.attention.qkv.bias": (3 * d,),
                      f"{p}.attention.dense.weight": (d, d), f"{p}.attention.dense.bias": (d,),
                      f"{p}.mlp_layernorm.weight": (d,), f"{p}.mlp_layernorm.bias": (d,),
                      f"{p}.mlp.fc.weight": (4 * d, d), f"{p}.mlp.fc.bias": (4 * d,),
                      f"{p}.mlp.proj.weight": (d, 4 * d), f"{p}.mlp.proj.bias": (d,)})
    return names


def _expected_decoder_names(layers: int) -> dict[str, tuple]:
    d, vocab = 384, 51864
    names = {"embedding.vocab_embedding.weight": (vocab, d), "embedding.position_embedding.weight": (448, d),
             "lm_head.weight": (vocab, d), "final_layernorm.weight": (d,), "final_layernorm.bias": (d,)}
    for i in range(layers):
        p = f"decoder_layers.{i}"
        for attn in ("self_attention", "cross_attention"):
            names.update({f"{p}.{attn}_layernorm.weight": (d,), f"{p}.{attn}_layernorm.bias": (d,),
                          f"{p}.{attn}.qkv.weight": (3 * d, d), f"{p}.{attn}.qkv.bias": (3 * d,),
                          f"{p}.{attn}.dense.weight": (d, d), f"{p}.{attn}.dense.bias": (d,)})
        names.update({f"{p}.mlp_layernorm.weight": (d,), f"{p}.mlp_layernorm.bias": (d,),
                      f"{p}.mlp.fc.weight": (4 * d, d), f"{p}.mlp.fc.bias": (4 * d,),
                      f"{p}.mlp.proj.weight": (d, 4 * d), f"{p}.mlp.proj.bias": (d,)})
    return names


def test_checkpoint_names_shapes_and_config_fields_match_the_pinned_release(fp16_checkpoint):
    assert TENSORRT_LLM_VERSION == "0.17.0"
    encoder = load_file(str(fp16_checkpoint / "encoder" / "rank0.safetensors"))
    decoder = load_file(str(fp16_checkpoint / "decoder" / "rank0.safetensors"))
    assert {n: tuple(t.shape) for n, t in encoder.items()} == _expected_encoder_names(4)
    assert {n: tuple(t.shape) for n, t in decoder.items()} == _expected_decoder_names(4)
    assert all(t.dtype == torch.float16 for t in [*encoder.values(), *decoder.values()])
    enc_cfg = json.loads((fp16_checkpoint / "encoder" / "config.json").read_text())
    dec_cfg = json.loads((fp16_checkpoint / "decoder" / "config.json").read_text())
    assert {k: enc_cfg[k] for k in ("architecture", "dtype", "num_hidden_layers", "num_attention_heads", "hidden_size",
                                     "n_mels", "n_audio_ctx", "vocab_size", "hidden_act", "num_languages")} == {
        "architecture": "WhisperEncoder", "dtype": "float16", "num_hidden_layers": 4, "num_attention_heads": 6,
        "hidden_size": 384, "n_mels": 80, "n_audio_ctx": 1500, "vocab_size": 51864, "hidden_act": "gelu", "num_languages": 99}
    assert enc_cfg["quantization"] == {"quant_algo": None}
    expected_decoder = {
        "architecture": "DecoderModel", "dtype": "float16", "logits_dtype": "float16", "num_hidden_layers": 4,
        "num_attention_heads": 6, "hidden_size": 384, "norm_epsilon": 1e-5, "vocab_size": 51864, "hidden_act": "gelu",
        "use_parallel_embedding": False, "embedding_sharding_dim": 0, "max_position_embeddings": 448,
        "use_prompt_tuning": False, "head_size": 64, "has_position_embedding": True, "layernorm_type": 0,
        "has_attention_qkvo_bias": True, "has_mlp_bias": True, "has_model_final_layernorm": True,
        "has_embedding_layernorm": False, "has_embedding_scale": False, "ffn_hidden_size": 1536, "q_scaling": 1.0,
        "layernorm_position": 0, "relative_attention": False, "max_distance": 0, "num_buckets": 0, "model_type": "whisper",
        "rescale_before_lm_head": False, "encoder_hidden_size": 384, "encoder_num_heads": 6, "encoder_head_size": None,
        "skip_cross_qkv": False}
    assert {k: dec_cfg[k] for k in expected_decoder} == expected_decoder
    # fused QKV with a zero key bias, in every attention
    for name, tensor in [*encoder.items(), *decoder.items()]:
        if name.endswith("qkv.bias"):
            assert torch.count_nonzero(tensor[384:768]) == 0 and torch.count_nonzero(tensor[:384]) > 0
    assert torch.equal(decoder["lm_head.weight"], decoder["embedding.vocab_embedding.weight"])
    assert is_complete(fp16_checkpoint, "trtllm-checkpoint")


def test_round_trip_loads_strictly_and_reproduces_logits(openai_pt, fp16_checkpoint):
    source = torch.load(openai_pt, map_location="cpu", weights_only=True)
    back = trtllm_to_openai(fp16_checkpoint)
    assert set(back["model_state_dict"]) == set(source["model_state_dict"])
    assert all(torch.equal(back["model_state_dict"][n], source["model_state_dict"][n]) for n in source["model_state_dict"])
    mel, tokens = fixed_inputs(_Cfg)
    with torch.no_grad():
        diff = (load_openai_model(back)(mel, tokens) - load_openai_model(source)(mel, tokens)).abs().max().item()
    assert diff == 0.0


def test_bfloat16_and_weight_only_options(openai_pt, tmp_path):
    out = write_trtllm_checkpoint(openai_pt, tmp_path / "bf16-int8", CheckpointConfig(dtype="bfloat16", weight_only_precision="int8"))
    for part in ("encoder", "decoder"):
        assert json.loads((out / part / "config.json").read_text())["quantization"] == {"quant_algo": "W8A16"}
        assert all(t.dtype == torch.bfloat16 for t in load_file(str(out / part / "rank0.safetensors")).values())
    back = trtllm_to_openai(out)
    load_openai_model(back)  # strict
    with pytest.raises(ExportError, match="dtype must be"):
        write_trtllm_checkpoint(openai_pt, tmp_path / "bad", CheckpointConfig(dtype="int8"))
    assert not (tmp_path / "bad").exists()


def test_per_channel_quantisation_and_its_logit_effect(openai_pt):
    weight = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    for bits, qmax in ((8, 127), (4, 7)):
        quantized, scale = quantize_per_channel(weight, bits)
        assert quantized.dtype == torch.int8 and scale.shape == (12,)
        assert quantized.shape == ((10, 12) if bits == 8 else (10, 6))
        torch.testing.assert_close(scale, weight.abs().amax(dim=1) / qmax)
        assert (dequantize_per_channel(quantized, scale, bits) - weight).abs().le(scale[:, None] / 2 + 1e-6).all()
    checkpoint = torch.load(openai_pt, map_location="cpu", weights_only=True)
    mel, tokens = fixed_inputs(_Cfg)
    int8_error = weight_only_logit_error(checkpoint, 8, mel, tokens)
    int4_error = weight_only_logit_error(checkpoint, 4, mel, tokens)
    assert 0 < int8_error < 2.0 and int8_error < int4_error


# ---- engine build -------------------------------------------------------------------------------
def test_build_commands_cover_whisper_context_and_runtime_needs(fp16_checkpoint, tmp_path):
    plan = build_plan(BuildConfig(n_mels=80, max_batch_size=4, max_beam_width=2), fp16_checkpoint, tmp_path / "engines")
    enc, dec = plan.encoder, plan.decoder

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1]

    assert flag(enc, "--checkpoint_dir").endswith("ckpt/encoder") and flag(dec, "--output_dir").endswith("engines/decoder")
    # prompt + generated tokens share the decoder's 448-row position table: never more (prompt + 448
    # would read past it), never the upstream README's 114
    assert flag(dec, "--max_seq_len") == "448"
    assert int(flag(dec, "--max_input_len")) == BuildConfig().max_prompt_len == 228  # 1 + 223 previous + 4 start tokens
    assert "114" not in dec
    assert flag(dec, "--kv_cache_type") == "paged" and flag(dec, "--remove_input_padding") == "enable"
    assert flag(enc, "--remove_input_padding") == "enable" and flag(enc, "--max_input_len") == "3000"
    assert flag(dec, "--max_beam_width") == "2" and flag(dec, "--max_batch_size") == "4"
    assert flag(dec, "--gpt_attention_plugin") == "float16" and flag(dec, "--max_encoder_input_len") == "3000"


def test_bad_build_configs_are_refused(fp16_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="below Whisper's 448"):
        build_engines(BuildConfig(n_mels=80, max_output_len=96), fp16_checkpoint, tmp_path / "e")
    with pytest.raises(ExportError, match="n_mels=128"):
        build_engines(BuildConfig(n_mels=128), fp16_checkpoint, tmp_path / "e")
    with pytest.raises(ExportError, match="paged_kv_cache"):
        build_engines(BuildConfig(n_mels=80, paged_kv_cache=False), fp16_checkpoint, tmp_path / "e")
    with pytest.raises(ExportError, match="leaves no room"):
        build_engines(BuildConfig(n_mels=None, max_prompt_len=448), fp16_checkpoint, tmp_path / "e")


def test_without_trtllm_build_it_stops_and_prints_the_commands(fp16_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(ExportError) as info:
        build_engines(BuildConfig(n_mels=80), fp16_checkpoint, tmp_path / "engines")
    message = str(info.value)
    assert "trtllm-build is not on PATH" in message
    assert f"trtllm-build --checkpoint_dir {fp16_checkpoint}/encoder" in message
    assert "--max_seq_len 448" in message and "--max_seq_len 480" not in message
    assert not (tmp_path / "engines").exists()


def _fake_tool(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_build_runs_trtllm_build_and_writes_the_manifest(fp16_checkpoint, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins with the real tools' interfaces: trtllm-build writes an engine and its config
    _fake_tool(bin_dir, "trtllm-build", f"""
        echo "[TensorRT-LLM] TensorRT-LLM version: {TENSORRT_LLM_VERSION}"
        while [ $# -gt 0 ]; do [ "$1" = "--output_dir" ] && out="$2"; shift; done
        mkdir -p "$out" && echo "engine for $out" > "$out/rank0.engine" && echo '{{"version": "{TENSORRT_LLM_VERSION}"}}' > "$out/config.json"
        """)
    _fake_tool(bin_dir, "nvidia-smi", 'echo "8.6, NVIDIA A10G"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = BuildConfig(n_mels=80, max_batch_size=4)
    manifest = build_engines(config, fp16_checkpoint, tmp_path / "engines")
    loaded = EngineManifest.load(tmp_path / "engines")
    assert loaded == manifest
    assert (loaded.tensorrt_llm_version, loaded.gpu_arch, loaded.gpu_name) == (TENSORRT_LLM_VERSION, "sm_86", "NVIDIA A10G")
    assert loaded.build == config and loaded.model["n_mels"] == 80 and loaded.model["is_multilingual"] is False
    assert {"encoder/rank0.engine", "decoder/rank0.engine", "encoder/config.json"} <= set(loaded.files)
    assert engines_ready(tmp_path / "engines")
    (tmp_path / "engines" / "decoder" / "rank0.engine").write_text("tampered")
    assert not engines_ready(tmp_path / "engines")
    write_manifest_for_existing(config, fp16_checkpoint, tmp_path / "engines")
    assert engines_ready(tmp_path / "engines")


def _fake_build_tools(tmp_path, monkeypatch, version: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_tool(bin_dir, "trtllm-build", f"""
        echo "[TensorRT-LLM] TensorRT-LLM version: {version}"
        while [ $# -gt 0 ]; do [ "$1" = "--output_dir" ] && out="$2"; shift; done
        mkdir -p "$out" && echo "engine for $out" > "$out/rank0.engine" && echo '{{"version": "{version}"}}' > "$out/config.json"
        """)
    _fake_tool(bin_dir, "nvidia-smi", 'echo "8.6, NVIDIA A10G"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_post_release_of_the_pin_builds_and_n_mels_comes_from_the_checkpoint(fp16_checkpoint, tmp_path, monkeypatch):
    """PyPI has only tensorrt-llm 0.17.0.post1: the same release as the pinned 0.17.0."""
    _fake_build_tools(tmp_path, monkeypatch, "0.17.0.post1")
    manifest = build_engines(BuildConfig(n_mels=None), fp16_checkpoint, tmp_path / "engines")  # what the CLI passes
    assert manifest.tensorrt_llm_version == "0.17.0.post1"
    assert manifest.build.n_mels == 80 == EngineManifest.load(tmp_path / "engines").build.n_mels  # tiny.en's, not a default
    card = json.loads((tmp_path / "engines" / "whisper_model.json").read_text())
    assert card["translate"] is False and card["multilingual"] is False and card["n_mels"] == 80  # English-only


def test_the_engine_directory_gets_the_tokenizer_and_a_ctranslate2_copy(fp16_checkpoint, tmp_path, monkeypatch):
    from whisper_triton.export.ct2_weights import bundled_tiny_en_dir

    _fake_build_tools(tmp_path, monkeypatch, TENSORRT_LLM_VERSION)
    source = bundled_tiny_en_dir()
    build_engines(BuildConfig(n_mels=80), fp16_checkpoint, tmp_path / "engines", ctranslate2_dir=source)
    engines = tmp_path / "engines"
    for name in ("tokenizer.json", "config.json"):
        assert (engines / name).read_bytes() == (source / name).read_bytes()
    assert (engines / "ctranslate2" / "model.bin").stat().st_size == (source / "model.bin").stat().st_size
    assert "ctranslate2/model.bin" in EngineManifest.load(engines).files and engines_ready(engines)
    from whisper_triton.engines import load_engine

    aligner = load_engine("ctranslate2", str(engines / "ctranslate2"), cpu_threads=1)  # what the GPU engine aligns with
    assert aligner.n_mels == 80
    with pytest.raises(ExportError, match="not a CTranslate2 Whisper model"):
        build_engines(BuildConfig(n_mels=80), fp16_checkpoint, tmp_path / "engines2", ctranslate2_dir=tmp_path)


def test_build_refuses_a_different_tensorrt_llm_version(fp16_checkpoint, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "trtllm-build", 'echo "[TensorRT-LLM] TensorRT-LLM version: 0.18.2"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ExportError, match="0.18.2.*pins 0.17.0"):
        build_engines(BuildConfig(n_mels=80), fp16_checkpoint, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_the_cli_takes_n_mels_from_the_checkpoint_not_a_default(fp16_checkpoint, tmp_path, monkeypatch):
    from whisper_triton.export import cli

    assert cli.build_parser().parse_args(["build-engines", "--checkpoint", "c", "--output", "o"]).n_mels is None
    _fake_build_tools(tmp_path, monkeypatch, TENSORRT_LLM_VERSION)
    assert cli.main(["build-engines", "--checkpoint", str(fp16_checkpoint), "--output", str(tmp_path / "engines")]) == 0
    assert EngineManifest.load(tmp_path / "engines").build.n_mels == 80
    assert cli.main(["build-engines", "--checkpoint", str(fp16_checkpoint), "--output", str(tmp_path / "e128"),
                     "--n-mels", "128"]) == 2  # said, and wrong: refused
    assert not (tmp_path / "e128").exists()
