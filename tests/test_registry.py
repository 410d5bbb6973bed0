"""The registry's decisions, in-process and exact: which model is unloaded (the least recently used
idle one, never one in use, never the default), when a load waits, when it is refused (507, 503 +
Retry-After), and what a failed load leaves. Triton's repository API is replaced by a recorder of the
calls the registry makes (the real one is exercised in test_multi_model.py); the engine models are
rendered into a real copy of the repository template."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from whisper_triton.contract.models import ManifestModel, RegistryManifest
from whisper_triton.errors import OverloadedError, WhisperTritonError
from whisper_triton.registry import ModelRegistry, RegistryConfig

TEMPLATE = Path(__file__).resolve().parents[1] / "model_repo_whisper_trtllm" / "whisper_window"


class RecordingControl:
    """Records load / unload; a load can be held until released, or made to fail once."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.held: dict[str, asyncio.Event] = {}
        self.fail_once: set[str] = set()

    async def load(self, name: str) -> None:
        self.calls.append(("load", name))
        if name in self.held:
            await self.held[name].wait()
        if name in self.fail_once:
            self.fail_once.discard(name)
            raise WhisperTritonError("The model failed to load.", "model", 500, "model_load_failed")

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))

    async def capabilities(self, name: str) -> dict:
        return {"engine": "recorded", "name": name}

    async def close(self) -> None:
        pass

    def unloaded(self) -> list[str]:
        return [name.removeprefix("whisper_window-") for kind, name in self.calls if kind == "unload"]


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"\0" * 16)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def registry(tmp_path: Path, budget: float, models: dict[str, float], **config) -> tuple[ModelRegistry, RecordingControl]:
    repository = tmp_path / "repository"
    repository.mkdir()
    shutil.copytree(TEMPLATE, repository / "whisper_window", symlinks=True)
    if models:
        RegistryManifest(models=[ManifestModel(id=name, path=str(fake_model(tmp_path / name)), memory_mb=cost)
                                 for name, cost in models.items()]).save(tmp_path)
    control = RecordingControl()
    default = fake_model(tmp_path / "default-model")
    options = dict(repository=repository, default_id="default", default_model_dir=str(default),
                   manifest=tmp_path / "models.json" if models else None, memory_budget_mb=budget, load_wait_s=5, load_timeout_s=5,
                   load_roots=(tmp_path / "roots",))
    options.update(config)
    return ModelRegistry(RegistryConfig(**options), control), control


async def use(reg: ModelRegistry, name: str, **kwargs) -> None:
    async with reg.lease(name, **kwargs):
        pass


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_the_least_recently_used_idle_model_goes_never_one_in_use(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={"a": 100, "b": 100, "c": 100})
        await reg.start()
        reg.config.memory_budget_mb = reg.view("default").memory_mb + 200  # two of a, b, c at once
        async with reg.lease("a"):  # a: in use, and from now on the least recently used
            await use(reg, "b")
            await use(reg, "c")  # room for c: b goes, although a is older
            assert control.unloaded() == ["b"]
            assert reg.view("a").state == "loaded" and reg.view("a").in_use == 1
        await use(reg, "b")  # a counts as used until its request ended: now c is the least recently used
        assert control.unloaded() == ["b", "c"] and reg.view("default").unloads == 0
        assert (reg.config.repository / "whisper_window-b" / "config.pbtxt").is_file()

    run(scenario())


def test_a_load_waits_for_a_model_in_use_then_takes_its_place(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={"a": 100, "b": 100})
        await reg.start()
        reg.config.memory_budget_mb = reg.view("default").memory_mb + 100
        held = asyncio.Event()

        async def hold_a():
            async with reg.lease("a"):
                await held.wait()

        holder = asyncio.create_task(hold_a())
        while reg.view("a").in_use == 0:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(use(reg, "b"))
        await asyncio.sleep(0.2)
        assert reg.view("b").state == "loading" and control.unloaded() == []  # waiting for room, a untouched
        held.set()
        await asyncio.gather(holder, waiting)
        assert control.unloaded() == ["a"] and reg.view("b").state == "loaded"

    run(scenario())


def test_a_model_larger_than_the_budget_left_is_refused_with_507(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={"big": 10_000})
        await reg.start()
        reg.config.memory_budget_mb = reg.view("default").memory_mb + 100
        with pytest.raises(WhisperTritonError) as info:
            await use(reg, "big")
        assert info.value.status == 507 and info.value.param == "model"
        assert control.calls == [] and reg.view("big").state == "unloaded"

    run(scenario())


