"""Several models on one endpoint, on real weights and a real `serve` (Triton in explicit model-control
mode): the embedded tiny.en (the default), the multilingual base, and two LoRA fine-tunes of tiny.en
made here with `whisper-export models` (the verified PEFT merge). One serve for the module, with a
memory budget that holds the default, base and one fine-tune: a fourth model forces the least
recently used idle one out, and a request for it loads it again.

The tests run in file order; each says what the registry holds when it starts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import export_fixtures as fx
from conftest import start_serve
from tritonclient.utils import InferenceServerException

from whisper_triton.contract.models import ManifestModel, RegistryManifest
from whisper_triton.contract.tensors import decode_error
from whisper_triton.pipeline.evaluation import word_error_rate
from whisper_triton.registry.catalog import estimate_memory_mb

pytestmark = pytest.mark.triton

DEFAULT, BASE, LORA_A, LORA_B = "whisper-tiny.en", "whisper-base", "lora-a", "lora-b"


@pytest.fixture(scope="module")
def models(base_model_dir, settings) -> dict[str, Path]:
    exported = fx.exported_models()
    return {DEFAULT: settings.resolved_model_dir(), BASE: base_model_dir, LORA_A: exported / LORA_A,
            LORA_B: exported / LORA_B}


@pytest.fixture(scope="module")
def budget_mb(models) -> float:
    """Room for the default, base and one fine-tune; never for both fine-tunes beside them."""
    cost = {name: estimate_memory_mb(path, "ctranslate2") for name, path in models.items()}
    return cost[DEFAULT] + cost[BASE] + max(cost[LORA_A], cost[LORA_B]) + 1.0


@pytest.fixture(scope="module")
def load_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sagemaker-models")


@pytest.fixture(scope="module")
def multi(tmp_path_factory, models, budget_mb, load_root):
    folder = tmp_path_factory.mktemp("multi")
    exported = {m.id: m for m in RegistryManifest.load(fx.exported_models()).models}
    manifest = RegistryManifest(default=DEFAULT, models=[
        ManifestModel(id=DEFAULT, path=str(models[DEFAULT])),
        ManifestModel(id=BASE, path=str(models[BASE]), aliases=("base",)),
        *[exported[m].model_copy(update={"path": str(models[m])}) for m in (LORA_A, LORA_B)]])
    manifest.save(folder)
    instance = start_serve(folder, {"WHISPER_TRITON_MODEL_MANIFEST": str(folder / "models.json"),
                                    "WHISPER_TRITON_MODEL_MEMORY_BUDGET_MB": f"{budget_mb:.1f}",
                                    "WHISPER_TRITON_MODEL_LOAD_ROOTS": str(load_root)})
    try:
        instance.wait_ready()
        yield instance
    finally:
        instance.terminate()


def invoke(url: str, audio: bytes, model: str | None = None, how: str = "query", **params) -> httpx.Response:
    headers, query = {"Content-Type": "audio/wav"}, dict(params)
    if model is not None and how == "query":
        query["model"] = model
    elif model is not None and how == "header":
        headers["X-Amzn-SageMaker-Target-Model"] = model
    elif model is not None and how == "attributes":
        headers["X-Amzn-SageMaker-Custom-Attributes"] = f"model={model}"
    return httpx.post(url + "/invocations", content=audio, headers=headers, params=query, timeout=300)


def status(url: str) -> dict[str, dict]:
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return {card["id"]: card["status"] for card in cards if "status" in card}


def in_process(model_dir: Path, audio: np.ndarray) -> dict:
    """The model alone, in this process: the pipeline over its own CTranslate2 engine."""
    from whisper_triton.engines import load_engine
    from whisper_triton.pipeline.longform import LongFormTranscriber
    from whisper_triton.pipeline.tokenizer import WhisperTokenizer
    from whisper_triton.pipeline.windows import EngineWindowDecoder

    engine = load_engine("ctranslate2", str(model_dir), cpu_threads=os.cpu_count() or 1)
    tokenizer = WhisperTokenizer.from_model_dir(model_dir, engine.is_multilingual)
    return LongFormTranscriber(EngineWindowDecoder(engine, tokenizer), tokenizer).transcribe(audio).to_dict()


def transcribe_grpc(url: str, audio: bytes, options: dict) -> dict:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        inputs = [grpcclient.InferInput("AUDIO", [1], "BYTES"), grpcclient.InferInput("OPTIONS", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([audio], dtype=object))
        inputs[1].set_data_from_numpy(np.array([json.dumps(options).encode()], dtype=object))
        return json.loads(client.infer("transcribe", inputs, client_timeout=300).as_numpy("RESULT")[0])


def test_models_are_listed_with_their_capabilities_and_only_the_default_is_loaded(multi):
    cards = {card["id"]: card for card in httpx.get(multi.url + "/v1/models", timeout=30).json()["data"]}
    assert {DEFAULT, BASE, LORA_A, LORA_B, "base", "whisper-1"} <= set(cards)
    assert cards["base"]["root"] == BASE and cards["whisper-1"]["root"] == DEFAULT
    assert cards[DEFAULT]["status"]["state"] == "loaded" and cards[DEFAULT]["status"]["default"] is True
    assert cards[DEFAULT]["capabilities"]["multilingual"] is False and cards[DEFAULT]["capabilities"]["engine"] == "ctranslate2"
    assert {cards[m]["status"]["state"] for m in (BASE, LORA_A, LORA_B)} == {"unloaded"}
    assert httpx.get(multi.url + f"/v1/models/{LORA_A}", timeout=30).json()["id"] == LORA_A
    missing = httpx.get(multi.url + "/v1/models/no-such-model", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_each_request_is_answered_by_the_model_it_names(multi, models, speech_clips):
    clip = speech_clips[0]
    default = invoke(multi.url, clip.wav_bytes).json()
    base = invoke(multi.url, clip.wav_bytes, "base").json()  # an alias
    lora = invoke(multi.url, clip.wav_bytes, LORA_A, how="attributes").json()
    lora_by_header = invoke(multi.url, clip.wav_bytes, LORA_A, how="header").json()
    for result in (default, base, lora):
        assert word_error_rate(clip.text, result["text"]) <= 0.25, result["text"]
    # English-only tiny.en never detects; base does, so its probability is its own (< 1)
    assert default["language_probability"] == 1.0 and 0.5 < base["language_probability"] < 1.0
    # the fine-tune: what the model gives alone, and not what tiny.en gives
    alone = in_process(models[LORA_A], clip.samples)
    assert lora["text"] == alone["text"] == lora_by_header["text"]
    assert [s["avg_logprob"] for s in lora["segments"]] == pytest.approx([s["avg_logprob"] for s in alone["segments"]],
                                                                          abs=2e-3)
    # misrouted to tiny.en, the same request would score exactly as tiny.en's did
    assert lora["segments"][0]["avg_logprob"] != default["segments"][0]["avg_logprob"]
    # each model's own capabilities: tiny.en cannot translate, base can
    refused = invoke(multi.url, clip.wav_bytes, DEFAULT, task="translate")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "task"
    assert invoke(multi.url, clip.wav_bytes, BASE, task="translate").status_code == 200
    unknown = invoke(multi.url, clip.wav_bytes, "no-such-model")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad = invoke(multi.url, clip.wav_bytes, "../../etc")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    state = status(multi.url)
    assert {state[m]["state"] for m in (DEFAULT, BASE, LORA_A)} == {"loaded"} and state[LORA_B]["state"] == "unloaded"


def test_concurrent_requests_to_different_models_share_the_engine_queue_without_mixing(multi, speech_clips):
    """Loaded: default, base, lora-a. Four requests at once, to three models and each of a different
    clip, get exactly what each gets alone."""
    jobs = [(model, speech_clips[i]) for i, model in enumerate([DEFAULT, BASE, LORA_A, BASE])]
    alone = [invoke(multi.url, clip.wav_bytes, model).json() for model, clip in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: invoke(multi.url, job[1].wav_bytes, job[0]).json(), jobs))
    for (model, clip), one, many in zip(jobs, alone, together):
        assert many["text"] == one["text"], (model, clip.text)
        assert many["language_probability"] == pytest.approx(one["language_probability"], abs=1e-3)
        assert [s["avg_logprob"] for s in many["segments"]] == pytest.approx(
            [s["avg_logprob"] for s in one["segments"]], abs=2e-3)
    assert status(multi.url)[LORA_B]["unloads"] == 0


def test_the_budget_unloads_the_least_recently_used_idle_model_and_reloads_it(multi, speech_clips):
    """Loaded: default, base, lora-a; the budget has no room for lora-b beside them."""
    clip = speech_clips[1]
    assert invoke(multi.url, clip.wav_bytes, LORA_A).status_code == 200
    assert invoke(multi.url, clip.wav_bytes, BASE).status_code == 200  # lora-a is now the least recent
    before = status(multi.url)
    assert invoke(multi.url, clip.wav_bytes, LORA_B).status_code == 200
    after = status(multi.url)
    assert after[LORA_A]["state"] == "unloaded" and after[LORA_A]["unloads"] == before[LORA_A]["unloads"] + 1
    assert after[BASE]["state"] == "loaded" and after[BASE]["loads"] == before[BASE]["loads"]
    assert after[LORA_B]["state"] == "loaded" and after[DEFAULT]["unloads"] == 0  # the default is never unloaded
    reloaded = invoke(multi.url, clip.wav_bytes, LORA_A)  # base is now the least recently used idle model
    assert reloaded.status_code == 200 and word_error_rate(clip.text, reloaded.json()["text"]) <= 0.25
    final = status(multi.url)
    assert final[LORA_A]["loads"] == before[LORA_A]["loads"] + 1 and final[BASE]["state"] == "unloaded"
    assert final[LORA_B]["state"] == "loaded"
    # gRPC callers name the model as Triton does: `transcribe` with the id in OPTIONS reaches a loaded
    # model, and an unloaded one is a 503 naming `model` (loading is the proxy's)
    assert transcribe_grpc(multi.grpc_url, clip.wav_bytes, {"model": LORA_B})["text"] == \
        invoke(multi.url, clip.wav_bytes, LORA_B).json()["text"]
    with pytest.raises(InferenceServerException) as info:
        transcribe_grpc(multi.grpc_url, clip.wav_bytes, {"model": BASE})
    error = decode_error(info.value.message())
    assert error is not None and error.status == 503 and error.param == "model"


def test_a_model_in_use_is_never_unloaded(multi, long_speech, speech_clips):
    """Loaded: default, lora-b, lora-a. A long file on lora-a is running when lora-b is used and base is
    asked for: lora-a is then the least recently used model, but in use, so lora-b goes instead."""
    from speech import encode

    audio = encode(long_speech.samples[: 120 * 16000], 16000, "flac", "flac")  # ~10x the short requests below
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.setdefault("reply", httpx.post(
        multi.url + "/invocations", params={"model": LORA_A}, content=audio,
        headers={"Content-Type": "audio/flac"}, timeout=600)))
    before = status(multi.url)
    thread.start()
    deadline = time.monotonic() + 60
    while status(multi.url)[LORA_A]["in_use"] != 1:
        assert time.monotonic() < deadline and thread.is_alive(), "the long request never held lora-a"
        time.sleep(0.1)
    assert invoke(multi.url, speech_clips[2].wav_bytes, LORA_B).status_code == 200
    # base's load chooses what to unload the moment it arrives: lora-a must still be decoding then
    assert thread.is_alive(), "the long request ended before base was asked for; lengthen it"
    assert invoke(multi.url, speech_clips[2].wav_bytes, BASE).status_code == 200
    thread.join(600)
    reply = holder["reply"]
    assert reply.status_code == 200, reply.text
    assert word_error_rate(long_speech.text, reply.json()["text"]) < 0.5  # a part of the text: a prefix of it
    after = status(multi.url)
    assert after[LORA_A]["unloads"] == before[LORA_A]["unloads"] and after[LORA_A]["state"] == "loaded"
    assert after[LORA_B]["unloads"] == before[LORA_B]["unloads"] + 1 and after[BASE]["state"] == "loaded"


def test_sagemaker_multi_model_contract(multi, models, load_root, speech_clips):
    """The calls SageMaker makes on a multi-model endpoint: load by opaque name and local url, list (paged),
    describe, invoke with the TargetModel header, unload; 409, 404, 400 where the contract says."""
    import shutil

    name = "2d5a1f0c9b7e4a3d8c6b5a4f3e2d1c0b"
    url = load_root / name / "model"
    shutil.copytree(models[LORA_B], url)
    headers = {"X-Amzn-SageMaker-Target-Model": "lora-b.tar.gz"}
    loaded = httpx.post(multi.url + "/models", json={"model_name": name, "url": str(url)}, headers=headers, timeout=300)
    assert loaded.status_code == 200, loaded.text
    again = httpx.post(multi.url + "/models", json={"model_name": name, "url": str(url)}, headers=headers, timeout=300)
    assert again.status_code == 409
    outside = httpx.post(multi.url + "/models", json={"model_name": "elsewhere", "url": str(models[LORA_A])}, timeout=60)
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "url"
    escape = httpx.post(multi.url + "/models", json={"model_name": "escape", "url": f"{load_root}/../{name}"}, timeout=60)
    assert escape.status_code == 400
    assert httpx.get(multi.url + "/models", timeout=30).json() == {"models": [{"modelName": name, "modelUrl": str(url)}]}
    assert httpx.get(multi.url + f"/models/{name}", timeout=30).json()["modelUrl"] == str(url)
    clip = speech_clips[3]
    invoked = httpx.post(multi.url + f"/models/{name}/invoke", content=clip.wav_bytes,
                         headers={"Content-Type": "audio/wav", **headers}, timeout=300)
    assert invoked.status_code == 200, invoked.text
    assert invoked.json()["text"] == invoke(multi.url, clip.wav_bytes, LORA_B).json()["text"]  # the same weights
    assert httpx.delete(multi.url + f"/models/{name}", headers=headers, timeout=300).status_code == 200
    assert httpx.get(multi.url + f"/models/{name}", timeout=30).status_code == 404
    assert httpx.delete(multi.url + f"/models/{name}", timeout=30).status_code == 404
    gone = httpx.post(multi.url + f"/models/{name}/invoke", content=clip.wav_bytes,
                      headers={"Content-Type": "audio/wav"}, timeout=60)
    assert gone.status_code == 404
    assert httpx.get(multi.url + "/models", timeout=30).json() == {"models": []}


def test_the_openai_sdk_chooses_models(multi, speech_clips, tmp_path):
    import openai

    client = openai.OpenAI(base_url=multi.url + "/v1", api_key="unused", max_retries=0)
    listed = {model.id for model in client.models.list()}
    assert {DEFAULT, BASE, LORA_A, LORA_B} <= listed
    clip = speech_clips[4]
    path = tmp_path / "clip.wav"
    path.write_bytes(clip.wav_bytes)
    with path.open("rb") as f:
        base = client.audio.transcriptions.create(model=BASE, file=f, response_format="verbose_json")
    with path.open("rb") as f:
        lora = client.audio.transcriptions.create(model=LORA_A, file=f, response_format="text")
    assert base.language == "english" and word_error_rate(clip.text, base.text) <= 0.25
    assert lora.strip() == invoke(multi.url, clip.wav_bytes, LORA_A).json()["text"]
    with path.open("rb") as f, pytest.raises(openai.NotFoundError) as info:
        client.audio.transcriptions.create(model="no-such-model", file=f)
    assert info.value.body["param"] == "model"
    with path.open("rb") as f, pytest.raises(openai.BadRequestError):
        client.audio.translations.create(model=DEFAULT, file=f)  # tiny.en cannot translate


def test_boto3_invoke_endpoint_target_model_through_the_runtime_emulator(multi, models, load_root, moto_url,
                                                                          monkeypatch, speech_clips):
    """A multi-model endpoint made by the deploy library on moto, its models uploaded by
    `whisper-deploy models-upload`; unmodified boto3 names one with TargetModel, and the emulator does
    what SageMaker does: fetch it from S3, POST /models, then /models/{name}/invoke."""
    import boto3
    from botocore.config import Config

    from conftest import reset_moto
    from test_emulator import point_boto3_at
    from whisper_triton.deploy import AwsClients, Deployer, DeploymentOptions, EndpointOptions, ModelOptions
    from whisper_triton.deploy.multi_model import upload_models
    from whisper_triton.sagemaker_local.emulator import EmulatorOptions, create_app, serve_in_thread

    reset_moto(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    options = EmulatorOptions(container_url=multi.url, models_dir=str(load_root / "emulator"))
    with serve_in_thread(create_app(options)) as emulator:
        point_boto3_at(monkeypatch, moto_url, emulator.url)
        boto3.client("s3").create_bucket(Bucket="whisper-mme")
        targets = upload_models(fx.exported_models() / "models.json", "s3://whisper-mme/models/", boto3.client("s3"))
        assert sorted(targets) == ["lora-a.tar.gz", "lora-b.tar.gz"]
        model = ModelOptions("123456789012.dkr.ecr.us-east-1.amazonaws.com/whisper-triton:0.1.0",
                             "s3://whisper-mme/models/", "arn:aws:iam::123456789012:role/whisper", multi_model=True)
        Deployer(AwsClients(max_attempts=1), poll_interval_s=0.01).deploy(
            DeploymentOptions("whisper-mme", model, EndpointOptions(instance_type="ml.g4dn.xlarge")))
        runtime = boto3.client("sagemaker-runtime", config=Config(retries={"total_max_attempts": 1}, read_timeout=300))
        clip = speech_clips[5]
        reply = runtime.invoke_endpoint(EndpointName="whisper-mme", TargetModel="lora-a.tar.gz", Body=clip.wav_bytes,
                                        ContentType="audio/wav")
        payload = json.loads(reply["Body"].read())
        assert payload["text"] == invoke(multi.url, clip.wav_bytes, LORA_A).json()["text"]
        loaded = httpx.get(multi.url + "/models", timeout=30).json()["models"]
        assert len(loaded) == 1 and loaded[0]["modelUrl"].startswith(str(load_root / "emulator"))
        with pytest.raises(runtime.exceptions.ClientError) as info:
            runtime.invoke_endpoint(EndpointName="whisper-mme", TargetModel="missing.tar.gz", Body=clip.wav_bytes,
                                    ContentType="audio/wav")
        assert info.value.response["Error"]["Code"] == "ValidationError"


def test_a_live_session_names_its_model_on_the_websocket_url(multi, speech_clips):
    """/v1/realtime?intent=transcription&model=lora-a: the session's windows go to lora-a's engine model,
    which the session holds while it runs; an unknown model is refused at connect, naming it."""
    import asyncio
    import base64

    import tritonclient.grpc as grpcclient
    import websockets

    from whisper_triton.pipeline.audio import encode_pcm16

    base_url = multi.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
    clip = speech_clips[0]
    pcm = encode_pcm16(np.concatenate([np.zeros(8000, np.float32), clip.samples, np.zeros(24000, np.float32)]))
    appends = [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 9600]).decode()})
               for i in range(0, len(pcm), 9600)]

    def windows_of(engine_model: str) -> int:
        with grpcclient.InferenceServerClient(multi.grpc_url) as client:
            return client.get_inference_statistics(engine_model).model_stats[0].inference_count

    async def session() -> tuple[str, int]:
        async with websockets.connect(base_url + f"&model={LORA_A}", max_size=None) as socket:
            for message in appends:
                await socket.send(message)
            in_use = status(multi.url)[LORA_A]["in_use"]
            async with asyncio.timeout(120):
                while True:
                    event = json.loads(await socket.recv())
                    if event["type"] == "conversation.item.input_audio_transcription.completed":
                        return event["transcript"], in_use

    async def refused() -> tuple[dict, int]:
        async with websockets.connect(base_url + "&model=no-such-model") as socket:
            event = json.loads(await socket.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
        return event, closed.value.rcvd.code

    assert invoke(multi.url, clip.wav_bytes, LORA_A).status_code == 200  # loaded, whatever came before
    before = windows_of("whisper_window-lora-a")
    transcript, in_use = asyncio.run(session())
    assert word_error_rate(clip.text, transcript) <= 0.25, transcript
    assert windows_of("whisper_window-lora-a") > before and in_use == 1
    event, code = asyncio.run(refused())
    assert event["error"]["code"] == "model_not_found" and "no-such-model" in event["error"]["message"] and code == 1008
