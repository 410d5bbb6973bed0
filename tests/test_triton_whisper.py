"""The `whisper` model on a real tritonserver, spoken to the way NVIDIA's Whisper clients do."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.pipeline.windows import ShortFormTranscriber, ShortRequest

pytestmark = pytest.mark.triton  # starts a real tritonserver / serve

PREFIX = b"<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"


@pytest.fixture(scope="module")
def client(serve):
    with grpcclient.InferenceServerClient(serve.grpc_url) as triton:
        yield triton


def padded_request(clips: list[np.ndarray], prefix: bytes = PREFIX, pad_to: int = 480000, lens=None):
    wav = np.zeros((len(clips), pad_to), dtype=np.float32)
    for row, clip in enumerate(clips):
        wav[row, : clip.size] = clip
    lengths = np.array([[c.size] for c in clips] if lens is None else lens, dtype=np.int32)
    inputs = [grpcclient.InferInput("WAV", list(wav.shape), "FP32"),
              grpcclient.InferInput("WAV_LENS", list(lengths.shape), "INT32"),
              grpcclient.InferInput("TEXT_PREFIX", [len(clips), 1], "BYTES")]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(lengths)
    inputs[2].set_data_from_numpy(np.array([[prefix]] * len(clips), dtype=object))
    return inputs


def transcripts(result) -> list[str]:
    return [row[0].decode() for row in result.as_numpy("TRANSCRIPTS")]


def test_model_metadata_is_nvidia_compatible(client):
    metadata = client.get_model_metadata("whisper")
    inputs = {tensor.name: (tensor.datatype, list(tensor.shape)) for tensor in metadata.inputs}
    assert inputs["WAV"] == ("FP32", [-1, -1])
    assert inputs["WAV_LENS"] == ("INT32", [-1, 1])
    assert inputs["TEXT_PREFIX"] == ("BYTES", [-1, 1])
    assert {t.name: t.datatype for t in metadata.outputs}["TRANSCRIPTS"] == "BYTES"
    assert client.get_model_config("whisper").config.max_batch_size > 1


def test_padded_batch_matches_direct_engine_and_http(client, serve, speech_clips, ct2_engine, tokenizer):
    clips = [clip.samples for clip in speech_clips[:4]]
    texts = transcripts(client.infer("whisper", padded_request(clips)))
    direct = [r.text for r in ShortFormTranscriber(ct2_engine, tokenizer).transcribe([ShortRequest(a) for a in clips])]
    assert texts == direct
    import httpx

    for clip, text in zip(speech_clips[:4], texts):
        reply = httpx.post(serve.url + "/invocations", content=clip.wav_bytes,
                           headers={"Content-Type": "audio/wav"}, timeout=60)
        assert reply.status_code == 200 and reply.json()["text"] == text
        assert word_error_rate(clip.text, text) <= 0.15


def test_wav_lens_is_honoured(client, speech_clips):
    clip = speech_clips[0].samples
    noisy_tail = np.concatenate([clip, np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)])
    # the true length excludes the loud tail; the padding must be ignored
    text = transcripts(client.infer("whisper", padded_request([noisy_tail], lens=[[clip.size]])))[0]
    assert word_error_rate(speech_clips[0].text, text) <= 0.15


def test_minimal_request_without_optional_inputs(client, speech_clips):
    clip = speech_clips[2].samples.reshape(1, -1)
    wav = grpcclient.InferInput("WAV", list(clip.shape), "FP32")
    wav.set_data_from_numpy(clip)
    result = client.infer("whisper", [wav])
    assert word_error_rate(speech_clips[2].text, transcripts(result)[0]) <= 0.15
    assert result.as_numpy("LANGUAGE")[0][0] == b"en"


def test_concurrent_requests_are_batched(client, serve, speech_clips):
    def stats():
        model = client.get_inference_statistics("whisper_window").model_stats[0]
        return model.inference_count, model.execution_count

    before = stats()
    clips = [speech_clips[i % len(speech_clips)] for i in range(8)]

    def one(clip):
        with grpcclient.InferenceServerClient(serve.grpc_url) as own:
            return transcripts(own.infer("whisper", padded_request([clip.samples])))[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        texts = list(pool.map(one, clips))
    for clip, text in zip(clips, texts):
        assert word_error_rate(clip.text, text) <= 0.15
    deadline = time.monotonic() + 10  # statistics can lag the last response slightly
    while True:
        inferences, executions = (a - b for a, b in zip(stats(), before))
        if inferences >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert inferences == 8
    assert executions < inferences, f"{executions} executions for {inferences} requests: nothing was batched"


@pytest.mark.parametrize("prefix, lens, expected", [
    (b"<|startoftranscript|><|de|><|transcribe|><|notimestamps|>", None, "English-only"),
    (PREFIX, [[10 ** 7]], "WAV_LENS"),
    (b"not a prefix", None, "Malformed"),
])
def test_bad_requests_fail_alone(client, speech_clips, prefix, lens, expected):
    with pytest.raises(InferenceServerException) as info:
        client.infer("whisper", padded_request([speech_clips[0].samples], prefix=prefix, lens=lens))
    assert expected in info.value.message()
    # the server is still up and answers the next request correctly
    text = transcripts(client.infer("whisper", padded_request([speech_clips[0].samples])))[0]
    assert word_error_rate(speech_clips[0].text, text) <= 0.15


def test_padded_wav_longer_than_30_seconds_is_transcribed_whole(client, speech_clips):
    pause = np.zeros(16000, np.float32)
    clips = speech_clips * 2
    long_clip = np.concatenate([part for clip in clips for part in (clip.samples, pause)])
    padded_to = -(-long_clip.size // 480000) * 480000  # NVIDIA's clients pad to a multiple of 30 s
    assert long_clip.size > 480000
    text = transcripts(client.infer("whisper", padded_request([long_clip], pad_to=padded_to)))[0]
    assert word_error_rate(" ".join(clip.text for clip in clips), text) <= 0.15


def prompt_request(clips: list[np.ndarray], prompts: list[list[int]]):
    """Rows of WAV with one decoder prompt each (PROMPT_IDS -1 padded), as `transcribe` sends to `whisper_window`."""
    wav = np.zeros((len(clips), max(c.size for c in clips)), dtype=np.float32)
    for row, clip in enumerate(clips):
        wav[row, : clip.size] = clip
    ids = np.full((len(prompts), max(len(p) for p in prompts)), -1, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    lengths = np.array([[c.size] for c in clips], dtype=np.int32)
    inputs = [grpcclient.InferInput("WAV", list(wav.shape), "FP32"),
              grpcclient.InferInput("WAV_LENS", list(lengths.shape), "INT32"),
              grpcclient.InferInput("PROMPT_IDS", list(ids.shape), "INT32")]
    for tensor, array in zip(inputs, (wav, lengths, ids)):
        tensor.set_data_from_numpy(array)
    return inputs


def test_each_row_keeps_its_own_prompt(client, speech_clips, tokenizer):
    from whisper_triton.pipeline.tokenizer import PromptSpec

    clips = [speech_clips[0].samples, speech_clips[1].samples]
    prompts = [tokenizer.prompt_ids(PromptSpec(language="en", timestamps=True)),
               tokenizer.prompt_ids(PromptSpec(language="en", timestamps=False, previous_text="Groceries."))]
    assert prompts[0] != prompts[1]

    def tokens(result) -> list[list[int]]:
        return [[int(t) for t in row if t >= 0] for row in result.as_numpy("TOKENS")]

    together = tokens(client.infer("whisper_window", prompt_request(clips, prompts)))
    alone = [tokens(client.infer("whisper_window", prompt_request([clip], [prompt])))[0]
             for clip, prompt in zip(clips, prompts)]
    assert together == alone
    assert any(t >= tokenizer.timestamp_begin for t in together[0])  # the first row decoded with timestamps
    assert not any(t >= tokenizer.timestamp_begin for t in together[1])
    with pytest.raises(InferenceServerException, match="PROMPT_IDS"):
        client.infer("whisper_window", prompt_request(clips + [clips[0]], prompts + [prompts[0][:1] + [10**6]]))