def test_a_slow_load_answers_503_with_retry_after_and_goes_on(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={"slow": 100}, retry_after_s=7)
        await reg.start()
        control.held["whisper_window-slow"] = asyncio.Event()
        with pytest.raises(OverloadedError) as info:
            await use(reg, "slow", wait_s=0.1)
        assert info.value.status == 503 and info.value.headers() == {"Retry-After": "7"}
        assert info.value.param == "model" and reg.view("slow").state == "loading"
        control.held["whisper_window-slow"].set()
        await use(reg, "slow")  # the load went on: the retry finds it
        assert [c for c in control.calls if c[0] == "load"] == [("load", "whisper_window-slow")]
        assert reg.view("slow").loads == 1 and reg.view("slow").capabilities["engine"] == "recorded"

    run(scenario())


def test_a_failed_load_reaches_its_request_and_the_next_one_tries_again(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={"flaky": 100})
        await reg.start()
        control.fail_once.add("whisper_window-flaky")
        with pytest.raises(WhisperTritonError) as info:
            await use(reg, "flaky")
        assert info.value.status == 500 and reg.view("flaky").state == "unloaded"
        await use(reg, "flaky")
        assert reg.view("flaky").loads == 1

    run(scenario())


def test_names_resolve_by_id_and_alias_and_unknown_ones_are_404(tmp_path):
    async def scenario():
        reg, _ = registry(tmp_path, budget=0, models={"a": 100})
        await reg.start()
        assert reg.resolve(None) == reg.resolve("") == reg.resolve("whisper-1") == "default"
        assert reg.resolve("a") == "a"
        with pytest.raises(WhisperTritonError) as info:
            reg.resolve("nope")
        assert info.value.status == 404 and info.value.param == "model" and "a" in info.value.message

    run(scenario())


def test_sagemaker_loads_only_from_the_roots_and_name_each_model_once(tmp_path):
    async def scenario():
        reg, control = registry(tmp_path, budget=0, models={})
        await reg.start()
        root = tmp_path / "roots"
        model = fake_model(root / "abc123" / "model")
        outside = fake_model(tmp_path / "outside")
        (root / "link").symlink_to(outside)
        for url in (str(outside), str(root / "link"), f"{root}/../outside", "relative/path"):
            with pytest.raises(WhisperTritonError) as info:
                await reg.register_sagemaker("m1", url)
            assert info.value.status == 400 and info.value.param == "url", url
        with pytest.raises(WhisperTritonError) as info:
            await reg.register_sagemaker("../m1", str(model))
        assert info.value.status == 400 and info.value.param == "model_name"
        await reg.register_sagemaker("abc123", str(model), "x.tar.gz")
        with pytest.raises(WhisperTritonError) as info:
            await reg.register_sagemaker("abc123", str(model))
        assert info.value.status == 409
        assert [r.id for r in reg.sagemaker_models()] == ["abc123"]
        await reg.unregister("abc123")
        assert control.unloaded() == ["abc123"] and reg.sagemaker_models() == []
        with pytest.raises(WhisperTritonError) as info:
            await reg.unregister("abc123")
        assert info.value.status == 404

    run(scenario())


def test_a_model_named_by_an_s3_prefix_is_fetched_checked_once_and_loaded(tmp_path, moto_url, monkeypatch):
    """The manifest's `s3_uri`: fetched on first use with the sha256-checked download of the export
    (moto on loopback), then rendered from the local copy; a corrupted object is refused."""
    import boto3

    from conftest import reset_moto
    from whisper_triton.export.s3 import upload_directory

    reset_moto(moto_url)
    for key, value in {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    upload_directory(fake_model(tmp_path / "upload" / "legal"), "s3://models/legal")
    upload_directory(fake_model(tmp_path / "upload" / "broken"), "s3://models/broken")
    s3.put_object(Bucket="models", Key="broken/model.bin", Body=b"not what the manifest says")

    async def scenario():
        reg, control = registry(tmp_path / "reg", budget=0, models={}, cache_dir=tmp_path / "cache")
        RegistryManifest(models=[ManifestModel(id="legal", s3_uri="s3://models/legal", memory_mb=100),
                                 ManifestModel(id="broken", s3_uri="s3://models/broken", memory_mb=100)]
                         ).save(tmp_path / "reg")
        reg.config.manifest = tmp_path / "reg" / "models.json"
        await reg.start()
        await use(reg, "legal")
        config = (reg.config.repository / "whisper_window-legal" / "config.pbtxt").read_text()
        assert str(tmp_path / "cache") in config and reg.view("legal").state == "loaded"
        with pytest.raises(WhisperTritonError) as info:
            await use(reg, "broken")
        assert info.value.status == 502 and info.value.param == "model" and "sha256" in info.value.message
        assert ("load", "whisper_window-broken") not in control.calls

    (tmp_path / "reg").mkdir()
    run(scenario())
