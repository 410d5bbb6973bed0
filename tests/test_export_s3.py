"""S3 upload/download against a real S3 API (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import os

import boto3
import pytest

from conftest import reset_moto
from whisper_triton.export.common import ExportError
from whisper_triton.export.s3 import MANIFEST_KEY, TransferSettings, download_directory, parse_s3_uri, upload_directory

BUCKET = "models"
SMALL_PARTS = TransferSettings(workers=4, multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)


@pytest.fixture(scope="module")
def s3_endpoint(moto_url):
    reset_moto(moto_url)
    env = {"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env["AWS_ENDPOINT_URL"]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    (root / "whisper" / "1").mkdir(parents=True)
    (root / "whisper" / "config.pbtxt").write_text('name: "whisper"\nmax_batch_size: 8\n')
    (root / "whisper" / "1" / "model.bin").write_bytes(os.urandom(6 * 1024 * 1024 + 123))  # multipart
    (root / "whisper" / "1" / "tokenizer.json").write_text('{"model": {}}')
    return root


def test_uri_parsing():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("s3:///prefix", "s3://", "bucket/prefix", ""):
        with pytest.raises(ExportError, match="no bucket|not an S3 URI"):
            parse_s3_uri(bad)


def test_upload_reupload_and_verified_download(s3_endpoint, tree, tmp_path):
    uri = f"s3://{BUCKET}/exports/run1"
    first = upload_directory(tree, uri, SMALL_PARTS)
    assert first.transferred == ["whisper/1/model.bin", "whisper/1/tokenizer.json", "whisper/config.pbtxt"]
    client = boto3.client("s3")
    head = client.head_object(Bucket=BUCKET, Key="exports/run1/whisper/1/model.bin")
    assert head["ETag"].strip('"').endswith("-2")  # two parts: a real multipart upload
    assert len(head["Metadata"]["sha256"]) == 64

    again = upload_directory(tree, uri, SMALL_PARTS)  # unchanged: nothing moves
    assert again.transferred == [] and again.bytes_transferred == 0 and len(again.skipped) == 3
    assert client.head_object(Bucket=BUCKET, Key="exports/run1/whisper/1/model.bin")["LastModified"] == head["LastModified"]

    (tree / "whisper" / "config.pbtxt").write_text('name: "whisper"\nmax_batch_size: 4\n')
    changed = upload_directory(tree, uri, SMALL_PARTS)
    assert changed.transferred == ["whisper/config.pbtxt"]

    out = tmp_path / "fetched"
    got = download_directory(uri, out, SMALL_PARTS)
    assert sorted(got.transferred) == first.transferred
    for rel in first.transferred:
        assert (out / rel).read_bytes() == (tree / rel).read_bytes()


def test_corrupted_object_is_refused(s3_endpoint, tree, tmp_path):
    uri = f"s3://{BUCKET}/exports/run2"
    upload_directory(tree, uri, SMALL_PARTS)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="exports/run2/whisper/1/tokenizer.json", Body=b'{"model": {"x": 1}}')
    with pytest.raises(ExportError, match="tokenizer.json is corrupted: its sha256 is"):
        download_directory(uri, tmp_path / "fetched", SMALL_PARTS)
    assert not (tmp_path / "fetched").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no partial download left behind


def test_missing_manifest_bucket_and_upload_failures_are_loud(s3_endpoint, tree, tmp_path):
    with pytest.raises(ExportError, match=f"No {MANIFEST_KEY}"):
        download_directory(f"s3://{BUCKET}/nothing-here", tmp_path / "x")
    with pytest.raises(ExportError, match="bucket no-such-bucket does not exist"):
        upload_directory(tree, "s3://no-such-bucket/p", SMALL_PARTS)
    with pytest.raises(ExportError, match="no bucket"):
        upload_directory(tree, "s3:///p", SMALL_PARTS)
