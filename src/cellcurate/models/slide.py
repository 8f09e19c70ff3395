"""Read whole-slide images lazily, region by region, at the pixel size a model expects.

Dimensions: W×H pixels of a slide's level 0 (full resolution), w×h pixels of a region read,
L pyramid levels.

Reader: ``tiffslide`` (pure Python over tifffile) for SVS, NDPI, SCN, OME-TIFF and generic tiled
or pyramidal TIFF. It was chosen over ``openslide-python`` + ``openslide-bin`` by measurement (512-px
regions from an 8k JPEG-tiled pyramid: tiffslide 95/s, OpenSlide 66/s on 2 cores; OpenSlide also
saw one level of a tifffile pyramid where tiffslide saw three). Formats tiffslide cannot read
(MIRAX ``.mrxs``, Hamamatsu ``.vms``/``.vmu``, Ventana ``.bif``) go to OpenSlide when it is
installed (``pip install openslide-python openslide-bin``).

Coordinates follow QuPath: x = column, y = row of level 0, pixel (r, c) covers [c, c+1) × [r, r+1).
A *model grid* is the slide resampled to the model's pixel size: model pixel (r, c) covers level-0
[c/s, (c+1)/s) × [r/s, (r+1)/s) with ``s = slide_mpp / model_mpp``. :meth:`Slide.read_model_region`
reads from the level whose pixel size is closest to, and not coarser than, the model's (within
2 %) and resamples the rest (bilinear, Gaussian pre-filter when shrinking), so reads of adjacent
regions agree pixel for pixel with a read of their union.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "s.tif")
>>> write_pyramid(path, np.full((600, 500, 3), 200, np.uint8), mpp=0.5, tile=256)
>>> s = open_slide(path); s.dimensions, s.mpp, len(s.level_dimensions)
((500, 600), 0.5, 3)
>>> s.read_model_region(0, 0, 64, 32, model_mpp=0.25).shape   # 2x upsampled
(32, 64, 3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputFormatError, InputNotFoundError

#: Suffixes the slide path reads (``.tif``/``.tiff`` too when tiled or pyramidal).
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".qptiff")
_OPENSLIDE_ONLY: tuple[str, ...] = (".mrxs", ".vms", ".vmu", ".bif")
#: Relative pixel-size difference under which no resampling happens.
MPP_TOLERANCE = 0.02


def is_slide(path: str | os.PathLike[str]) -> bool:
    """Whether ``curate predict`` should read ``path`` as a slide: a slide suffix, or a TIFF that
    is tiled or has more than one resolution level."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in (".tif", ".tiff") or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            return bool(tf.pages[0].is_tiled) or len(series.levels) > 1  # type: ignore[union-attr]
    except Exception:  # unreadable: let the image reader give its own error
        return False


