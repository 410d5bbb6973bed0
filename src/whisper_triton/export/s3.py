"""Upload a directory to S3 and fetch it back verified.

- Parallel, multipart (boto3 TransferConfig) uploads; each object carries its sha256 in metadata,
  and `MANIFEST_KEY` under the prefix lists every file's size and sha256. It is written last, only
  when every upload succeeded, so a partial upload is never described as complete.
- Unchanged files (same sha256 in the manifest and an object of the same size present) are skipped:
  re-uploading an unchanged tree transfers nothing.
- Any failure raises `ExportError` naming every failed file.
- Download reads the manifest, fetches into a temporary directory, checks each file's sha256 and
  only then renames it into place; a corrupted object is refused with a clear error.
Endpoint and credentials come from the usual AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE, ...).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .common import ExportError, atomic_output_dir, file_table, sha256_file

logger = logging.getLogger(__name__)

MANIFEST_KEY = "whisper-export-manifest.json"
SHA_METADATA = "sha256"
MB = 1024 * 1024


@dataclass
class TransferSettings:
    workers: int = 8  # files in parallel
    multipart_threshold: int = 16 * MB
    multipart_chunksize: int = 16 * MB
    max_concurrency: int = 4  # parts in parallel within one file

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency, use_threads=True)


@dataclass
class TransferReport:
    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_transferred: int = 0


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/some/prefix" -> ("bucket", "some/prefix") (no trailing slash)."""
    parsed = urlparse(uri or "")
    if parsed.scheme != "s3":
        raise ExportError(f"{uri!r} is not an S3 URI: write it as s3://bucket/prefix.")
    if not parsed.netloc:
        raise ExportError(f"{uri!r} has no bucket: write it as s3://bucket/prefix.")
    return parsed.netloc, parsed.path.strip("/")


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def s3_client():
    import boto3

    return boto3.client("s3")


def _remote_manifest(client, bucket: str, prefix: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST_KEY))["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404"):
            return None
        if code == "NoSuchBucket":
            raise ExportError(f"The bucket {bucket} does not exist (for these credentials and endpoint): create it or fix the URI.") from exc
        raise ExportError(f"Cannot read s3://{bucket}/{_key(prefix, MANIFEST_KEY)}: {exc}") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ExportError(f"s3://{bucket}/{_key(prefix, MANIFEST_KEY)} is not valid JSON; upload again.") from exc


def _remote_sizes(client, bucket: str, prefix: str) -> dict[str, int]:
    sizes = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for item in page.get("Contents", []):
            sizes[item["Key"]] = item["Size"]
    return sizes


def upload_directory(local_dir: str | Path, uri: str, settings: TransferSettings | None = None,
                     progress: Callable[[int], None] | None = None) -> TransferReport:
    """Upload every file under `local_dir` to `uri`; skip unchanged files; fail loudly."""
    from botocore.exceptions import BotoCoreError, ClientError

    settings = settings or TransferSettings()
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ExportError(f"{local_dir} is not a directory; nothing to upload.")
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    table = file_table(local_dir)
    try:
        remote = (_remote_manifest(client, bucket, prefix) or {}).get("files", {})
        sizes = _remote_sizes(client, bucket, prefix)
    except (BotoCoreError, ClientError) as exc:
        raise ExportError(f"Cannot list s3://{bucket}/{prefix}: {exc}. Check the bucket name, credentials and endpoint.") from exc
    report = TransferReport()
    pending = []
    for rel, info in table.items():
        same = remote.get(rel, {}).get("sha256") == info["sha256"] and sizes.get(_key(prefix, rel)) == info["size"]
        (report.skipped if same else pending).append(rel)
    config = settings.transfer_config()

    def put(rel: str) -> str:
        client.upload_file(str(local_dir / rel), bucket, _key(prefix, rel), Config=config,
                           ExtraArgs={"Metadata": {SHA_METADATA: table[rel]["sha256"]}}, Callback=progress)
        return rel

    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        futures = {pool.submit(put, rel): rel for rel in pending}
        for future in as_completed(futures):
            rel = futures[future]
            try:
                future.result()
                report.transferred.append(rel)
                report.bytes_transferred += table[rel]["size"]
            except Exception as exc:  # every failure is reported below, none is swallowed
                failures[rel] = f"{type(exc).__name__}: {exc}"
    if failures:
        listing = "\n".join(f"  {rel}: {why}" for rel, why in sorted(failures.items()))
        raise ExportError(f"{len(failures)} of {len(pending)} uploads to s3://{bucket}/{prefix} failed; the manifest was "
                          f"not updated, so run the upload again:\n{listing}")
    manifest = {"files": table}
    try:
        client.put_object(Bucket=bucket, Key=_key(prefix, MANIFEST_KEY), Body=json.dumps(manifest, indent=2, sort_keys=True).encode(),
                          ContentType="application/json")
    except (BotoCoreError, ClientError) as exc:
        raise ExportError(f"Uploading the manifest to s3://{bucket}/{prefix} failed: {exc}. Run the upload again.") from exc
    report.transferred.sort()
    logger.info("Uploaded %d files (%d bytes) to %s, %d unchanged", len(report.transferred), report.bytes_transferred, uri, len(report.skipped))
    return report


def download_directory(uri: str, local_dir: str | Path, settings: TransferSettings | None = None,
                       progress: Callable[[int], None] | None = None) -> TransferReport:
    """Fetch the tree the manifest at `uri` lists into `local_dir`, verifying every sha256."""
    from botocore.exceptions import BotoCoreError, ClientError

    settings = settings or TransferSettings()
    bucket, prefix = parse_s3_uri(uri)
    client = s3_client()
    try:
        manifest = _remote_manifest(client, bucket, prefix)
    except (BotoCoreError, ClientError) as exc:
        raise ExportError(f"Cannot read from s3://{bucket}/{prefix}: {exc}. Check the bucket, credentials and endpoint.") from exc
    if manifest is None:
        raise ExportError(f"No {MANIFEST_KEY} under {uri}: upload the directory with `whisper-export upload` first.")
    files: dict[str, dict] = manifest.get("files", {})
    config = settings.transfer_config()
    report = TransferReport()
    with atomic_output_dir(local_dir) as staging:

        def fetch(rel: str) -> str:
            target = staging / rel
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise ExportError(f"The manifest lists an unsafe path {rel!r}; refusing it.")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, _key(prefix, rel), str(target), Config=config, Callback=progress)
            digest = sha256_file(target)
            if digest != files[rel]["sha256"]:
                raise ExportError(
                    f"s3://{bucket}/{_key(prefix, rel)} is corrupted: its sha256 is {digest} but the manifest says "
                    f"{files[rel]['sha256']}. Refusing the download; upload the directory again."
                )
            return rel

        errors: list[Exception] = []
        with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
            futures = {pool.submit(fetch, rel): rel for rel in files}
            for future in as_completed(futures):
                try:
                    report.transferred.append(future.result())
                    report.bytes_transferred += files[futures[future]]["size"]
                except Exception as exc:
                    errors.append(exc)
        if errors:
            corrupted = [e for e in errors if isinstance(e, ExportError)]
            first = corrupted[0] if corrupted else errors[0]
            raise ExportError(f"{len(errors)} of {len(files)} downloads from {uri} failed; nothing was kept. First: {first}") from first
    report.transferred.sort()
    logger.info("Downloaded and verified %d files from %s", len(report.transferred), uri)
    return report
