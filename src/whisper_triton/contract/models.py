"""Several models on one endpoint: what a model id is, the Triton model that runs each model's
engine, and the registry manifest (`models.json`) that `whisper-export` writes and `serve` reads.

A model id is chosen by callers (OpenAI's `model`, SageMaker's `model_name`, a `model` option) and
ends up in a Triton model name and a directory name of the rendered repository, so it is checked
here, once, before it goes anywhere: 1-64 letters, digits, `.`, `_`, `-`, starting with a letter or
digit, no `..`. Nothing else (no `/`, no spaces) can reach a path.

Import-light: pydantic and the standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import WhisperTritonError, invalid_parameter

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENGINE_MODEL = "whisper_window"  # the engine model of the default model (contract.tensors.WHISPER_WINDOW)
ENGINE_MODEL_PREFIX = ENGINE_MODEL + "-"  # the engine model of every other model: whisper_window-<id>
MANIFEST_NAME = "models.json"
MANIFEST_FORMAT = 1


def is_model_id(value: object) -> bool:
    return isinstance(value, str) and bool(MODEL_ID_RE.match(value)) and ".." not in value


def check_model_id(value: object, param: str = "model") -> str:
    """`value` as a model id, or a 400 naming `param` (the value is never echoed at length)."""
    if not is_model_id(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 64 else "the value given"
        raise invalid_parameter(param, f"{shown} is not a model id: use 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit (GET /v1/models lists the models).")
    return value  # type: ignore[return-value]


def engine_model_name(model_id: str) -> str:
    """The Triton model that runs a non-default model's engine (rendered from whisper_window's template)."""
    return ENGINE_MODEL_PREFIX + check_model_id(model_id)


def model_id_of_engine(triton_model: str) -> str | None:
    """The model id an engine model serves (None for names that are not whisper_window-<id>)."""
    if triton_model.startswith(ENGINE_MODEL_PREFIX) and is_model_id(triton_model[len(ENGINE_MODEL_PREFIX):]):
        return triton_model[len(ENGINE_MODEL_PREFIX):]
    return None


def model_not_found(model: str, known: list[str] | tuple[str, ...] = ()) -> WhisperTritonError:
    listed = f" Served here: {', '.join(known)}." if known else ""
    shown = repr(model) if len(model) <= 64 else "The model given"
    return WhisperTritonError(f"The model {shown} is not served here.{listed} GET /v1/models lists them.",
                              "model", 404, "model_not_found")


class ManifestModel(BaseModel):
    """One model of the manifest: where it is (a directory relative to the manifest, or an S3 prefix
    that `whisper-export upload` wrote), and what it costs in memory when that is known."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    path: str = ""  # relative to the manifest's folder (or absolute); a CTranslate2 or engine directory
    s3_uri: str = ""  # s3://bucket/prefix with the checksummed layout of `whisper-export upload`
    memory_mb: float | None = Field(default=None, gt=0)  # declared cost against the budget (else estimated)
    aliases: tuple[str, ...] = ()
    description: str = ""
    adapter: str = ""  # the LoRA adapter merged into it (export's record)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not is_model_id(value):
            raise ValueError(f"{value!r} is not a model id (1-64 letters, digits, '.', '_', '-')")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [alias for alias in value if not is_model_id(alias)]
        if bad:
            raise ValueError(f"aliases {bad!r} are not model ids")
        return value

    def located(self) -> bool:
        return bool(self.path) != bool(self.s3_uri)


class RegistryManifest(BaseModel):
    """`models.json`: the models one endpoint serves, one of them the default."""

    model_config = ConfigDict(extra="forbid")

    format: int = MANIFEST_FORMAT
    default: str = ""  # the id answered when a request names no model (empty: the first)
    models: list[ManifestModel]

    def check(self, source: str = MANIFEST_NAME) -> "RegistryManifest":
        """Refuse what `serve` could not serve: no models, a model with neither or both places,
        duplicate ids or aliases, a default that is not one of the ids."""
        if not self.models:
            raise ValueError(f"{source} lists no models")
        names: list[str] = []
        for model in self.models:
            if not model.located():
                raise ValueError(f"{source}: model {model.id!r} needs exactly one of path or s3_uri")
            names += [model.id, *model.aliases]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{source}: ids or aliases used twice: {', '.join(duplicates)}")
        if self.default and self.default not in {m.id for m in self.models}:
            raise ValueError(f"{source}: the default {self.default!r} is not one of its model ids")
        return self

    @property
    def default_id(self) -> str:
        return self.default or self.models[0].id

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.model_dump(exclude_defaults=False), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RegistryManifest":
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            return cls.model_validate_json(path.read_text()).check(str(path))
        except OSError as exc:
            raise ValueError(f"cannot read the registry manifest {path}: {exc}") from exc
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise ValueError(f"{path} is not a registry manifest: {'.'.join(map(str, first['loc']))}: "
                             f"{first['msg']}") from None