class Slide:
    """A slide opened for lazy region reads (use as a context manager, or call :meth:`close`).

    Attributes
    ----------
    path
        The slide file.
    mpp
        Level-0 pixel size in µm/px (the ``mpp`` override, else the metadata's).
    dimensions
        (W, H) of level 0.
    level_dimensions, level_downsamples
        (W, H) and downsample factor of each level.
    """

    def __init__(self, path: str | os.PathLike[str], *, mpp: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputNotFoundError(self.path, "slide not found")
        suffix = self.path.suffix.lower()
        self._openslide = False
        try:
            if suffix in _OPENSLIDE_ONLY:
                self._handle = _open_openslide(self.path)
                self._openslide = True
            else:
                import tiffslide

                self._handle = tiffslide.TiffSlide(self.path)
        except (InputFormatError, ConfigError):
            raise
        except Exception as exc:  # tifffile/openslide raise many kinds for a bad file
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputFormatError(self.path, f"not a readable slide ({msg})") from None
        try:
            self.dimensions: tuple[int, int] = tuple(int(v) for v in self._handle.dimensions)  # type: ignore[assignment]
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._handle.level_dimensions]
            self.level_downsamples = [float(d) for d in self._handle.level_downsamples]
        except Exception as exc:
            self.close()
            raise InputFormatError(self.path, f"not a readable slide ({exc})") from None
        if self.dimensions[0] < 1 or self.dimensions[1] < 1:
            self.close()
            raise InputFormatError(self.path, f"slide has no pixels ({self.dimensions})")
        meta_mpp = self._metadata_mpp()
        if mpp is not None:
            if not mpp > 0:
                raise ConfigError(f"mpp must be > 0, got {mpp}")
            self.mpp = float(mpp)
        elif meta_mpp is not None:
            self.mpp = meta_mpp
        else:
            self.close()
            raise InputFormatError(self.path, "the slide's metadata has no pixel size; pass --mpp (µm/px of level 0)")

    # -- metadata -------------------------------------------------------------------------------
    def _metadata_mpp(self) -> float | None:
        props = dict(self._handle.properties)
        for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
            v = props.get(key)
            try:
                f = float(v) if v not in (None, "") else None
            except (TypeError, ValueError):
                f = None
            if f is not None and np.isfinite(f) and 0.01 < f < 100:
                return f
        return None

    @property
    def properties(self) -> dict[str, Any]:
        return dict(self._handle.properties)

    def close(self) -> None:
        h = getattr(self, "_handle", None)
        if h is not None:
            h.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------
    def read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of level ``level``; ``x, y`` in that level's pixels; outside the
        slide reads as white."""
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        d = self.level_downsamples[level]
        loc = (round(x0 * d), round(y0 * d))  # both readers take level-0 locations
        if self._openslide:
            rgba = np.asarray(self._handle.read_region(loc, level, (x1 - x0, y1 - y0)))
            arr = _flatten_rgba(rgba)
        else:
            arr = np.asarray(self._handle.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True))
            arr = _flatten_rgba(arr) if arr.shape[-1] == 4 else arr[..., :3]
        if arr.dtype != np.uint8:
            raise InputFormatError(self.path, f"expected 8-bit RGB pixels, got {arr.dtype}")
        out[y0 - y : y1 - y, x0 - x : x1 - x] = arr[: y1 - y0, : x1 - x0]
        return out

    def best_level(self, scale: float) -> int:
        """The level to read for a model grid of ``scale`` model px per level-0 px: the coarsest
        level whose pixels are still at least as fine as the model's (2 % tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d * scale <= 1.0 + MPP_TOLERANCE:
                best = i if d >= self.level_downsamples[best] else best
        return best

    def model_size(self, model_mpp: float) -> tuple[int, int]:
        """(W, H) of the whole slide on the model grid."""
        s = self.scale(model_mpp)
        return max(1, round(self.dimensions[0] * s)), max(1, round(self.dimensions[1] * s))

    def scale(self, model_mpp: float) -> float:
        """Model pixels per level-0 pixel (1.0 within the 2 % tolerance)."""
        s = self.mpp / float(model_mpp)
        return 1.0 if abs(s - 1.0) <= MPP_TOLERANCE else s

    def read_model_region(self, x: int, y: int, w: int, h: int, *, model_mpp: float) -> np.ndarray:
        """(h, w, 3) uint8 of the slide on the model grid, ``x, y`` in model pixels."""
        s = self.scale(model_mpp)
        level = self.best_level(s)
        d = self.level_downsamples[level]
        r = s * d  # model px per level px (<= 1 + tolerance)
        if abs(r - 1.0) <= 1e-9:
            return self.read_level(x, y, w, h, level)
        return self._resampled(x, y, w, h, level, r)

    def _resampled(self, x: int, y: int, w: int, h: int, level: int, r: float) -> np.ndarray:
        from scipy import ndimage as ndi

        # model pixel centre (c + 0.5) -> level coordinate (c + 0.5) / r - 0.5
        pad = int(np.ceil(3.0 / r)) + 2
        lx0 = int(np.floor((x + 0.5) / r - 0.5)) - pad
        ly0 = int(np.floor((y + 0.5) / r - 0.5)) - pad
        lx1 = int(np.ceil((x + w - 0.5) / r - 0.5)) + pad + 1
        ly1 = int(np.ceil((y + h - 0.5) / r - 0.5)) + pad + 1
        src = self.read_level(lx0, ly0, lx1 - lx0, ly1 - ly0, level).astype(np.float32)
        if r < 1.0:  # shrinking: anti-alias as skimage.transform.resize does
            sigma = max(0.0, (1.0 / r - 1.0) / 2.0)
            src = ndi.gaussian_filter(src, (sigma, sigma, 0), mode="nearest")
        cy = (np.arange(y, y + h) + 0.5) / r - 0.5 - ly0
        cx = (np.arange(x, x + w) + 0.5) / r - 0.5 - lx0
        out = np.empty((h, w, 3), np.uint8)
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        for c in range(3):
            out[..., c] = np.clip(ndi.map_coordinates(src[..., c], [yy, xx], order=1, mode="nearest") + 0.5, 0, 255)
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB view and its downsample from level 0 (≥ 1): the coarsest level
        whose longer side is at least ``max_side`` (or level 0), shrunk to ``max_side``."""
        from skimage.transform import resize

        level = 0
        for i, (lw, lh) in enumerate(self.level_dimensions):
            if max(lw, lh) >= max_side:
                level = i
        lw, lh = self.level_dimensions[level]
        if max(lw, lh) > 4 * max_side:  # no coarse level: block means over small reads, memory bounded
            f = -(-max(lw, lh) // max_side)
            img = self._block_mean(level, f)
            return img, float(self.dimensions[0] / img.shape[1])
        img = self.read_level(0, 0, lw, lh, level)
        factor = max(lw, lh) / max_side
        if factor > 1.0:
            size = (max(1, round(lh / factor)), max(1, round(lw / factor)))
            if lh % size[0] == 0 and lw % size[1] == 0 and lh // size[0] == lw // size[1]:
                f = lh // size[0]  # integer factor: block means (the area average), ~10x cheaper
                img = (img.reshape(size[0], f, size[1], f, 3).mean(axis=(1, 3), dtype=np.float32) + 0.5).astype(np.uint8)
            else:
                img = (resize(img, size + (3,), order=1, anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
        down = self.dimensions[0] / img.shape[1]
        return img, float(down)


    def _block_mean(self, level: int, f: int, *, block: int = 64) -> np.ndarray:
        lw, lh = self.level_dimensions[level]
        h, w = -(-lh // f), -(-lw // f)
        out = np.empty((h, w, 3), np.uint8)
        step = block * f
        for y in range(0, h * f, step):
            for x in range(0, w * f, step):
                a = self.read_level(x, y, step, step, level).astype(np.float32)
                m = a.reshape(block, f, block, f, 3).mean(axis=(1, 3))
                by, bx = y // f, x // f
                out[by : by + block, bx : bx + block] = (m[: h - by, : w - bx] + 0.5).astype(np.uint8)
        return out


def _flatten_rgba(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over white (transparent = outside the scanned area)."""
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def _open_openslide(path: Path) -> Any:
    try:
        import openslide
    except ImportError:
        raise InputFormatError(
            path, f"{path.suffix} slides need OpenSlide: pip install openslide-python openslide-bin"
        ) from None
    return openslide.OpenSlide(str(path))


