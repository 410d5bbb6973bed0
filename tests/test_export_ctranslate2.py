"""CTranslate2 export of the merged tiny.en decodes real speech like the original model."""

from __future__ import annotations

import pytest

import export_fixtures as fx
from whisper_triton.pipeline.audio import decode_audio
from whisper_triton.engines import DecodeOptions, load_engine
from whisper_triton.export.common import is_complete
from whisper_triton.export.ct2_weights import bundled_tiny_en_dir
from whisper_triton.export.ctranslate2_export import CT2ExportConfig, export_ctranslate2
from whisper_triton.export.merge import MergeConfig, run_merge
from whisper_triton.pipeline.features import batch_log_mel
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct2")
    run_merge(MergeConfig(base_dir=str(fx.tiny_hf_dir()), adapter_dir=str(fx.make_adapter("lora-zero", 0.0)),
                          output_dir=str(root / "merged"), save_dtype="float16"))
    return export_ctranslate2(CT2ExportConfig(hf_dir=str(root / "merged" / "hf"), output_dir=str(root / "ct2")))


def _decode(model_dir):
    engine = load_engine("ctranslate2", str(model_dir))
    tokenizer = WhisperTokenizer.from_model_dir(model_dir)
    audio = decode_audio(fx.speech_wav())
    features = batch_log_mel([audio], engine.n_mels)
    prompt = tokenizer.prompt_ids(PromptSpec())
    hypothesis = engine.generate(features, [prompt], DecodeOptions(beam_size=1))[0]
    return hypothesis.tokens, tokenizer.decode(hypothesis.tokens)


def test_export_decodes_real_speech_to_the_original_tokens(exported):
    assert is_complete(exported, "ctranslate2")
    assert (exported / "tokenizer.json").is_file() and (exported / "model.bin").is_file()
    original_tokens, original_text = _decode(bundled_tiny_en_dir())
    tokens, text = _decode(exported)
    assert tokens == original_tokens
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    # real speech, really recognised (greedy tiny.en writes "She tells the shell by the sea shore", as faster-whisper does)
    assert {"the", "quick", "over", "lazy", "shell", "sea", "shore"} <= words
