"""Run a model over whole images of any size and turn its outputs into nuclei.

Dimensions: H×W pixels of an image, T×T pixels of a tile (T a multiple of 32), B tiles in a
batch, K = 8 type channels (0 background + 7 classes), n nuclei.

Models follow the package contract: ``model(x)`` takes float32 (B, 3, T, T) RGB in [0, 1] and
returns ``{"np": (B, 2, T, T) logits, "hv": (B, 2, T, T), "tp": (B, K, T, T) logits}``, and
``model.meta`` holds at least ``mpp`` (µm/px the model expects) and, optionally, ``classes`` /
``colors``.

Tiling (:func:`infer_tiled`): overlapping T×T tiles with stride ``T - overlap``; the last tile of
a row or column is flush with the image edge, so an image at least T wide is never padded; a
smaller side is reflect-padded up to the next multiple of 32. Overlapping tiles are blended with a
weight that falls linearly over ``overlap / 2`` pixels from each tile edge (never to 0), after the
softmax of ``np`` and ``tp``.

Pixel size (:func:`predict_image`): when the image's ``mpp`` differs from the model's by more
than 2 %, the image is resampled to the model's pixel size, post-processed there, and the
instance map is resampled back (nearest neighbour); the nucleus table is measured on the
original grid.

>>> import torch
>>> class Blank(torch.nn.Module):
...     meta = {"mpp": 0.25}
...     def forward(self, x):
...         b, _, h, w = x.shape
...         return {"np": torch.zeros(b, 2, h, w), "hv": torch.zeros(b, 2, h, w), "tp": torch.zeros(b, 8, h, w)}
>>> out = infer_tiled(Blank(), np.zeros((300, 40, 3), np.uint8), tile=256)
>>> out["np"].shape, out["hv"].shape, out["tp"].shape
((300, 40), (2, 300, 40), (8, 300, 40))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.atomic import atomic_path
from ..errors import ConfigError, InputFormatError, InputNotFoundError, ModelError
from .postprocess import PostprocessConfig, instance_table, postprocess_outputs

#: Image suffixes :func:`read_image` accepts.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
#: The most pixels :func:`read_image` decodes unless told otherwise (16,384 x 16,384): a PNG of a few
#: kilobytes can claim 20,000 x 20,000 pixels (1.2 GB once decoded), a decompression bomb.
DEFAULT_MAX_PIXELS = 2**28


@dataclass
class Prediction:
    """Nuclei found in one image.

    Attributes
    ----------
    instances
        (H, W) int32 instance map, 0 = background, 1..n.
    nuclei
        One row per nucleus (see :func:`cellcurate.models.postprocess.instance_table`).
    class_names
        Names of classes 1..K-1.
    colors
        "#rrggbb" of classes 1..K-1.
    mpp
        Pixel size of ``instances`` (the image's).
    nucleus_prob
        (H, W) float32 nuclear probability at the image's pixels (the ``np`` map, resampled back
        like ``instances``); only with ``predict_image(..., with_prob=True)``.
    """

    instances: np.ndarray
    nuclei: pd.DataFrame
    class_names: list[str]
    colors: list[str]
    mpp: float | None = None
    nucleus_prob: np.ndarray | None = None

    def class_map(self) -> np.ndarray:
        """(H, W) uint8 pixel class map."""
        lut = np.zeros(len(self.nuclei) + 1, np.uint8)
        lut[1:] = self.nuclei["class_id"].to_numpy()
        return lut[self.instances]


# -- model metadata --------------------------------------------------------------------------------


def model_meta(model: Any) -> dict[str, Any]:
    """``model.meta`` as a dict (empty when the model has none)."""
    meta = getattr(model, "meta", None)
    return dict(meta) if isinstance(meta, dict) else {}


def class_names_and_colors(meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Names and "#rrggbb" colours of classes 1..K-1 from model metadata.

    ``meta["classes"]`` / ``meta["colors"]`` may list the background first (as the package's
    models do) or not; without them, the default taxonomy's classes are used.
    """
    from ..datasets.taxonomy import Taxonomy

    tax = Taxonomy.default()
    names = [str(n) for n in meta.get("classes") or []] or list(tax.names)
    colors = [_hex(c) for c in meta.get("colors") or []]
    if names[0].lower() == "background":
        names = names[1:]
        colors = colors[1:] if len(colors) == len(names) + 1 else colors
    if len(colors) != len(names):
        colors = [tax.color(i) if i <= tax.n_classes else "#808080" for i in range(1, len(names) + 1)]
    return names, colors


