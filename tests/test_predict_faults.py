"""`curate predict` on images that claim far more pixels than they hold (decompression bombs)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.errors import InputFormatError
from cellcurate.models import predict as predict_mod
from cellcurate.models.predict import DEFAULT_MAX_PIXELS, read_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path, side: int = 20_000) -> None:
    """A few hundred bytes of PNG whose header says side x side RGB (1.2 GB decoded at 20,000)."""
    rows = zlib.compressobj(9)
    body = rows.compress(b"\x00" + b"\x00" * 3 * side)  # the first row; the rest is never reached
    body += rows.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


def test_png_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    png_bomb(path)
    assert path.stat().st_size < 10_000
    with pytest.raises(InputFormatError, match=r"20,000 x 20,000 = 400,000,000 pixels, above the cap of "
                                               r"268,435,456; raise it with --max-pixels") as err:
        read_image(path)
    assert str(err.value).startswith(str(path))


def test_tiff_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    import tifffile

    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, shape=(20_000, 20_000, 3), dtype="uint8")  # sparse: nothing is decoded
    with pytest.raises(InputFormatError, match="400,000,000 pixels, above the cap"):
        read_image(path)


def test_the_cap_can_be_lowered_and_raised(tmp_path):
    from PIL import Image

    path = tmp_path / "small.png"
    Image.fromarray(np.full((40, 50, 3), 7, np.uint8)).save(path)
    with pytest.raises(InputFormatError, match=r"50 x 40 = 2,000 pixels, above the cap of 1,999"):
        read_image(path, max_pixels=1999)
    assert read_image(path, max_pixels=2000).shape == (40, 50, 3)
    assert read_image(path, max_pixels=None).shape == (40, 50, 3)
    assert DEFAULT_MAX_PIXELS >= 16_384**2


def test_cli_predict_on_a_bomb_gives_one_line(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    png_bomb(path)
    model = tmp_path / "model.pt"
    model.write_bytes(b"unused")
    monkeypatch.setattr(predict_mod, "load_for_inference", lambda *a, **k: object())  # no model needed to refuse
    r = CliRunner().invoke(cli, ["predict", str(model), str(path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 1, (r.output, r.exception)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {path}: ")
    assert "above the cap" in r.stderr and not (tmp_path / "out").exists()
    r = CliRunner().invoke(cli, ["predict", str(model), str(path), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--max-pixels", "0"])
    assert r.exit_code == 2  # usage error: the cap must be >= 1
