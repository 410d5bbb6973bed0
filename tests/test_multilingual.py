"""Multilingual code paths on a small random-weight multilingual Whisper (large-v3 layout:
100 languages, 128 mel bins) built here: language detection per file and per window, explicit
languages, translate prompts, in-process and through a real `serve`. Random weights make the
words meaningless; what is checked is what the pipeline asks the model and reports back."""


import httpx
import numpy as np
import pytest

from conftest import start_serve
from multilingual import multilingual_tokenizer_json
from whisper_triton.pipeline.longform import LongFormTranscriber, TranscribeOptions
from whisper_triton.pipeline.tokenizer import WhisperTokenizer
from whisper_triton.pipeline.windows import EngineWindowDecoder

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve


@pytest.fixture(scope="module")
def multilingual_dir(tmp_path_factory, model_dir):
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("multilingual")
    hf_dir, ct2_dir = root / "hf", root / "ct2"
    config = WhisperConfig(vocab_size=51866, num_mel_bins=128, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
                           decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257)
    torch.manual_seed(7)
    model = WhisperForConditionalGeneration(config)
    tokenizer_path = multilingual_tokenizer_json(model_dir / "tokenizer.json", hf_dir)
    tokenizer = WhisperTokenizer.from_model_dir(hf_dir)
    # what a real multilingual checkpoint's generation_config.json holds, and CTranslate2 reads
    model.generation_config.lang_to_id = {f"<|{code}|>": token for code, token in tokenizer.language_ids.items()}
    model.generation_config.task_to_id = {"transcribe": tokenizer.transcribe, "translate": tokenizer.translate}
    model.generation_config.is_multilingual = True
    model.generation_config.no_timestamps_token_id = tokenizer.no_timestamps
    model.generation_config._from_model_config = False  # else it is rebuilt from config.json on load
    model.save_pretrained(str(hf_dir))
    assert tokenizer_path.is_file()
    TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"]).convert(str(ct2_dir), quantization="float32")
    return ct2_dir


@pytest.fixture(scope="module")
def engine(multilingual_dir):
    from whisper_triton.engines import load_engine

    return load_engine("ctranslate2", str(multilingual_dir), cpu_threads=1)


class RecordingDecoder(EngineWindowDecoder):
    """The real in-process decoder, keeping the prompts it was asked to decode."""

    def __init__(self, engine, tokenizer):
        super().__init__(engine, tokenizer)
        self.prompts: list[list[int]] = []

    def decode(self, audios, prompts, options, word_timestamps=False, features=None, scope=None):
        self.prompts += prompts
        return super().decode(audios, prompts, options, word_timestamps, features, scope)


@pytest.fixture(scope="module")
def audio(speech_clips):
    return np.concatenate([speech_clips[0].samples, np.zeros(24000, np.float32)] * 9 + [speech_clips[1].samples])


FAST = dict(temperature=[0.0], max_new_tokens=8)


def test_model_is_recognised_as_multilingual(engine, multilingual_dir):
    tokenizer = WhisperTokenizer.from_model_dir(multilingual_dir, engine.is_multilingual)
    assert engine.is_multilingual and engine.n_mels == 128
    assert tokenizer.is_multilingual and len(tokenizer.language_ids) == 100


def test_language_detection_per_file_and_per_window(engine, multilingual_dir, audio):
    tokenizer = WhisperTokenizer.from_model_dir(multilingual_dir)
    decoder = RecordingDecoder(engine, tokenizer)
    pipeline = LongFormTranscriber(decoder, tokenizer)
    result = pipeline.transcribe(audio, TranscribeOptions(**FAST))
    assert result.language in tokenizer.language_ids and 0 < result.language_probability <= 1
    detected = tokenizer.language_ids[result.language]
    assert decoder.prompts and all(p[:3] == [tokenizer.sot, detected, tokenizer.transcribe] for p in decoder.prompts)

    decoder.prompts.clear()
    per_window = pipeline.transcribe(audio, TranscribeOptions(language_detection="chunk", **FAST))
    window_languages = {p[1] for p in decoder.prompts}
    assert window_languages <= set(tokenizer.language_ids.values())
    assert all(s.language in tokenizer.language_ids for s in per_window.segments)


def test_explicit_language_and_translate_prompts(engine, multilingual_dir, audio):
    tokenizer = WhisperTokenizer.from_model_dir(multilingual_dir)
    decoder = RecordingDecoder(engine, tokenizer)
    pipeline = LongFormTranscriber(decoder, tokenizer)
    result = pipeline.transcribe(audio, TranscribeOptions(language="de", task="translate", initial_prompt="Hallo.", **FAST))
    assert result.language == "de" and result.language_probability == 1.0
    for prompt in decoder.prompts:
        assert prompt[0] == tokenizer.sot_prev
        assert prompt[prompt.index(tokenizer.sot):][:3] == [tokenizer.sot, tokenizer.language_ids["de"], tokenizer.translate]


def test_multilingual_model_served_end_to_end(tmp_path, multilingual_dir, speech_clips):
    instance = start_serve(tmp_path, {"WHISPER_TRITON_MODEL_DIR": str(multilingual_dir),
                                      "WHISPER_TRITON_CPU_THREADS": "1"})
    try:
        instance.wait_ready()
        body = speech_clips[0].wav_bytes
        options = "max_new_tokens=8,temperature=0"
        detected = httpx.post(instance.url + "/invocations", content=body, timeout=120,
                              headers={"Content-Type": "audio/wav", "X-Amzn-SageMaker-Custom-Attributes": options})
        assert detected.status_code == 200, detected.text
        tokenizer = WhisperTokenizer.from_model_dir(multilingual_dir)
        assert detected.json()["language"] in tokenizer.language_ids
        translated = httpx.post(instance.url + "/invocations?language=fr&task=translate", content=body, timeout=120,
                                headers={"Content-Type": "audio/wav", "X-Amzn-SageMaker-Custom-Attributes": options})
        assert translated.status_code == 200 and translated.json()["language"] == "fr"
        unknown = httpx.post(instance.url + "/invocations?language=xx", content=body, timeout=120,
                             headers={"Content-Type": "audio/wav"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "language"
        # the NVIDIA-style whisper model detects the language itself when TEXT_PREFIX names none
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(instance.grpc_url) as client:
            wav = grpcclient.InferInput("WAV", [1, speech_clips[0].samples.size], "FP32")
            wav.set_data_from_numpy(speech_clips[0].samples.reshape(1, -1))
            prefix = grpcclient.InferInput("TEXT_PREFIX", [1, 1], "BYTES")
            prefix.set_data_from_numpy(np.array([[b"<|startoftranscript|>"]], dtype=object))
            tokens = grpcclient.InferInput("MAX_NEW_TOKENS", [1, 1], "INT32")
            tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))
            result = client.infer("whisper", [wav, prefix, tokens])
            assert result.as_numpy("LANGUAGE")[0][0].decode() in tokenizer.language_ids
    finally:
        instance.terminate()
