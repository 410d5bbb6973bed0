"""Several models on one endpoint: which models there are (ids, aliases, the `models.json` manifest,
SageMaker's multi-model loads), where each one's files are (validated paths, S3 prefixes fetched with
the checksummed download), and which are loaded in Triton: load and unload through Triton's
repository API on loopback, within a memory budget, least recently used first, never one in use.
May import `export/` (model detection, S3 download), `pipeline/`, `contract/`, `errors`, `settings`."""

from .catalog import ModelRecord, model_id_from_dir
from .registry import ModelLease, ModelRegistry, RegistryConfig

__all__ = ["ModelLease", "ModelRecord", "ModelRegistry", "RegistryConfig", "model_id_from_dir"]