def open_slide(path: str | os.PathLike[str], *, mpp: float | None = None) -> Slide:
    """Open a slide; ``mpp`` overrides the level-0 pixel size of the metadata."""
    return Slide(path, mpp=mpp)


def write_pyramid(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    mpp: float | None,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = "zlib",
) -> None:
    """Write ``image`` (H, W, 3) uint8 as a tiled pyramidal TIFF (levels halve until the longer
    side is under ``tile``; reduced levels are flagged ``subfiletype=1``), with the pixel size
    as TIFF resolution (none when ``mpp`` is None). For tests and conversions."""
    import tifffile

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if levels is None:
        levels, side = 1, max(image.shape[:2])
        while side > tile:
            side //= 2
            levels += 1
    opts: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb", "compression": compression, "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=image.size > 2**31) as tw:
        cur = image
        for k in range(levels):
            res: dict[str, Any] = {}
            if mpp is not None:
                res = {"resolution": (1e4 / (mpp * 2**k), 1e4 / (mpp * 2**k)), "resolutionunit": "CENTIMETER"}
            tw.write(cur, subfiletype=1 if k else 0, **res, **opts)
            h2, w2 = cur.shape[0] // 2, cur.shape[1] // 2
            if min(h2, w2) < 1:
                break
            cur = cur[: h2 * 2, : w2 * 2].reshape(h2, 2, w2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
