import pytest

from multilingual import multilingual_tokenizer_json
from whisper_triton.errors import WhisperTritonError
from whisper_triton.pipeline.tokenizer import PromptSpec, WhisperTokenizer

MULTILINGUAL_PREFIX = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


@pytest.fixture(scope="module")
def en(model_dir):
    return WhisperTokenizer.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def multi(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilingual")
    multilingual_tokenizer_json(model_dir / "tokenizer.json", folder)
    return WhisperTokenizer.from_model_dir(folder)


def test_vocabulary_layouts_are_told_apart(en, multi):
    assert not en.is_multilingual and multi.is_multilingual
    assert (en.eot, en.sot) == (50256, 50257)
    assert (multi.eot, multi.sot) == (50257, 50258)
    assert len(en.language_ids) == 99 and len(multi.language_ids) == 100
    assert multi.language_ids["en"] == 50259 and multi.no_timestamps == 50364
    assert en.timestamp_begin == 50363 and multi.timestamp_begin == 50365


def test_english_only_prompt_never_has_language_or_task_tokens(en):
    spec = en.parse_text_prefix(MULTILINGUAL_PREFIX)
    assert spec == PromptSpec(language="en", task="transcribe", timestamps=False)
    assert en.prompt_ids(spec) == [en.sot, en.no_timestamps]
    assert en.prompt_ids(PromptSpec(timestamps=True)) == [en.sot]


def test_multilingual_prompts(multi):
    assert multi.prompt_ids(multi.parse_text_prefix("<|startoftranscript|><|de|><|translate|><|notimestamps|>")) == [
        multi.sot, multi.language_ids["de"], multi.translate, multi.no_timestamps]
    # no language in the prefix: the detected one is used
    spec = multi.parse_text_prefix("<|startoftranscript|>")
    assert spec.language is None and spec.timestamps
    assert multi.prompt_ids(spec, language="fr") == [multi.sot, multi.language_ids["fr"], multi.transcribe]


def test_previous_text_prompt(en):
    spec = en.parse_text_prefix("<|startofprev|> Hello there.<|startoftranscript|><|notimestamps|>")
    assert spec.previous_text == "Hello there."
    ids = en.prompt_ids(spec)
    assert ids[0] == en.sot_prev and ids[-2:] == [en.sot, en.no_timestamps]
    assert en.decode(ids) == " Hello there."
    long_spec = PromptSpec(previous_text="word " * 1000)
    assert len(en.prompt_ids(long_spec)) == 1 + 223 + 2


def test_text_round_trip_and_special_tokens_dropped(en):
    ids = en.encode(" The cat is sleeping.")
    assert en.decode([en.sot, en.no_timestamps] + ids + [en.timestamp_begin + 5, en.eot]) == " The cat is sleeping."


@pytest.mark.parametrize("prefix, param", [
    ("<|startoftranscript|><|de|><|transcribe|>", "language"),
    ("<|startoftranscript|><|en|><|translate|>", "task"),
    ("<|startoftranscript|><|xx|><|transcribe|>", "language"),
    ("<|startoftranscript|><|bogus_token|>", "TEXT_PREFIX"),
    ("<|en|><|transcribe|>", "TEXT_PREFIX"),
    ("<|startoftranscript|> stray words", "TEXT_PREFIX"),
])
def test_english_only_model_refuses_what_it_cannot_do(en, prefix, param):
    with pytest.raises(WhisperTritonError) as info:
        en.parse_text_prefix(prefix)
    assert info.value.param == param and info.value.status == 400


def test_multilingual_accepts_other_languages_and_translate(multi):
    spec = multi.parse_text_prefix("<|startoftranscript|><|ja|><|translate|><|notimestamps|>")
    assert (spec.language, spec.task) == ("ja", "translate")
    with pytest.raises(WhisperTritonError):
        multi.validate_language("klingon")
