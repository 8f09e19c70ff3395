"""Out-of-sample instance predictions for every store image, and their cache.

Two ways to get them:

* :func:`oof_predictions`: the built-in model, trained with grouped K-fold on the store itself
  (group = the source's patient / slide / fold unit, :func:`cellcurate.relabel.classify.nucleus_groups`),
  so every image is predicted by a model that never saw it, nor any image of its group. The model is
  a per-pixel nucleus classifier (gradient-boosted trees over colour-deconvolved hematoxylin at
  several scales, in µm) followed by a distance-transform watershed; it needs no weights and trains
  in seconds on a CPU, which is what lets every image be predicted out of fold.
* :func:`import_predictions`: predictions made by another tool, one file per store image under a
  folder, named after the image id (``DIR/<image_id>.npy``, ``.tif``/``.tiff``, ``.geojson``,
  ``.json`` or ``.geojson.gz``; ``/`` in an image id is a sub-folder). An instance map is (H, W)
  integers, 0 = background; a GeoJSON file holds one polygon feature per nucleus (read by the
  reader the caller passes: ``cellcurate.curation.qupath.read_geojson``, whose ``Detection
  probability`` / ``probability`` measurement, when present, is the confidence). A student of
  ``curate distill`` run out of fold with ``curate predict`` comes in this way.

Cache: ``STORE/instances/predictions/<predictor-id>/``::

    index.parquet     image_id -> (file, position) of its maps
    labels_<k>.npy    (B, H, W) uint16 (int32 when needed) predicted instance maps, ids 1..m
    prob_<k>.npy      (B, H, W) uint8 nucleus probability × 255
    meta.json         predictor id and config, store fingerprint, sha256 of every file

written in a temp folder and renamed (as the feature cache); reused while the store's ingest units
and the predictor's config are unchanged; a file failing its checksum is recomputed with a warning.

Dimensions: B images of H×W pixels, m predicted instances of one image, F pixel features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.atomic import remove_tree, replace_dir
from ..errors import ConfigError, InputFormatError, InputNotFoundError, StateError, StoreError
from .features import hematoxylin_eosin, store_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..datasets.store import Store

log = logging.getLogger(__name__)

#: Suffixes :func:`import_predictions` looks for, in this order.
PREDICTION_SUFFIXES: tuple[str, ...] = (".npy", ".tif", ".tiff", ".geojson", ".geojson.gz", ".json")
#: Largest predicted map accepted (pixels), as the store's own images.
MAX_PIXELS = 1 << 28

#: (H, W) predicted maps of one image: instance ids, nucleus probability in [0, 1].
Maps = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class PixelModelConfig:
    """The built-in out-of-fold model. Scales are in µm (converted with each image's ``mpp``)."""

    folds: int = 3
    seed: int = 0
    max_iter: int = 30
    pixels_per_image: int = 2000
    max_train_pixels: int = 200_000
    #: "spatial": pixels are held out by square blocks of ``block_um`` inside every image (each
    #: block's fold model never saw that block's labels, but learnt the image's own stain from its
    #: other blocks); "grouped": whole images are held out by patient/slide/fold group.
    cv: str = "spatial"
    block_um: float = 32.0
    #: with ``cv="spatial"``, sampled pixels per 1,000 µm² of tissue (an image's share grows with its
    #: area; ``pixels_per_image`` is then a floor), the total capped by ``max_train_pixels``
    pixels_per_kum2: float = 500.0
    threshold: float = 0.5  # nucleus probability that makes a pixel foreground
    min_area_um2: float = 4.0  # smaller predicted objects are dropped
    seed_um: float = 0.4  # h of the h-maxima seeds of the distance transform (µm)
    work_mpp: float = 0.5  # finer images are block-averaged to about this pixel size for the classifier

    def validate(self) -> "PixelModelConfig":
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ConfigError(f"--folds must be an integer >= 2, got {self.folds!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"threshold must lie in (0, 1), got {self.threshold}")
        for name in ("max_iter", "pixels_per_image", "max_train_pixels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cv not in ("spatial", "grouped"):
            raise ConfigError(f"the pixel model's cv must be 'spatial' or 'grouped', got {self.cv!r}")
        if not float(self.block_um) > 0 or not float(self.pixels_per_kum2) > 0:
            raise ConfigError(f"block_um and pixels_per_kum2 must be > 0, got {self.block_um}, {self.pixels_per_kum2}")
        return self

    @property
    def id(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return f"oof-pixel-hgb-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


# -- the pixel model ------------------------------------------------------------------------------
PIXEL_FEATURES: tuple[str, ...] = (
    "h", "e", "grey", "h_s05", "h_s1", "h_s2", "h_dog", "h_local", "h_grad", "h_log", "e_s1", "grey_s1",
)


def pixel_features(image: np.ndarray, *, mpp: float) -> np.ndarray:
    """(H, W, F) float32 per-pixel features (:data:`PIXEL_FEATURES`) of an (H, W, 3) uint8 image."""
    from scipy import ndimage

    if image.ndim != 3 or image.shape[2] != 3:
        raise InputFormatError(None, f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    px = 1.0 / max(float(mpp), 1e-3)  # pixels per µm
    h, e = hematoxylin_eosin(image)
    h = h.astype(np.float32)
    e = e.astype(np.float32)
    grey = image.astype(np.float32).mean(axis=2) / 255.0
    g = ndimage.gaussian_filter
    h05, h1, h2 = g(h, 0.5 * px), g(h, 1.0 * px), g(h, 2.0 * px)
    h6 = g(h, 6.0 * px)
    feats = [
        h, e, grey, h05, h1, h2, h1 - g(h, 3.0 * px), h1 - h6,
        np.hypot(ndimage.sobel(h05, 0), ndimage.sobel(h05, 1)),
        -ndimage.gaussian_laplace(h, 1.5 * px) * (1.5 * px) ** 2,
        g(e, 1.0 * px), g(grey, 1.0 * px),
    ]
    return np.stack(feats, axis=-1).astype(np.float32)


def instances_from_prob(prob: np.ndarray, *, mpp: float, threshold: float = 0.5, min_area_um2: float = 4.0,
                        seed_um: float = 0.4, seed_step: int = 1) -> np.ndarray:
    """(H, W) int32 instances from an (H, W) nucleus probability: threshold, holes filled, one
    watershed basin per h-maximum of the distance transform, objects under ``min_area_um2`` dropped.

    ``seed_step`` > 1 finds the h-maxima on every ``seed_step``-th pixel (the classifier's grid),
    which is where most of the time goes otherwise; the watershed itself runs at full resolution.
    """
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    fg = prob >= threshold
    fg = ndimage.binary_opening(fg, iterations=1)
    fg = ndimage.binary_fill_holes(fg)
    if not fg.any():
        return np.zeros(prob.shape, np.int32)
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, 1.0)
    h = max(0.5, seed_um / max(float(mpp), 1e-3))
    k = max(1, int(seed_step))
    if k > 1:
        o = k // 2
        small = dist[o::k, o::k]
        peaks = h_maxima(small, max(0.5, h / k) * k) & fg[o::k, o::k]
        seeds = np.zeros(fg.shape, bool)
        seeds[o::k, o::k][:peaks.shape[0], :peaks.shape[1]] = peaks
        # peaks of one plateau sit k pixels apart: join them before labelling
        seeds = ndimage.binary_dilation(seeds, np.ones((k + 1, k + 1), bool)) & fg
    else:
        seeds = h_maxima(dist, h) & fg
    markers, _ = ndimage.label(seeds)
    labels = watershed(-dist, markers, mask=fg)
    # components without a marker (flat, tiny) become their own instance
    rest, n_rest = ndimage.label(fg & (labels == 0))
    if n_rest:
        labels = np.where(rest > 0, rest + labels.max(), labels)
    min_px = max(1, int(round(min_area_um2 / max(float(mpp), 1e-3) ** 2)))
    areas = np.bincount(labels.ravel())
    small_ids = areas < min_px
    small_ids[0] = False
    labels[small_ids[labels]] = 0
    return relabel_sequential(labels)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..m in ascending order (0 stays background), int32."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) and ids[-1] == len(ids):
        return labels.astype(np.int32, copy=False)
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def image_folds(images: "pd.DataFrame", folds: int, seed: int) -> tuple[np.ndarray, int, str]:
    """(B,) fold of every image, the number of folds used, and how images were grouped.

    Groups are the sources' CV units (patient, slide, PanNuke fold; ``nucleus_groups``); with fewer
    groups than 2 the images themselves are the groups (said in the returned note).
    """
    from .classify import nucleus_groups

    groups = nucleus_groups(images, images)
    uniq = np.unique(groups)
    note = "grouped by patient/slide/fold"
    if len(uniq) < 2:
        groups = images["image_id"].astype(str).to_numpy(dtype=object)
        uniq = np.unique(groups)
        note = "one group only: images are the groups"
    k = int(min(folds, len(uniq)))
    if k < 2:
        raise ConfigError(f"out-of-fold predictions need at least 2 images, the store has {len(images)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    # balance folds by image count: biggest groups first, each to the fold with fewest images
    sizes = {g: int((groups == g).sum()) for g in uniq}
    ranked = sorted(uniq[order], key=lambda g: -sizes[g])
    load = np.zeros(k, np.int64)
    fold_of: dict[Any, int] = {}
    for g in ranked:
        f = int(np.argmin(load))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.array([fold_of[g] for g in groups], np.int64), k, note


def _factor(mpp: float, work_mpp: float) -> int:
    """Integer block size bringing ``mpp`` to about ``work_mpp`` (1 when the image is not finer)."""
    return max(1, int(round(work_mpp / max(float(mpp), 1e-6))))


def _downscale(image: np.ndarray, f: int) -> np.ndarray:
    """(ceil(H/f), ceil(W/f), 3) uint8 block means (edge blocks padded by replication)."""
    if f == 1:
        return image
    h, w = image.shape[:2]
    ph, pw = -h % f, -w % f
    img = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else image
    hh, ww = img.shape[0] // f, img.shape[1] // f
    out = img.reshape(hh, f, ww, f, 3).astype(np.float32).mean(axis=(1, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _upscale(prob: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a block-grid probability back to the image's ``shape``."""
    if f == 1:
        return prob
    from scipy import ndimage

    h, w = shape
    # block centres sit at (i + 0.5) * f - 0.5 in full-resolution pixel coordinates
    yy = (np.arange(h) + 0.5) / f - 0.5
    xx = (np.arange(w) + 0.5) / f - 0.5
    grid = np.meshgrid(yy, xx, indexing="ij")
    return ndimage.map_coordinates(prob, grid, order=1, mode="nearest").astype(np.float32)


def _image_seed(cfg: PixelModelConfig, image_id: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16), stream])


def block_folds(shape: tuple[int, int], *, block_px: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) int8 fold of every pixel of one image's working grid: square blocks of ``block_px``
    pixels, the folds dealt evenly over the image's blocks in random order (so an image with at
    least ``k`` blocks has every fold, and an image of one block is not always fold 0).

    >>> f = block_folds((4, 6), block_px=2, k=3, rng=np.random.default_rng(0))
    >>> f.shape, sorted(np.unique(f).tolist()), np.bincount(f[::2, ::2].ravel()).tolist()
    ((4, 6), [0, 1, 2], [2, 2, 2])
    """
    b = max(1, int(block_px))
    nby, nbx = -(-shape[0] // b), -(-shape[1] // b)
    n = nby * nbx
    dealt = rng.permutation((np.arange(n) + int(rng.integers(k))) % k).astype(np.int8)
    return np.repeat(np.repeat(dealt.reshape(nby, nbx), b, axis=0), b, axis=1)[: shape[0], : shape[1]]


def _sample_counts(images: "pd.DataFrame", cfg: PixelModelConfig) -> dict[str, int]:
    """Sampled training pixels per image: ``pixels_per_image`` each (grouped CV), or in proportion
    to the image's area in µm² with that floor (spatial CV); the total capped by ``max_train_pixels``."""
    ids = images["image_id"].astype(str).to_numpy()
    if cfg.cv == "grouped":
        per = max(50, min(cfg.pixels_per_image, cfg.max_train_pixels // max(1, len(ids))))
        return {i: per for i in ids}
    area = (images["height"].astype(float) * images["width"].astype(float) * images["mpp"].astype(float) ** 2).to_numpy()
    want = np.maximum(float(cfg.pixels_per_image), cfg.pixels_per_kum2 * area / 1000.0)
    if want.sum() > cfg.max_train_pixels:
        want *= cfg.max_train_pixels / want.sum()
    return {i: max(50, int(n)) for i, n in zip(ids, want)}


def _image_grid(img: np.ndarray, mpp: float, cfg: PixelModelConfig, image_id: str, k: int
                ) -> tuple[int, np.ndarray, np.ndarray | None]:
    """Block factor, (h, w, F) pixel features on the working grid, and (spatial CV) the (h, w) block folds."""
    f = _factor(mpp, cfg.work_mpp)
    feats = pixel_features(_downscale(img, f), mpp=mpp * f)
    folds = None
    if cfg.cv == "spatial":
        block_px = int(round(cfg.block_um / (mpp * f)))
        folds = block_folds(feats.shape[:2], block_px=block_px, k=k, rng=_image_seed(cfg, image_id, 1))
    return f, feats, folds


Samples = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _sample_pixels(store: "Store", images: "pd.DataFrame", nuclei: "pd.DataFrame", mpp: dict[str, float],
                   cfg: PixelModelConfig, k: int, progress: bool | None) -> Samples:
    """Per image, sampled (n, F) pixel features (on the working grid), (n,) 0/1 targets (the
    annotation at the block centre) and, with spatial CV, (n,) block folds; ignore regions skipped."""
    from tqdm import tqdm

    image_ids = images["image_id"].astype(str).tolist()
    counts = _sample_counts(images, cfg)
    ignore = nuclei[nuclei["kind"] == "ignore"].groupby("image_id")["instance_id"].apply(list).to_dict()
    out: Samples = {}
    for image_id, img, ins in tqdm(store.iter_images(image_ids), total=len(image_ids), unit="image", leave=False,
                                   desc="pixel samples", disable=None if progress is None else not progress):
        rng = _image_seed(cfg, image_id, 0)
        f, grid, folds = _image_grid(img, mpp[image_id], cfg, image_id, k)
        feats = grid.reshape(-1, len(PIXEL_FEATURES))
        cy = np.minimum(np.arange(grid.shape[0]) * f + f // 2, ins.shape[0] - 1)
        cx = np.minimum(np.arange(grid.shape[1]) * f + f // 2, ins.shape[1] - 1)
        lab = ins[np.ix_(cy, cx)].reshape(-1)
        cand = np.flatnonzero(~np.isin(lab, ignore[image_id])) if image_id in ignore else np.arange(lab.size)
        if not len(cand):
            continue
        pick = rng.choice(cand, size=min(counts[image_id], len(cand)), replace=False)
        out[image_id] = (feats[pick], (lab[pick] > 0).astype(np.int8),
                         None if folds is None else folds.reshape(-1)[pick])
    return out


def _fit(X: np.ndarray, y: np.ndarray, cfg: PixelModelConfig, what: str) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(np.unique(y)) < 2:
        raise StateError(f"{what} of the instance model has no annotated nucleus pixels (or no background) to train on")
    model = HistGradientBoostingClassifier(max_iter=cfg.max_iter, learning_rate=0.2, max_leaf_nodes=31,
                                           early_stopping=False, random_state=cfg.seed)
    return model.fit(X, y)


def _nucleus_proba(model: Any, feats: np.ndarray) -> np.ndarray:
    p = model.predict_proba(feats)
    col = list(model.classes_).index(1) if 1 in model.classes_ else None
    return (p[:, col] if col is not None else np.zeros(len(p))).astype(np.float32)


def _predict_prob(model: Any, image: np.ndarray, mpp: float, work_mpp: float = 0.5) -> np.ndarray:
    """(H, W) float32 nucleus probability of one image (classifier on the working grid, upsampled)."""
    f = _factor(mpp, work_mpp)
    feats = pixel_features(_downscale(image, f), mpp=mpp * f)
    out = _nucleus_proba(model, feats.reshape(-1, feats.shape[-1])).reshape(feats.shape[:2])
    return _upscale(out, f, image.shape[:2])


def oof_predictions(store: "Store", *, config: PixelModelConfig | None = None, progress: bool | None = None
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, instances (H, W) int32, probability (H, W) float32)`` for every store
    image, every pixel predicted by a fold model that never saw its label.

    ``cv="spatial"`` (the default): the folds are square blocks of ``block_um`` dealt over every
    image; the model of fold f learns from the other folds' blocks of every image (the image's own
    stain among them) and predicts fold f's blocks. ``cv="grouped"``: the folds are patient /
    slide / fold groups of whole images (:func:`image_folds`), so an image is predicted by a model
    that saw no image of its group; on real tissue of a few patients this is the weaker model (a
    new patient's stain is far from the training ones: ``docs/INSTANCES.md``).

    Pixel features are computed twice per image (sampling, then prediction), never held for the
    whole store; the trees run on one thread (``threadpoolctl``), which on a shared 2-core machine
    was 30× faster than OpenMP's default.
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    cfg = (config or PixelModelConfig()).validate()
    images = store.images().reset_index(drop=True)
    if images.empty:
        raise StoreError("the store has no images; run `curate ingest` first", path=store.path)
    nuclei = store.nuclei()
    mpp = dict(zip(images["image_id"].astype(str), images["mpp"].astype(float)))
    ids = images["image_id"].astype(str).to_numpy()
    if cfg.cv == "grouped":
        fold, k, _note = image_folds(images, cfg.folds, cfg.seed)
    else:
        fold, k = np.zeros(len(ids), np.int64), int(cfg.folds)
    samples = _sample_pixels(store, images, nuclei, mpp, cfg, k, progress)
    bar = tqdm(total=len(ids), desc="instance predictions (out of fold)", unit="image",
               disable=None if progress is None else not progress, leave=False)

    def finish(image_id: str, img: np.ndarray, prob_small: np.ndarray, f: int) -> tuple[str, np.ndarray, np.ndarray]:
        prob = _upscale(prob_small, f, img.shape[:2])
        lab = instances_from_prob(prob, mpp=mpp[image_id], threshold=cfg.threshold, min_area_um2=cfg.min_area_um2,
                                  seed_um=cfg.seed_um, seed_step=f)
        bar.update(1)
        return image_id, lab, prob

    try:
        with threadpool_limits(1):
            if cfg.cv == "spatial":
                X = np.concatenate([t[0] for t in samples.values()]) if samples else np.zeros((0, len(PIXEL_FEATURES)))
                y = np.concatenate([t[1] for t in samples.values()]) if samples else np.zeros(0, np.int8)
                fo = np.concatenate([t[2] for t in samples.values()]) if samples else np.zeros(0, np.int8)
                models = [_fit(X[fo != f], y[fo != f], cfg, f"{store.path}: spatial fold {f}") for f in range(k)]
                for image_id, img, _ins in store.iter_images(list(ids)):
                    f, grid, folds = _image_grid(img, mpp[image_id], cfg, image_id, k)
                    assert folds is not None
                    flat, fl = grid.reshape(-1, grid.shape[-1]), folds.reshape(-1)
                    prob_small = np.zeros(fl.size, np.float32)
                    for j, model in enumerate(models):
                        rows = fl == j
                        if rows.any():
                            prob_small[rows] = _nucleus_proba(model, flat[rows])
                    yield finish(image_id, img, prob_small.reshape(grid.shape[:2]), f)
                return
            for j in range(k):
                train = [samples[i] for i in ids[fold != j] if i in samples]
                X = np.concatenate([t[0] for t in train]) if train else np.zeros((0, len(PIXEL_FEATURES)))
                y = np.concatenate([t[1] for t in train]) if train else np.zeros(0, np.int8)
                model = _fit(X, y, cfg, f"{store.path}: fold {j}")
                for image_id, img, _ins in store.iter_images(list(ids[fold == j])):
                    f = _factor(mpp[image_id], cfg.work_mpp)
                    grid = pixel_features(_downscale(img, f), mpp=mpp[image_id] * f)
                    whole = _nucleus_proba(model, grid.reshape(-1, grid.shape[-1])).reshape(grid.shape[:2])
                    yield finish(image_id, img, whole, f)
    finally:
        bar.close()


# -- imported predictions -------------------------------------------------------------------------
def prediction_file(folder: Path, image_id: str) -> Path | None:
    """The file of ``image_id`` under ``folder`` (first suffix of :data:`PREDICTION_SUFFIXES`), or None."""
    base = folder.joinpath(*image_id.split("/"))
    for suffix in PREDICTION_SUFFIXES:
        p = base.with_name(base.name + suffix)
        if p.is_file():
            return p
    return None


def read_instance_map(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 instance map from a ``.npy`` or TIFF file, checked against the image's ``shape``."""
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            import tifffile

            arr = tifffile.imread(path)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFormatError(path, f"cannot read the instance map ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    except Exception as exc:  # tifffile raises its own errors on damaged files
        raise InputFormatError(path, f"cannot read the instance map ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.size == 0 and shape[0] * shape[1] > 0:
        raise InputFormatError(path, "cannot read the instance map (the file holds no pixels: damaged or empty)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != tuple(shape):
        raise InputFormatError(path, f"instance map has shape {arr.shape}, expected the image's {tuple(shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputFormatError(path, f"instance map must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise InputFormatError(path, f"instance map has negative ids (min {int(arr.min())})")
    return relabel_sequential(arr.astype(np.int64, copy=False))


_PROB_KEYS = ("detection probability", "probability", "prob", "confidence", "score")


def _feature_prob(measurements: Any) -> float | None:
    if not isinstance(measurements, dict):
        return None
    for k, v in measurements.items():
        if str(k).strip().lower() in _PROB_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
            if 0.0 <= float(v) <= 1.0:
                return float(v)
    return None


def read_geojson_map(path: Path, shape: tuple[int, int], reader: Callable[[Path], "pd.DataFrame"],
                     rasterise: Callable[..., np.ndarray]) -> Maps:
    """Instance map and probability from one GeoJSON file of polygon features (later features
    win where they overlap). A feature's probability measurement, when present, fills its pixels;
    otherwise 1.0."""
    frame = reader(path)
    h, w = shape
    lab = np.zeros(shape, np.int32)
    prob = np.zeros(shape, np.float32)
    k = 0
    for row in frame.itertuples(index=False):
        geom = row.geometry
        minx, miny, maxx, maxy = geom.bounds
        if maxx <= 0 or maxy <= 0 or minx >= w or miny >= h:
            raise InputFormatError(path, f"feature {row.index}: lies outside the {w}×{h} image")
        if not row.valid:
            raise InputFormatError(path, f"feature {row.index}: invalid polygon ({row.invalid_reason})")
        y0, x0 = max(0, int(np.floor(miny))), max(0, int(np.floor(minx)))
        y1, x1 = min(h, int(np.ceil(maxy))), min(w, int(np.ceil(maxx)))
        m = rasterise(geom, shape, window=(y0, x0, y1, x1))
        if not m.any():
            continue
        k += 1
        lab[y0:y1, x0:x1][m] = k
        p = _feature_prob(row.measurements)
        prob[y0:y1, x0:x1][m] = 1.0 if p is None else p
    return relabel_sequential(lab), prob


def import_predictions(store: "Store", folder: str | os.PathLike[str], *,
                       geojson_reader: Callable[[Path], "pd.DataFrame"] | None = None,
                       rasterise: Callable[..., np.ndarray] | None = None,
                       progress: bool | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, instances, probability)`` read from ``folder`` for every store image.

    Every image must have its file (a missing one is an error naming the first missing image). An
    instance map carries no probability: its nuclei get 1.0, background 0.0.
    """
    from tqdm import tqdm

    root = Path(folder)
    if not root.is_dir():
        raise InputNotFoundError(root, "predictions folder does not exist")
    images = store.images()
    files: list[tuple[str, Path, tuple[int, int]]] = []
    missing: list[str] = []
    for r in images.itertuples(index=False):
        p = prediction_file(root, str(r.image_id))
        if p is None:
            missing.append(str(r.image_id))
        else:
            files.append((str(r.image_id), p, (int(r.height), int(r.width))))
    if missing:
        raise InputNotFoundError(root, f"no prediction for {len(missing)} of {len(images)} store images "
                                       f"(first: {missing[0]!r}; expected {missing[0]}.npy, .tif or .geojson)")
    for image_id, path, shape in tqdm(files, desc="instance predictions (import)", unit="image",
                                      disable=None if progress is None else not progress, leave=False):
        name = path.name.lower()
        if name.endswith((".geojson", ".geojson.gz", ".json")):
            if geojson_reader is None or rasterise is None:
                raise ConfigError(f"{path}: GeoJSON predictions need a GeoJSON reader (curate instances passes QuPath's)")
            lab, prob = read_geojson_map(path, shape, geojson_reader, rasterise)
        else:
            lab = read_instance_map(path, shape)
            prob = (lab > 0).astype(np.float32)
        yield image_id, lab, prob


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """sha256 over the names, sizes and modification times of the prediction files (the import's id)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- cache ----------------------------------------------------------------------------------------
def predictions_dir(store: "Store", predictor_id: str) -> Path:
    return store.path / "instances" / "predictions" / predictor_id


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class PredictionCache:
    """Read access to a written cache: ``maps(image_id)`` or :meth:`iter_maps` in file order."""

    def __init__(self, folder: Path, index: "pd.DataFrame", meta: dict[str, Any]) -> None:
        self.folder = folder
        self.index = index
        self.meta = meta
        self._pos = {str(i): (int(f), int(b)) for i, f, b in zip(index["image_id"], index["file"], index["pos"])}
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def predictor_id(self) -> str:
        return str(self.meta["predictor"])

    def _file(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._open:
            if len(self._open) >= 16:  # memory maps: cheap to keep a few open
                self._open.pop(next(iter(self._open)))
            self._open[k] = (np.load(self.folder / f"labels_{k}.npy", mmap_mode="r", allow_pickle=False),
                             np.load(self.folder / f"prob_{k}.npy", mmap_mode="r", allow_pickle=False))
        return self._open[k]

    def maps(self, image_id: str) -> Maps:
        """(instances int32, probability float32 in [0, 1]) of one image."""
        if image_id not in self._pos:
            raise StoreError(f"{self.folder}: no cached prediction for image {image_id!r}")
        k, b = self._pos[image_id]
        lab, prob = self._file(k)
        return np.asarray(lab[b]).astype(np.int32), np.asarray(prob[b]).astype(np.float32) / 255.0

    def image_ids(self) -> list[str]:
        return list(self._pos)


def load_predictions(store: "Store", predictor_id: str, config: dict[str, Any], *, verify: bool = True
                     ) -> PredictionCache | None:
    """The cache when valid for this store state and config; None when absent, stale or damaged."""
    import pandas as pd

    folder = predictions_dir(store, predictor_id)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("store_fingerprint") != store_fingerprint(store) or meta.get("config") != config:
            return None
        if verify:
            for name, digest in meta["sha256"].items():
                if _file_sha256(folder / name) != digest:
                    log.warning("%s: prediction cache fails its checksum (%s corrupted); recomputing", folder, name)
                    return None
        index = pd.read_parquet(folder / "index.parquet")
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("%s: prediction cache is unreadable (%s); recomputing", folder, exc)
        return None
    want = set(store.images()["image_id"].astype(str))
    if set(index["image_id"].astype(str)) != want:
        return None
    return PredictionCache(folder, index, meta)


def save_predictions(store: "Store", predictor_id: str, config: dict[str, Any],
                     maps: Iterator[tuple[str, np.ndarray, np.ndarray]]) -> PredictionCache:
    """Write the cache atomically from ``(image_id, instances, probability)`` items. Images of one
    shape that arrive in a row share a file (stacked), so a PanNuke fold is a few files."""
    import pandas as pd

    folder = predictions_dir(store, predictor_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{predictor_id}-{secrets.token_hex(4)}"
    tmp.mkdir()
    rows: list[tuple[str, int, int]] = []
    try:
        k = 0
        buf_ids: list[str] = []
        buf_lab: list[np.ndarray] = []
        buf_prob: list[np.ndarray] = []

        def flush() -> None:
            nonlocal k
            if not buf_ids:
                return
            lab = np.stack(buf_lab)
            dtype = np.uint16 if int(lab.max(initial=0)) < 1 << 16 else np.int32
            np.save(tmp / f"labels_{k}.npy", lab.astype(dtype), allow_pickle=False)
            np.save(tmp / f"prob_{k}.npy", np.stack(buf_prob), allow_pickle=False)
            rows.extend((i, k, b) for b, i in enumerate(buf_ids))
            k += 1
            buf_ids.clear(); buf_lab.clear(); buf_prob.clear()

        for image_id, lab, prob in maps:
            if lab.shape != prob.shape:
                raise InputFormatError(None, f"image {image_id}: instances {lab.shape} and probability "
                                             f"{prob.shape} differ in shape")
            if buf_lab and (buf_lab[0].shape != lab.shape or len(buf_ids) >= 512):
                flush()
            buf_ids.append(image_id)
            buf_lab.append(lab)
            buf_prob.append(np.clip(np.rint(np.asarray(prob, np.float32) * 255), 0, 255).astype(np.uint8))
        flush()
        index = pd.DataFrame(rows, columns=["image_id", "file", "pos"])
        index.to_parquet(tmp / "index.parquet", index=False)
        sha = {p.name: _file_sha256(p) for p in sorted(tmp.glob("*.npy"))}
        meta = {"predictor": predictor_id, "config": config, "n_images": len(index),
                "store_fingerprint": store_fingerprint(store), "ledger_head": store.ledger.head()[0], "sha256": sha}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".old-{predictor_id}-{secrets.token_hex(4)}"
            os.replace(folder, old)
        replace_dir(tmp, folder)
        if old is not None:
            remove_tree(old)
    except BaseException:
        remove_tree(tmp)
        raise
    return PredictionCache(folder, index, meta)


@dataclass(frozen=True)
class CustomPredictor:
    """Out-of-sample predictions made by a caller's model (``relabel`` may not import ``models``:
    the K-fold student comes in this way from ``cellcurate.cli._instance_student``).

    ``predict(store, progress)`` yields ``(image_id, instances (H, W) int, probability (H, W)
    float in [0, 1])`` for every store image, each by a model that never saw it; the cache is
    ``predictor_id``'s and valid while ``config`` (JSON) and the store's ingest units are unchanged."""

    predictor_id: str
    config: dict[str, Any]
    predict: Callable[["Store", bool | None], Iterator[tuple[str, np.ndarray, np.ndarray]]]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def predictor_for_folder(folder: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(predictor id, config) of imported predictions: the folder's name and file fingerprint."""
    root = Path(folder).resolve()
    fp = folder_fingerprint(root)
    return f"import-{_SAFE.sub('_', root.name)[:40]}-{fp[:10]}", {"kind": "import", "folder": str(root),
                                                                  "files_sha256": fp}


def get_predictions(store: "Store", *, folder: str | os.PathLike[str] | None = None,
                    config: PixelModelConfig | None = None, geojson_reader: Callable[[Path], "pd.DataFrame"] | None = None,
                    rasterise: Callable[..., np.ndarray] | None = None, use_cache: bool = True,
                    progress: bool | None = None, custom: "CustomPredictor | None" = None
                    ) -> tuple[PredictionCache, bool]:
    """The predictions of every store image (cached, or computed/imported and cached), and
    whether they came from the cache: imported from ``folder``, else those of ``custom`` (e.g. the
    K-fold student of ``curate instances --predictor student``, ``cellcurate.cli._instance_student``),
    else the built-in pixel model of ``config``."""
    if folder is not None and custom is not None:
        raise ConfigError("--predictions and --predictor student exclude each other")
    if folder is not None:
        pid, cfg_doc = predictor_for_folder(folder)
    elif custom is not None:
        pid, cfg_doc = custom.predictor_id, custom.config
    else:
        cfg = (config or PixelModelConfig()).validate()
        pid, cfg_doc = cfg.id, {"kind": "oof-pixel-hgb", **asdict(cfg)}
    if use_cache:
        cached = load_predictions(store, pid, cfg_doc)
        if cached is not None:
            return cached, True
    if store.readonly:
        raise StoreError("the store is open read-only and has no cached predictions for this predictor",
                         path=store.path)
    if folder is not None:
        items = import_predictions(store, folder, geojson_reader=geojson_reader, rasterise=rasterise,
                                   progress=progress)
    elif custom is not None:
        items = custom.predict(store, progress)
    else:
        items = oof_predictions(store, config=config, progress=progress)
    return save_predictions(store, pid, cfg_doc, items), False
