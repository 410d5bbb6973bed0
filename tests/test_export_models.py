"""`whisper-export models`: several LoRA fine-tunes of one base in one step, and the manifest `serve` reads."""

from __future__ import annotations

import json

import pytest

import export_fixtures as fx
from whisper_triton.contract.models import RegistryManifest
from whisper_triton.export.common import ExportError
from whisper_triton.export.models import ModelsExportConfig, adapter_id, adapters_in, export_models, parse_pairs


def fake_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    return folder


def test_adapter_folders_become_ids_and_ids_are_checked(tmp_path):
    fake_adapter(tmp_path / "adapters" / "Legal German")
    fake_adapter(tmp_path / "adapters" / "call_centre")
    (tmp_path / "adapters" / "notes").mkdir()  # not an adapter: left out
    assert adapters_in(tmp_path / "adapters") == {"legal-german": str(tmp_path / "adapters" / "Legal German"),
                                                  "call_centre": str(tmp_path / "adapters" / "call_centre")}
    assert parse_pairs(["med=/a", "/b/legal"], "adapter") == {"med": "/a", "legal": "/b/legal"}
    for bad in (["../x=/a"], ["a=/x", "a=/y"]):
        with pytest.raises(ExportError):
            parse_pairs(bad, "adapter")
    with pytest.raises(ExportError):
        adapter_id(tmp_path / "---")


def test_clashing_ids_and_an_unknown_default_are_refused_before_any_merge(tmp_path):
    base = str(fx.tiny_hf_dir())
    with pytest.raises(ExportError, match="used twice"):
        export_models(ModelsExportConfig(base_dir=base, output_dir=str(tmp_path / "out"), adapters={"base": "/x"}))
    with pytest.raises(ExportError, match="--default"):
        export_models(ModelsExportConfig(base_dir=base, output_dir=str(tmp_path / "out"), default="nope"))
    assert not (tmp_path / "out" / "models.json").exists()


def test_two_adapters_in_one_step_give_two_merged_models_and_their_manifest():
    out = fx.exported_models()
    manifest = RegistryManifest.load(out / "models.json")
    assert [m.id for m in manifest.models] == ["lora-a", "lora-b"] and manifest.default_id == "lora-a"
    for model in manifest.models:
        directory = out / model.path
        assert (directory / "model.bin").is_file() and (directory / "tokenizer.json").is_file()
        card = json.loads((directory / "whisper_model.json").read_text())
        assert card["multilingual"] is False and card["translate"] is False and card["n_mels"] == 80
        assert model.adapter.endswith(model.id)
    assert (out / "lora-a" / "model.bin").read_bytes() != (out / "lora-b" / "model.bin").read_bytes()
    assert not (out / ".merged").exists()  # the merged checkpoints are removed once converted