def _hex(c: Any) -> str:
    if isinstance(c, str):
        return c
    r, g, b = (int(v) for v in c)
    return f"#{r:02x}{g:02x}{b:02x}"


# -- inference -----------------------------------------------------------------------------------


def _axis_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(n: int, overlap: int) -> np.ndarray:
    ramp = max(overlap // 2, 1)
    i = np.arange(n, dtype=np.float32)
    return np.clip(np.minimum(i + 0.5, n - i - 0.5) / ramp, 1.0 / ramp, 1.0)


def forward_tiles(model: Any, batch: np.ndarray, device: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run (B, h, w, 3) uint8 tiles through ``model`` (in the caller's inference mode).

    Returns the nuclear probability (B, h, w), the ``hv`` maps (B, 2, h, w) and the type
    probabilities (B, K, h, w), float32 numpy. Running out of memory is a one-line
    :class:`ModelError` with the size it needed (:func:`oom_error`).
    """
    import torch

    h, w = int(batch.shape[1]), int(batch.shape[2])
    try:
        x_t = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        out = model(x_t)
    except (MemoryError, RuntimeError) as exc:
        raise oom_error(exc, f"a batch of {len(batch)} tiles of {h}x{w} px") from None
    _check_outputs(out, x_t.shape)
    p_np = torch.softmax(out["np"].float(), dim=1)[:, 1].cpu().numpy()
    p_hv = out["hv"].float().cpu().numpy()
    p_tp = torch.softmax(out["tp"].float(), dim=1).cpu().numpy()
    return p_np, p_hv, p_tp


def infer_tiled(
    model: Any,
    image: np.ndarray,
    *,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """Dense model outputs for one image of any size.

    Parameters
    ----------
    model
        A model following the package contract (nn.Module or a callable with the same I/O).
    image
        (H, W, 3) uint8 RGB.
    tile
        Tile side T, a multiple of 32.
    overlap
        Pixels shared by neighbouring tiles, ``0 <= overlap < tile``.
    batch_size
        Tiles per forward pass.
    device
        Torch device for the tiles; default the device of the model's first parameter (CPU).

    Returns
    -------
    dict with ``np`` (H, W) float32 nucleus probability, ``hv`` (2, H, W) float32 and ``tp``
    (K, H, W) float32 type probabilities.
    """
    import torch

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ConfigError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if tile <= 0 or tile % 32:
        raise ConfigError(f"tile must be a positive multiple of 32, got {tile}")
    if not 0 <= overlap < tile:
        raise ConfigError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = str(params[0].device) if params else "cpu"

    mult = int(model_meta(model).get("input_multiple") or 32)  # 64 for MobileViT students
    if tile % mult:
        raise ConfigError(f"tile must be a multiple of {mult} for this model, got {tile}")
    h, w = image.shape[:2]
    th = tile if h >= tile else _ceil32(h, mult)
    tw = tile if w >= tile else _ceil32(w, mult)
    padded = np.pad(image, ((0, max(th - h, 0)), (0, max(tw - w, 0)), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
    ph, pw = padded.shape[:2]
    window = np.outer(_ramp(th, overlap), _ramp(tw, overlap))
    stride = tile - overlap
    boxes = [(y, x) for y in _axis_starts(ph, th, stride) for x in _axis_starts(pw, tw, stride)]

    try:
        acc_np = np.zeros((ph, pw), np.float32)
        acc_hv = np.zeros((2, ph, pw), np.float32)
        weight = np.zeros((ph, pw), np.float32)
    except MemoryError as exc:
        raise oom_error(exc, f"the output maps of a {pw}x{ph} px image") from None
    acc_tp: np.ndarray | None = None
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(boxes), batch_size):
                chunk = boxes[start : start + batch_size]
                batch = np.stack([padded[y : y + th, x : x + tw] for y, x in chunk])
                p_np, p_hv, p_tp = forward_tiles(model, batch, device)
                if acc_tp is None:
                    try:
                        acc_tp = np.zeros((p_tp.shape[1], ph, pw), np.float32)
                    except MemoryError as exc:
                        raise oom_error(exc, f"the type maps of a {pw}x{ph} px image") from None
                for i, (y, x) in enumerate(chunk):
                    sl = (slice(y, y + th), slice(x, x + tw))
                    acc_np[sl] += p_np[i] * window
                    acc_hv[(slice(None), *sl)] += p_hv[i] * window
                    acc_tp[(slice(None), *sl)] += p_tp[i] * window
                    weight[sl] += window
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    assert acc_tp is not None  # at least one tile always runs
    return {
        "np": (acc_np / weight)[:h, :w],
        "hv": (acc_hv / weight)[:, :h, :w],
        "tp": (acc_tp / weight)[:, :h, :w],
    }


def oom_error(exc: BaseException, what: str) -> BaseException:
    """A one-line :class:`ModelError` for running out of memory on ``what``, with the size the
    allocation needed (from torch's or numpy's message); ``exc`` itself when it is not an
    out-of-memory error."""
    import re

    text = str(exc)
    is_oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError"
    if not is_oom:
        return exc
    m = re.search(r"(?:[Tt]ried to allocate|[Uu]nable to allocate)\s+([\d.]+\s*[KMGT]i?B)", text)
    if m is None:
        m = re.search(r"allocate\s+(\d+)\s+bytes", text)
        need = f"{int(m.group(1)) / 2**30:.2f} GiB" if m else "an unknown amount"
    else:
        need = m.group(1)
    where = "GPU" if "cuda" in text.lower() or type(exc).__name__ == "OutOfMemoryError" else "host"
    return ModelError(
        f"out of {where} memory on {what} (an allocation of {need} failed); "
        "lower --batch-size or --tile, or read the image as a slide (a tiled TIFF)"
    )


def _ceil32(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _check_outputs(out: Any, shape: Any) -> None:
    if not isinstance(out, dict) or not {"np", "hv", "tp"} <= set(out):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise ModelError(f"model must return a dict with 'np', 'hv' and 'tp', got {got}")
    b, _, h, w = shape
    for key, channels in (("np", 2), ("hv", 2)):
        if tuple(out[key].shape) != (b, channels, h, w):
            raise ModelError(f"model output {key!r} must be {(b, channels, h, w)}, got {tuple(out[key].shape)}")
    if out["tp"].ndim != 4 or tuple(out["tp"].shape[2:]) != (h, w) or out["tp"].shape[0] != b:
        raise ModelError(f"model output 'tp' must be (B, K, {h}, {w}), got {tuple(out['tp'].shape)}")


def predict_image(
    model: Any,
    image: np.ndarray,
    *,
    mpp: float | None = None,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    device: str | None = None,
    config: PostprocessConfig | Any | None = None,
    with_polygons: bool = True,
    with_prob: bool = False,
) -> Prediction:
    """Nuclei of one image: tiled inference, post-processing, the nucleus table.

    Parameters
    ----------
    model
        A model following the package contract.
    image
        (H, W, 3) uint8 RGB.
    mpp
        The image's pixel size in µm/px; ``None`` means "the model's".
    with_polygons
        Add the ``polygon`` column to the table (skip it for metrics only).
    with_prob
        Keep the nuclear probability map (``Prediction.nucleus_prob``).
    """
    from skimage.transform import resize

    meta = model_meta(model)
    names, colors = class_names_and_colors(meta)
    model_mpp = meta.get("mpp")
    image = np.asarray(image)
    scale = 1.0
    if mpp is not None and model_mpp:
        if not mpp > 0:
            raise ConfigError(f"mpp must be > 0, got {mpp}")
        scale = float(mpp) / float(model_mpp)
    work = image
    if abs(scale - 1.0) > 0.02:
        size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        work = (resize(image, size + (3,), order=1, anti_aliasing=scale < 1, preserve_range=True) + 0.5).astype(np.uint8)
    maps = infer_tiled(model, work, tile=tile, overlap=overlap, batch_size=batch_size, device=device)
    if maps["tp"].shape[0] != len(names) + 1:
        raise ModelError(f"model has {maps['tp'].shape[0]} type channels but its metadata names {len(names)} classes")
    post = postprocess_outputs(maps["np"], maps["hv"], maps["tp"], head=str(meta.get("head", "hover")), config=config)
    instances, classes, probs = post.instances, post.classes, post.probs
    nucleus_prob = np.asarray(maps["np"], np.float32) if with_prob else None
    if work is not image:
        if nucleus_prob is not None:
            nucleus_prob = resize(nucleus_prob, image.shape[:2], order=1, anti_aliasing=False,
                                  preserve_range=True).astype(np.float32)
        back = resize(instances, image.shape[:2], order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
        present = np.unique(back[back > 0])
        lut = np.zeros(int(instances.max(initial=0)) + 1, np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        instances = lut[back]
        classes, probs = classes[present - 1], probs[present - 1]
    table = instance_table(instances, classes, probs, class_names=names, with_polygons=with_polygons)
    return Prediction(instances=instances, nuclei=table, class_names=names, colors=colors, mpp=mpp or model_mpp,
                      nucleus_prob=nucleus_prob)


# -- files ---------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG/TIF/JPG as (H, W, 3) uint8 RGB (an alpha channel is dropped).

    ``max_pixels`` caps H x W, checked from the file's header before anything is decoded
    (``None``: no cap; ``curate predict --max-pixels``).

    Raises ``InputNotFoundError`` for a missing file and ``InputFormatError`` for anything that
    is not an 8-bit RGB(A) image, or has more pixels than ``max_pixels``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(path, "image file not found")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputFormatError(path, f"unsupported image type {suffix!r}; expected one of {', '.join(IMAGE_SUFFIXES)}")

    def check_size(h: int, w: int) -> None:
        if max_pixels is not None and h * w > max_pixels:
            raise InputFormatError(path, f"image is {w:,} x {h:,} = {h * w:,} pixels, above the cap of "
                                         f"{max_pixels:,}; raise it with --max-pixels if the image is genuine")

    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                if not tf.series:
                    raise InputFormatError(path, "TIFF holds no image")
                shape = tuple(int(n) for n in tf.series[0].shape)
                if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
                    shape = shape[1:]  # planar RGB
                elif len(shape) >= 3 and shape[-1] in (3, 4):
                    shape = shape[:-1]
                if len(shape) >= 2:  # extra leading axes (pages, z) multiply the height
                    check_size(int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])
                arr = tf.series[0].asarray()
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
                arr = np.moveaxis(arr, 0, -1)
        else:
            from PIL import Image

            pil_cap, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our cap replaces PIL's
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
                    check_size(h, w)
                    arr = np.asarray(im.convert("RGBA") if im.mode in ("P", "LA") else im)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_cap
    except InputFormatError:
        raise
    except (OSError, ValueError, MemoryError) as exc:
        raise InputFormatError(path, f"cannot read image ({str(exc)[:200]})") from None
    except Exception as exc:  # PIL's DecompressionBombError and other decoder errors
        raise InputFormatError(path, f"cannot read image ({type(exc).__name__}: {str(exc)[:200]})") from None
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputFormatError(path, f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputFormatError(path, f"expected 8-bit RGB, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def save_prediction(prediction: Prediction, out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """Write ``<stem>_instances.tif`` (int32 instance map) and ``<stem>_nuclei.parquet`` (the
    table; polygons as JSON text ``[[x, y], ...]`` in column ``polygon``). Returns the paths."""
    import tifffile

    out_dir = Path(out_dir)
    paths = {"instances": out_dir / f"{stem}_instances.tif", "nuclei": out_dir / f"{stem}_nuclei.parquet"}
    # pixel size as TIFF resolution (pixels per centimetre), as QuPath and tifffile read it
    res: dict[str, Any] = ({"resolution": (1e4 / prediction.mpp, 1e4 / prediction.mpp),
                            "resolutionunit": "CENTIMETER"} if prediction.mpp else {})
    with atomic_path(paths["instances"]) as tmp:
        tifffile.imwrite(tmp, prediction.instances.astype(np.int32), compression="zlib", **res)
    table = prediction.nuclei.copy()
    if "polygon" in table:
        table["polygon"] = [json.dumps(np.round(np.asarray(p, float), 3).tolist()) for p in table["polygon"]]
    with atomic_path(paths["nuclei"]) as tmp:
        table.to_parquet(tmp, index=False)
    return paths


def load_for_inference(
    path: str | os.PathLike[str], *, device: str = "cpu", encoder_weights: str | os.PathLike[str] | None = None
) -> Any:
    """Load a model for :func:`predict_image`.

    ``path`` is a checkpoint folder (``model.pt`` + ``config.json``, or either file of it), an
    exported TorchScript file (any other file) or an ONNX file (``.onnx``, run on CPU by
    onnxruntime). ``encoder_weights`` overrides a teacher's recorded encoder weights path.
    """
    path = Path(path)
    if path.is_dir() or (path.name in ("model.pt", "config.json") and (path.parent / "config.json").is_file()):
        from .checkpoint import load_model

        return load_model(path, map_location=device, encoder_weights=encoder_weights).eval()
    if not path.is_file():
        raise InputNotFoundError(path, "model not found (expected a checkpoint folder, a TorchScript or an ONNX file)")
    from .export import load_onnx, load_torchscript

    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    return load_torchscript(path, device=device)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other names pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return device


def model_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short, unique display names for model paths (folder or file stem; clashes get ``-2``...)."""
    names: list[str] = []
    for p in paths:
        path = Path(p)
        in_checkpoint = path.name in ("model.pt", "config.json") and (path.parent / "config.json").is_file()
        base = path.name if path.is_dir() else path.parent.name if in_checkpoint else path.stem
        base = base or str(p)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
