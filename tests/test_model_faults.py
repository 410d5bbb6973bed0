"""Model download faults, against a real moto S3 on 127.0.0.1: a connection cut mid-object (a real
TCP proxy that closes after a few kilobytes) and a disk that fills up mid-file (s3transfer's file
writes patched to fail with ENOSPC, as a full disk makes them: no small filesystem can be mounted
here). Either way the download is refused with its cause, nothing half-written is kept or used,
and an earlier good copy stays in place."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest

from test_export_s3 import BUCKET, s3_endpoint  # noqa: F401  (module-scoped moto server fixture)
from whisper_triton.export.s3 import upload_directory
from whisper_triton.supervisor.model_source import ModelSourceError, download_target, fetch_from_s3
from whisper_triton.settings import load_settings

PAYLOAD = os.urandom(3 * 1024 * 1024)


def small_repository(root: Path) -> Path:
    """Enough of a repository for the source checks (whisper/config.pbtxt) plus one large file."""
    (root / "whisper" / "1").mkdir(parents=True)
    (root / "whisper" / "config.pbtxt").write_text('name: "whisper"\nbackend: "python"\n')
    (root / "whisper" / "1" / "payload.bin").write_bytes(PAYLOAD)
    return root


class CuttingProxy:
    """Forwards TCP to moto; a connection that asks for `payload.bin` is closed after `cut_after` bytes back."""

    def __init__(self, upstream: tuple[str, int], cut_after: int = 64 * 1024):
        self.upstream, self.cut_after = upstream, cut_after
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        state = {"wanted": False}

        def forward_requests() -> None:
            try:
                while data := client.recv(65536):
                    state["wanted"] = state["wanted"] or b"payload.bin" in data
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if state["wanted"] and sent + len(data) > self.cut_after:
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    self.cuts += 1
                    break
                client.sendall(data)
                sent += len(data) if state["wanted"] else 0
        except OSError:
            pass
        finally:
            for sock in (client, upstream):  # shutdown first: a thread blocked in recv would delay the FIN
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def uploaded(s3_endpoint, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/faults/{tmp_path.name}"
    upload_directory(small_repository(tmp_path / "repo"), uri)
    return uri


def nothing_half_written(cache: Path) -> None:
    leftovers = [p for p in cache.rglob("*") if ".partial-" in p.name or p.name == "payload.bin"] if cache.exists() else []
    assert not leftovers, leftovers


def test_a_download_cut_mid_object_is_refused_and_nothing_is_kept(s3_endpoint, uploaded, tmp_path, monkeypatch):  # noqa: F811
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    settings = load_settings(model_s3_uri=uploaded, model_cache_dir=str(tmp_path / "cache"))
    try:
        with pytest.raises(ModelSourceError) as info:
            fetch_from_s3(settings, uploaded)
    finally:
        proxy.close()
    assert proxy.cuts >= 1
    assert uploaded in str(info.value) and "nothing was kept" in str(info.value)
    assert not download_target(settings, uploaded).exists()
    nothing_half_written(tmp_path / "cache")


def test_a_full_disk_is_a_clear_error_and_the_good_copy_stays(s3_endpoint, uploaded, tmp_path, monkeypatch):  # noqa: F811
    settings = load_settings(model_s3_uri=uploaded, model_cache_dir=str(tmp_path / "cache"))
    good = fetch_from_s3(settings, uploaded)  # a first, complete download
    assert (good / "whisper" / "1" / "payload.bin").read_bytes() == PAYLOAD

    from s3transfer.utils import OSUtils

    real_open = OSUtils.open

    class FillingFile:
        def __init__(self, handle, room: int):
            self.handle, self.room = handle, room

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def open_on_a_full_disk(self, filename, mode):
        return FillingFile(real_open(self, filename, mode), room=256 * 1024)

    monkeypatch.setattr(OSUtils, "open", open_on_a_full_disk)
    with pytest.raises(ModelSourceError) as info:
        fetch_from_s3(settings, uploaded)
    message = str(info.value)
    assert "no space left" in message.lower() and "WHISPER_TRITON_MODEL_CACHE_DIR" in message
    assert str(tmp_path / "cache") in message
    assert (good / "whisper" / "1" / "payload.bin").read_bytes() == PAYLOAD  # the earlier copy is untouched
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".partial-" in p.name]
