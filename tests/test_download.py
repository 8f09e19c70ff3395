"""`curate download`: resumable HTTP with Range, pinned SHA-256, atomic unpack into the reader's
layout; against a local http.server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from cellcurate.datasets.download import download
from cellcurate.datasets.sources import DownloadFile, get_source
from cellcurate.errors import ConfigError, InputFormatError, StateError


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    cut_after: dict[str, int] = {}  # path -> bytes sent before the connection is cut (once)
    log: list[tuple[str, str | None, int]] = []

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.cut_after.pop(self.path, None)
        self.log.append((self.path, rng, len(body) if cut is None else cut))
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # cut mid-file
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server():
    _Handler.files, _Handler.cut_after, _Handler.log = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def _fold_zip(tiny_sample, k: int) -> bytes:
    """A real-layout PanNuke fold zip (`Fold k/images/foldk/...`), as the release ships it."""
    import io

    buf = io.BytesIO()
    root = Path(tiny_sample.pannuke_root)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for p in sorted((root / f"Fold {k}").rglob("*")):
            zf.write(p, p.relative_to(root).as_posix())
    return buf.getvalue()


def _spec(base: str, blobs: dict[str, bytes], sha: dict[str, str | None] | None = None):
    files = tuple(DownloadFile(f"{base}/{name}", name, (sha or {}).get(name, hashlib.sha256(b).hexdigest()))
                  for name, b in blobs.items())
    return dataclasses.replace(get_source("pannuke"), downloads={"all": files})


@pytest.mark.slow
def test_download_resumes_after_a_cut_connection_and_unpacks_the_reader_layout(server, tiny_sample, tmp_path):
    base, handler = server
    blob = _fold_zip(tiny_sample, 1)
    handler.files["/fold_1.zip"] = blob
    handler.cut_after["/fold_1.zip"] = len(blob) // 3
    spec = _spec(base, {"fold_1.zip": blob})
    with pytest.raises(StateError, match="connection lost after .* run the command again to resume"):
        download(spec, tmp_path / "pn", progress=False)
    part = tmp_path / "pn" / ".downloads" / "fold_1.zip.part"
    assert part.stat().st_size == len(blob) // 3
    assert not (tmp_path / "pn" / "Fold 1").exists()  # nothing unpacked from a partial file
    result = download(spec, tmp_path / "pn", progress=False)
    assert result.files[0]["resumed_from"] == len(blob) // 3
    assert result.files[0]["bytes_fetched"] == len(blob) - len(blob) // 3
    assert handler.log[-1][1] == f"bytes={len(blob) // 3}-"
    assert result.unpacked == ["Fold 1"] and result.layout_ok
    # the unpacked release is what the PanNuke reader ingests
    from cellcurate.datasets.ingest import ingest_source
    from cellcurate.datasets.store import Store

    with Store.create(tmp_path / "store") as store:
        r = ingest_source(store, "pannuke", tmp_path / "pn", progress=False)
    import numpy as np

    n_tiles = np.load(tmp_path / "pn" / "Fold 1" / "images" / "fold1" / "images.npy", mmap_mode="r").shape[0]
    assert [(u.unit, u.n_images) for u in r.units] == [("pannuke-fold1", n_tiles)]
    # running again fetches nothing
    again = download(spec, tmp_path / "pn", progress=False)
    assert again.files[0]["bytes_fetched"] == 0 and again.unpacked == []


def test_checksum_mismatch_is_refused_with_nothing_unpacked(server, tiny_sample, tmp_path):
    base, handler = server
    blob = _fold_zip(tiny_sample, 2)
    handler.files["/fold_2.zip"] = blob
    spec = _spec(base, {"fold_2.zip": blob}, sha={"fold_2.zip": "0" * 64})
    with pytest.raises(InputFormatError) as err:
        download(spec, tmp_path / "pn", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "does not match the pinned 0000" in msg and "nothing was unpacked" in msg
    assert sorted(p.name for p in (tmp_path / "pn").iterdir()) == [".downloads"]
    assert list((tmp_path / "pn" / ".downloads").iterdir()) == []


def test_unpinned_checksum_needs_sha256_from_the_user(server, tmp_path):
    import io

    base, handler = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("CoNSeP/Train/Images/train_1.png", b"x")
    handler.files["/consep_dataset.zip"] = buf.getvalue()
    spec = dataclasses.replace(get_source("consep"), downloads={
        "all": (DownloadFile(f"{base}/consep_dataset.zip", "consep_dataset.zip", None),)})
    with pytest.raises(ConfigError, match="no published SHA-256 is pinned for consep_dataset.zip"):
        download(spec, tmp_path / "c", progress=False)
    assert handler.log == []  # refused before any request
    result = download(spec, tmp_path / "c", sha256=hashlib.sha256(buf.getvalue()).hexdigest(), progress=False)
    assert result.unpacked == ["CoNSeP"] and (tmp_path / "c" / "CoNSeP" / "Train" / "Images" / "train_1.png").is_file()


def test_unsafe_zip_members_are_refused(server, tmp_path):
    import io

    base, handler = server
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr("../escape.txt", b"bad")
    handler.files["/evil.zip"] = buf.getvalue()
    spec = _spec(base, {"evil.zip": buf.getvalue()})
    with pytest.raises(InputFormatError, match="unsafe member path '../escape.txt'"):
        download(spec, tmp_path / "e", progress=False)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "e" / "ok.txt").exists()
    assert not list((tmp_path / "e").glob(".tmp-unpack-*"))


def test_registry_pins_the_published_checksums():
    pn = get_source("pannuke").downloads
    assert sorted(pn) == ["fold1", "fold2", "fold3"] and all(len(f.sha256 or "") == 64 for p in pn.values() for f in p)
    mo = get_source("monusac").downloads
    assert sorted(mo) == ["test", "train"] and all(f.sha256 for p in mo.values() for f in p)
    assert get_source("consep").downloads["all"][0].sha256 is None  # unpublished: the user must give one
    assert len(get_source("lizard").downloads["all"]) == 3


def test_cli_download_reports_and_errors_in_one_line(server, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cellcurate.cli.main", "download", "consep", "--to", str(tmp_path / "x")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "pass --sha256 HEX" in r.stderr
