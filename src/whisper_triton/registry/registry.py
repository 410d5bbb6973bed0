"""The model registry of one endpoint: ids and aliases, which models are loaded, and the memory budget.

A request names a model (or none: the default); `lease(id)` makes sure that model is loaded and
holds it for as long as the request runs:
- a model that is not loaded is loaded first (its engine model rendered and loaded in Triton); the
  request waits for it at most `model_load_wait_s`, then gets 503 + Retry-After while the load goes
  on (SageMaker's ModelNotReadyException does the same), so a retry finds it loaded;
- before a load, models are unloaded while the budget would be exceeded, the least recently used
  first, never one that a request holds and never the default; when the rest are all in use the load
  waits for one of them to be released, bounded by `model_load_timeout_s`;
- a load that cannot fit at all (the model is larger than the budget left by pinned models) fails at
  once with 507, which SageMaker's multi-model contract answers by unloading models of its own.

The budget is per device, in MB: on a GPU instance every engine model has one instance per GPU, so
each model costs its memory on every GPU and one budget per device is the whole rule. Each model's
cost is the `memory_mb` its manifest declares, else an estimate from its files (catalog.py); the
resident memory Triton's stub actually uses is measured and reported beside it, never budgeted, so
the same models make the same decisions on every run.

Everything runs on the proxy's event loop: one asyncio.Condition guards the state, loads and unloads
run outside it (Triton's repository API takes seconds), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ..contract.models import ENGINE_MODEL, check_model_id, engine_model_name, model_not_found
from ..errors import OverloadedError, WhisperTritonError, invalid_parameter
from .catalog import (ModelRecord, describe_dir, estimate_memory_mb, fetch_s3_model, manifest_records,
                      model_id_from_dir, stub_rss_mb, under_roots)

logger = logging.getLogger(__name__)

UNLOADED, LOADING, LOADED, UNLOADING = "unloaded", "loading", "loaded", "unloading"


@dataclass
class RegistryConfig:
    """What `serve` decided for the registry (settings resolved, repository rendered)."""

    repository: Path | None = None  # the rendered repository Triton runs from (None: no load / unload)
    triton_url: str = ""  # Triton's gRPC address on loopback (empty: no load / unload)
    # gRPC metadata that opens Triton's repository API (serve restricts it to a per-start secret)
    triton_headers: dict[str, str] = field(default_factory=dict)
    default_id: str = ""  # empty: from the default's model_dir, asked of Triton
    default_model_dir: str = ""
    default_engine: str = "ctranslate2"
    default_aliases: tuple[str, ...] = ("whisper-1",)
    manifest: Path | None = None
    memory_budget_mb: float = 0.0  # 0: no budget
    load_wait_s: float = 60.0  # a request waits this long for its model, then 503 + Retry-After
    load_timeout_s: float = 600.0  # one load (and its wait for room) at most
    load_roots: tuple[Path, ...] = (Path("/opt/ml/models"),)
    cache_dir: Path | None = None  # where S3 models are fetched to
    retry_after_s: int = 2


@dataclass
class _Entry:
    record: ModelRecord
    memory_mb: float = 0.0
    state: str = UNLOADED
    reserved: bool = False  # a load that has made room for itself (counted against the budget)
    in_use: int = 0
    last_used: float = 0.0
    loads: int = 0
    unloads: int = 0
    task: asyncio.Task | None = None
    error: WhisperTritonError | None = None
    capabilities: dict | None = None
    load_seconds: float | None = None

    @property
    def triton_name(self) -> str:
        return ENGINE_MODEL if self.record.pinned else engine_model_name(self.record.id)


@dataclass
class ModelLease:
    """A model held for one request: `option` is what the `model` option of `transcribe` carries
    (None for the default, which `transcribe` runs on whisper_window)."""

    model_id: str
    triton_name: str
    option: str | None
    model_dir: Path | None = None  # its files (the tokenizer), for callers that decode windows themselves


@dataclass
class ModelView:
    """One model as the listings show it."""

    id: str
    aliases: tuple[str, ...]
    source: str
    state: str
    default: bool
    memory_mb: float
    rss_mb: float | None
    in_use: int
    loads: int
    unloads: int
    load_seconds: float | None
    capabilities: dict | None
    url: str = ""
    description: str = ""
    card: dict = field(default_factory=dict)


class ModelRegistry:
    def __init__(self, config: RegistryConfig, control=None):
        self.config = config
        self.control = control  # TritonControl, or None: the default only, nothing loads
        self._entries: dict[str, _Entry] = {}
        self._aliases: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self.default_id = config.default_id
        self._started = False
        self._background: set[asyncio.Task] = set()

    # ---- set-up ---------------------------------------------------------------------------------
    async def start(self, triton_model_dir: str | None = None) -> None:
        """Register the default (loaded with Triton) and the manifest's models (loaded on first use).
        `triton_model_dir`: the default's model_dir as Triton has it, when serve did not say."""
        if self._started:
            return
        self._started = True
        if self.control is None and self.config.triton_url and self.config.repository is not None:
            from .triton_control import TritonControl

            self.control = TritonControl(self.config.triton_url, self.config.load_timeout_s,
                                         self.config.triton_headers)
        model_dir = self.config.default_model_dir or (triton_model_dir or "")
        manifest_records_, manifest_default = ([], "")
        if self.config.manifest is not None:
            manifest_records_, manifest_default = manifest_records(self.config.manifest)
        self.default_id = self.default_id or model_id_from_dir(model_dir)
        default = ModelRecord(id=self.default_id, source="default", engine=self.config.default_engine,
                              aliases=self.config.default_aliases)
        if model_dir:
            with contextlib.suppress(WhisperTritonError, OSError):
                describe_dir(default, Path(model_dir))
        entry = _Entry(default, memory_mb=self._cost(default), state=LOADED, reserved=True, loads=1,
                       last_used=time.monotonic())
        self._add(entry)
        for record in manifest_records_:
            if record.id == self.default_id:
                continue  # the manifest names the default too: it is served as the default
            self._add(_Entry(record, memory_mb=self._cost(record)))
        if manifest_default and manifest_default != self.default_id:
            logger.warning("the manifest's default %s is not serve's default %s: serve's default answers requests "
                           "that name no model", manifest_default, self.default_id)
        logger.info("model registry: default %s; %d more model(s) (%s); budget %s", self.default_id,
                    len(self._entries) - 1, ", ".join(e for e in self._entries if e != self.default_id) or "none",
                    f"{self.config.memory_budget_mb:.0f} MB" if self.config.memory_budget_mb else "none")
        if self.control is not None:
            with contextlib.suppress(Exception):
                entry.capabilities = await self.control.capabilities(ENGINE_MODEL)

    def _add(self, entry: _Entry) -> None:
        record = entry.record
        for name in (record.id, *record.aliases):
            owner = self._aliases.get(name)
            if owner is not None and owner != record.id:
                logger.warning("%s already names model %s; not an alias of %s", name, owner, record.id)
                continue
            self._aliases[name] = record.id
        self._entries[record.id] = entry

    def _cost(self, record: ModelRecord) -> float:
        if record.declared_memory_mb:
            return float(record.declared_memory_mb)
        if record.model_dir is not None and record.engine:
            return estimate_memory_mb(record.model_dir, record.engine)
        return 0.0  # an S3 model not fetched yet: estimated once its files are here

    # ---- names ----------------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str | None) -> str:
        """The model id `name` stands for (an id or an alias; None or empty: the default); 404 naming `model`."""
        if name is None or not str(name).strip():
            return self.default_id
        name = str(name).strip()
        model_id = self._aliases.get(name)
        if model_id is None:
            raise model_not_found(name, self.ids)
        return model_id

    def is_default(self, model_id: str) -> bool:
        return model_id == self.default_id

    # ---- leases ---------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, name: str | None, wait_s: float | None = None) -> AsyncIterator[ModelLease]:
        """Hold model `name` (loaded first if need be) for the block; never unloaded meanwhile."""
        model_id = self.resolve(name)
        entry = await self._acquire(model_id, self.config.load_wait_s if wait_s is None else wait_s)
        try:
            yield ModelLease(model_id, entry.triton_name, None if entry.record.pinned else model_id,
                             entry.record.model_dir)
        finally:
            # no await before the release: a cancelled request (its client left) still gives the model back
            entry.in_use -= 1
            entry.last_used = time.monotonic()
            self._notify_soon()

    def _notify_soon(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _acquire(self, model_id: str, wait_s: float) -> _Entry:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        async with self._changed:
            while True:
                entry = self._entries.get(model_id)
                if entry is None:  # unregistered while waiting
                    raise model_not_found(model_id, self.ids)
                if entry.state == LOADED:
                    entry.in_use += 1
                    entry.last_used = time.monotonic()
                    return entry
                if entry.state == UNLOADED:
                    if entry.error is not None and entry.error.status not in (503,):
                        error, entry.error = entry.error, None  # this request sees it; the next one tries again
                        raise error
                    self._start_load(entry)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._not_ready(entry)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def _not_ready(self, entry: _Entry) -> OverloadedError:
        error = OverloadedError(f"The model {entry.record.id!r} is loading (or waiting for memory that models in "
                                "use hold); retry shortly.", 503, self.config.retry_after_s)
        error.param, error.type = "model", "model_not_ready"
        return error

    # ---- loading --------------------------------------------------------------------------------
    def _start_load(self, entry: _Entry) -> None:
        if self.control is None or self.config.repository is None:
            entry.error = WhisperTritonError("This server runs without a model registry (serve starts one); only "
                                             f"the default model {self.default_id!r} is served.", "model", 404,
                                             "model_not_found")
            return
        entry.state, entry.error, entry.reserved = LOADING, None, False
        task = asyncio.get_running_loop().create_task(self._load(entry))
        entry.task = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _load(self, entry: _Entry) -> None:
        started = time.monotonic()
        record = entry.record
        try:
            if record.model_dir is None and record.s3_uri:
                cache = self.config.cache_dir or Path("/tmp/whisper-triton-models")
                await asyncio.to_thread(fetch_s3_model, record, cache)
                entry.memory_mb = self._cost(record)
            await self._make_room(entry)
            assert record.model_dir is not None and self.config.repository is not None
            name = await asyncio.to_thread(render_engine, self.config.repository, record)
            await self.control.load(name)
            capabilities = None
            with contextlib.suppress(Exception):
                capabilities = await self.control.capabilities(name)
            async with self._changed:
                entry.state, entry.capabilities = LOADED, capabilities or entry.capabilities
                entry.loads += 1
                entry.load_seconds = round(time.monotonic() - started, 2)
                entry.last_used = time.monotonic()
                self._changed.notify_all()
            logger.info("model %s loaded as %s in %.1f s (%.0f MB budgeted)", record.id, name,
                        entry.load_seconds, entry.memory_mb)
        except Exception as exc:  # every waiting request learns why; the next request tries again
            error = exc if isinstance(exc, WhisperTritonError) else WhisperTritonError(
                "The model failed to load; the server log has the cause.", "model", 500, "model_load_failed")
            if not isinstance(exc, WhisperTritonError):
                logger.exception("loading model %s failed", record.id)
            async with self._changed:
                entry.state, entry.reserved, entry.error = UNLOADED, False, error
                self._changed.notify_all()

    def _used_mb(self, entry: _Entry) -> float:
        return sum(other.memory_mb for other in self._entries.values() if other is not entry and (
            other.state in (LOADED, UNLOADING) or (other.state == LOADING and other.reserved)))

    async def _make_room(self, entry: _Entry) -> None:
        """Unload idle models, least recently used first, until `entry` fits the budget; wait (bounded)
        while the models that would have to go are in use; 507 when it can never fit."""
        budget = self.config.memory_budget_mb
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.load_timeout_s
        async with self._changed:
            while budget and self._used_mb(entry) + entry.memory_mb > budget:
                pinned = sum(e.memory_mb for e in self._entries.values() if e.record.pinned and e is not entry)
                if pinned + entry.memory_mb > budget:
                    raise WhisperTritonError(
                        f"The model {entry.record.id!r} needs {entry.memory_mb:.0f} MB; the memory budget is "
                        f"{budget:.0f} MB, {pinned:.0f} MB of it held by the default model. Raise "
                        "WHISPER_TRITON_MODEL_MEMORY_BUDGET_MB or use a larger instance.", "model", 507,
                        "insufficient_storage")
                idle = [e for e in self._entries.values()
                        if e.state == LOADED and e.in_use == 0 and not e.record.pinned and e is not entry]
                if idle:
                    victim = min(idle, key=lambda e: e.last_used)
                    victim.state = UNLOADING
                    self._changed.release()
                    try:
                        await self._unload(victim, "to make room for " + entry.record.id)
                    finally:
                        await self._changed.acquire()
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WhisperTritonError(
                        f"The model {entry.record.id!r} does not fit beside the models in use (budget "
                        f"{budget:.0f} MB); retry when they are idle.", "model", 507, "insufficient_storage")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            entry.reserved = True

    async def _unload(self, entry: _Entry, why: str) -> None:
        """Unload `entry` (already marked UNLOADING by the caller, under the lock)."""
        name = entry.triton_name
        logger.info("unloading model %s (%s): %s", entry.record.id, name, why)
        try:
            await self.control.unload(name)
        except Exception:  # noqa: BLE001 - Triton keeps it: count it as loaded again
            logger.exception("unloading %s failed", name)
            async with self._changed:
                entry.state = LOADED
                self._changed.notify_all()
            return
        async with self._changed:
            entry.state, entry.reserved = UNLOADED, False
            entry.unloads += 1
            self._changed.notify_all()

    # ---- explicit load / unload (SageMaker's multi-model contract) -----------------------------------
    async def load(self, model_id: str, wait_s: float | None = None) -> None:
        """Load `model_id` now and wait for it (bounded by the load timeout); its error if it fails."""
        async with self.lease(model_id, self.config.load_timeout_s if wait_s is None else wait_s):
            pass

    async def register_sagemaker(self, model_name: str, url: str, target_model: str = "") -> None:
        """POST /models: track `model_name` for the directory `url` and load it (409 if known)."""
        check_model_id(model_name, "model_name")
        if not self.config.load_roots:
            raise invalid_parameter("url", "Loading models by url is off (WHISPER_TRITON_MODEL_LOAD_ROOTS is empty).")
        directory = await asyncio.to_thread(under_roots, url, list(self.config.load_roots))
        record = ModelRecord(id=model_name, source="sagemaker", url=url, target_model=target_model)
        await asyncio.to_thread(describe_dir, record, directory)
        async with self._changed:
            if model_name in self._aliases:
                raise WhisperTritonError(f"The model {model_name!r} is already loaded.", "model_name", 409, "conflict")
            entry = _Entry(record, memory_mb=self._cost(record))
            self._add(entry)
        try:
            await self.load(model_name)
        except WhisperTritonError as exc:
            if exc.status not in (503,):  # a failed load is not tracked: SageMaker may load it again
                await self._forget(model_name)
            raise

    async def unregister(self, model_id: str) -> None:
        """DELETE /models/{name}: wait for its requests (bounded), unload it, forget it. 404 if unknown."""
        entry = self._entries.get(model_id)
        if entry is None or entry.record.source != "sagemaker":
            raise model_not_found(model_id, [e.record.id for e in self._entries.values()
                                             if e.record.source == "sagemaker"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.load_timeout_s
        async with self._changed:
            while entry.in_use or entry.state in (LOADING, UNLOADING):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._not_ready(entry)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            loaded = entry.state == LOADED
            if loaded:
                entry.state = UNLOADING
        if loaded:
            await self._unload(entry, "DELETE /models")
        await self._forget(model_id)

    async def _forget(self, model_id: str) -> None:
        async with self._changed:
            entry = self._entries.pop(model_id, None)
            if entry is not None:
                for name in (entry.record.id, *entry.record.aliases):
                    if self._aliases.get(name) == model_id:
                        del self._aliases[name]
            self._changed.notify_all()

    # ---- listings ---------------------------------------------------------------------------------
    def view(self, model_id: str) -> ModelView:
        entry = self._entries[model_id]
        record = entry.record
        rss = None
        if entry.state == LOADED and self.config.repository is not None:
            rss = stub_rss_mb(self.config.repository, entry.triton_name)
        return ModelView(id=record.id, aliases=record.aliases, source=record.source, state=entry.state,
                         default=record.pinned, memory_mb=entry.memory_mb, rss_mb=rss, in_use=entry.in_use,
                         loads=entry.loads, unloads=entry.unloads, load_seconds=entry.load_seconds,
                         capabilities=entry.capabilities, url=record.url, description=record.description,
                         card=record.card)

    def views(self) -> list[ModelView]:
        return [self.view(model_id) for model_id in list(self._entries)]

    def sagemaker_models(self) -> list[ModelRecord]:
        return [e.record for e in self._entries.values() if e.record.source == "sagemaker"]

    def sagemaker_model(self, model_name: str) -> ModelRecord:
        entry = self._entries.get(model_name)
        if entry is None or entry.record.source != "sagemaker":
            raise model_not_found(model_name)
        return entry.record

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self.control is not None:
            await self.control.close()


def render_engine(repository: Path, record: ModelRecord) -> str:
    from .triton_control import render_engine_model

    assert record.model_dir is not None
    return render_engine_model(repository, record.id, record.model_dir, record.engine)
