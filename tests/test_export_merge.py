"""Merge step: CTranslate2 -> HF/openai conversion, LoRA merge verification, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import export_fixtures as fx
from whisper_triton.export.common import DONE_MARKER, ExportError, is_complete
from whisper_triton.export.ct2_weights import bundled_tiny_en_dir, ct2_to_openai, read_ct2_model
from whisper_triton.export.merge import MergeConfig, fixed_inputs, hf_logits, run_merge
from whisper_triton.export.openai_model import load_openai_model


def test_ct2_reader_maps_tiny_en_exactly():
    model = read_ct2_model(bundled_tiny_en_dir())
    dims, state = ct2_to_openai(model)
    assert (dims.n_mels, dims.n_audio_state, dims.n_audio_layer, dims.n_vocab, dims.n_text_ctx) == (80, 384, 4, 51864, 448)
    fused = model.variables["encoder/layer_0/self_attention/linear_0/weight"]
    assert fused.shape == (1152, 384) and fused.dtype == np.float16
    np.testing.assert_array_equal(state["encoder.blocks.0.attn.key.weight"], fused[384:768])
    kv = model.variables["decoder/layer_3/attention/linear_1/weight"]
    np.testing.assert_array_equal(state["decoder.blocks.3.cross_attn.value.weight"], kv[384:])
    assert "encoder.blocks.0.attn.key.bias" not in state
    assert sum(a.size for a in state.values()) - state["encoder.positional_embedding"].size > 37_000_000


def test_hf_checkpoint_from_ct2_matches_openai_layout():
    from transformers import WhisperForConditionalGeneration

    hf_dir = fx.tiny_hf_dir()
    assert is_complete(hf_dir, "hf-from-ct2")
    hf = WhisperForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    dims, state = ct2_to_openai(read_ct2_model(bundled_tiny_en_dir()))
    openai = load_openai_model({"dims": dims.to_dict(), "model_state_dict": {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}})
    mel, tokens = fixed_inputs(hf.config)
    with torch.no_grad():
        diff = (openai(mel, tokens) - hf_logits(hf, mel, tokens)).abs().max().item()
    assert diff < 1e-3


@pytest.fixture(scope="module")
def nonzero_merge(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    report = run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), adapter_dir=str(fx.make_adapter("lora-nonzero", 0.02)), output_dir=str(out)))
    return out, report


def test_nonzero_lora_changes_logits_and_merge_matches_peft(nonzero_merge):
    out, report = nonzero_merge
    assert report.lora_changed_logits > 0.1  # the adapter really does something
    assert report.lora_max_abs_diff <= 1e-3  # stated tolerance: merged == PEFT within 1e-3 (float32 logits)
    assert report.openai_max_abs_diff <= 1e-3
    assert is_complete(out, "merge")
    saved = json.loads((out / "merge_report.json").read_text())["report"]
    assert saved["lora_max_abs_diff"] == report.lora_max_abs_diff
    checkpoint = torch.load(out / "openai" / "model.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"dims", "model_state_dict"} and checkpoint["dims"]["n_mels"] == 80
    assert (out / "hf" / "tokenizer.json").is_file() and (out / "hf" / "model.safetensors").is_file()


def test_zero_lora_merge_leaves_weights_and_logits_identical(tmp_path):
    from transformers import WhisperForConditionalGeneration

    out = tmp_path / "merged-zero"
    report = run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), adapter_dir=str(fx.make_adapter("lora-zero", 0.0)), output_dir=str(out)))
    assert report.lora_changed_logits == 0.0
    base = WhisperForConditionalGeneration.from_pretrained(str(fx.tiny_hf_dir()), dtype=torch.float32).state_dict()
    merged = WhisperForConditionalGeneration.from_pretrained(str(out / "hf"), dtype=torch.float32).state_dict()
    assert set(base) == set(merged)
    assert all(torch.equal(base[name], merged[name]) for name in base)


def test_merge_without_adapter_converts_base(tmp_path):
    report = run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), output_dir=str(tmp_path / "plain"), save_dtype="float16"))
    assert report.adapter is None and report.lora_max_abs_diff is None
    assert report.openai_max_abs_diff < 1e-3 and report.saved_max_abs_diff < 1e-3  # fp16 source: exact in fp16


def _assert_nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), adapter_dir=str(tmp_path / "nope"), output_dir=str(tmp_path / "out")))
    _assert_nothing_written(tmp_path, "out")


def test_wrong_shaped_adapter_is_a_clear_error(tmp_path):
    adapter = fx.make_adapter("lora-wrong-size", 0.02, base=fx.small_random_whisper_dir())
    with pytest.raises(ExportError, match="does not fit the base model"):
        run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), adapter_dir=str(adapter), output_dir=str(tmp_path / "out")))
    _assert_nothing_written(tmp_path, "out")


def test_non_whisper_dir_is_a_clear_error(tmp_path):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ExportError, match="not Whisper"):
        run_merge(MergeConfig(base_dir=str(other), output_dir=str(tmp_path / "out")))
    with pytest.raises(ExportError, match="no config.json"):
        run_merge(MergeConfig(base_dir=str(tmp_path), output_dir=str(tmp_path / "out")))
    _assert_nothing_written(tmp_path, "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_is_a_clear_error_nonroot(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ExportError, match="not writable"):
        run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), output_dir=str(locked / "out")))


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError, match="Cannot create the output's parent"):
        run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), output_dir=str(blocker / "sub" / "out")))


def test_failure_mid_write_leaves_previous_output_untouched(tmp_path, monkeypatch):
    import whisper_triton.export.merge as merge

    out = tmp_path / "merged"
    run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), output_dir=str(out), save_dtype="float16"))
    before = (out / DONE_MARKER).read_text()

    def broken_check(*args, **kwargs):
        raise ExportError("simulated failure after writing")

    monkeypatch.setattr(merge, "_check_saved", broken_check)
    with pytest.raises(ExportError, match="simulated"):
        run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), output_dir=str(out)))
    assert (out / DONE_MARKER).read_text() == before and is_complete(out, "merge")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
