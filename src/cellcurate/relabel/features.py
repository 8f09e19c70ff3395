"""Per-nucleus features: the weight-free handcrafted default, and the per-backbone feature cache.

The handcrafted features are computed vectorised over a whole image (``np.bincount`` over the
instance map; never one ``regionprops`` call per nucleus): size and shape from the pixel moments,
colour and texture statistics inside the nucleus, and the same colour statistics over a ring
around it. Sizes are in µm (each image's ``mpp``), so PanNuke and MoNuSAC nuclei are comparable.

The cache lives in ``STORE/features/<backbone-id>/``::

    features.npy      (M, F) float32
    nucleus_ids.npy   (M,) int64, the order of the rows
    meta.json         backbone id + config, feature names, sha256 of both arrays, store fingerprint

It is reused by every round while the store's ingest units are unchanged; a cache whose arrays do
not match their checksums is recomputed with a warning.

Dimensions: M nuclei, F features, H×W pixels, n instances of one image.

>>> img = np.full((32, 32, 3), 200, np.uint8); ins = np.zeros((32, 32), np.int32)
>>> ins[10:20, 10:20] = 1; img[ins == 1] = (80, 40, 120)
>>> f = handcrafted_image_features(img, ins, 1, mpp=0.5)
>>> float(f[0, FEATURE_NAMES.index("area_um2")]), float(f[0, FEATURE_NAMES.index("mean_r")])
(25.0, 80.0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputFormatError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store
    from .backbones import Backbone

log = logging.getLogger(__name__)

#: Ring width around each nucleus for the context statistics, µm.
RING_UM = 2.0

_COLOUR = ("r", "g", "b", "h", "e")
FEATURE_NAMES: tuple[str, ...] = (
    "area_um2", "log_area", "perimeter_um", "circularity", "major_um", "minor_um", "elongation",
    "eccentricity", "extent", "ellipse_fill",
    *(f"mean_{c}" for c in _COLOUR), *(f"std_{c}" for c in _COLOUR),
    "grad_mean", "grad_std", "lap_energy", "h_p90", "dark_fraction",
    *(f"ring_mean_{c}" for c in _COLOUR), *(f"ring_std_{c}" for c in ("r", "g", "b", "h")),
    "contrast_h", "contrast_grey", "ring_fill",
)

# Optical-density look-up tables for the H&E(&DAB) colour deconvolution of skimage.color.rgb2hed.
_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
_OD_LUT = (np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float64)


def hematoxylin_eosin(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin channels of ``skimage.color.rgb2hed``, via a look-up table.

    Parameters
    ----------
    image
        (H, W, 3) uint8 RGB.

    Returns
    -------
    (H, W) float64 hematoxylin, (H, W) float64 eosin.
    """
    od = _OD_LUT[image]  # (H, W, 3)
    h = np.maximum(od @ _HED_FROM_RGB[:, 0], 0)  # skimage clips negative concentrations to 0
    e = np.maximum(od @ _HED_FROM_RGB[:, 1], 0)
    return h, e


def handcrafted_image_features(image: np.ndarray, instances: np.ndarray, n: int, *, mpp: float) -> np.ndarray:
    """Handcrafted features of instance ids 1..n of one image, vectorised.

    Parameters
    ----------
    image
        (H, W, 3) uint8 RGB.
    instances
        (H, W) int32 instance map, 0 = background, ids 1..n.
    n
        Number of instances.
    mpp
        Microns per pixel of the image.

    Returns
    -------
    (n, F) float32, columns :data:`FEATURE_NAMES`; an instance with no pixels gets NaN.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != instances.shape:
        raise InputFormatError(None, f"image {image.shape} and instances {instances.shape} do not match")
    return handcrafted_batch_features(image[None], instances[None], [n], mpp=[mpp])[0]


def _per_nucleus_means(labels: np.ndarray, columns: list[np.ndarray], area: np.ndarray) -> np.ndarray:
    """(n, C) per-nucleus means of C per-pixel columns (P,); ``labels`` (P,) int64 gives each pixel's nucleus."""
    n = len(area)
    return np.stack([np.bincount(labels, weights=col, minlength=n) for col in columns], axis=1) / area[:, None]


def handcrafted_batch_features(images: np.ndarray, instances: np.ndarray, ns: "list[int] | np.ndarray", *,
                               mpp: "list[float] | np.ndarray") -> list[np.ndarray]:
    """:func:`handcrafted_image_features` of B same-sized images at once (one pass over the batch).

    Parameters
    ----------
    images
        (B, H, W, 3) uint8 RGB.
    instances
        (B, H, W) int32 instance maps.
    ns
        (B,) number of instances of each image.
    mpp
        (B,) microns per pixel of each image.

    Returns
    -------
    B arrays (n_b, F) float32.
    """
    from scipy import ndimage

    bsz, hgt, wid = instances.shape
    ns = np.asarray(ns, dtype=np.int64)
    mpp_arr = np.asarray(mpp, dtype=np.float64)
    offsets = np.concatenate([[0], np.cumsum(ns)])
    total = int(offsets[-1])
    nf = len(FEATURE_NAMES)
    if total == 0:
        return [np.zeros((0, nf), np.float32) for _ in range(bsz)]
    # global labels: image b's id i -> offsets[b] + i - 1 (0-based); background -> -1
    ins = instances.astype(np.int32, copy=False)
    flat = ins.reshape(bsz, -1)
    fg = np.flatnonzero(flat)
    fg_b, fg_p = np.divmod(fg, hgt * wid)
    glab = offsets[fg_b] + flat.ravel()[fg].astype(np.int64) - 1
    area = np.bincount(glab, minlength=total).astype(np.float64)
    img_of = np.repeat(np.arange(bsz), ns)

    yy, xx = np.divmod(fg_p, wid)
    yy = yy.astype(np.float64)
    xx = xx.astype(np.float64)
    rgb_flat = images.reshape(-1, 3)
    px = rgb_flat.take(fg, axis=0)  # (P, 3) uint8
    h_fg, e_fg = hematoxylin_eosin(px[None])
    h_fg, e_fg = h_fg[0], e_fg[0]
    rgb = [px[:, i].astype(np.float64) for i in range(3)]
    grey = images[..., 0].astype(np.uint16)
    grey += images[..., 1]
    grey += images[..., 2]
    grey = grey.astype(np.float32) / 3
    gy = np.zeros_like(grey); gx = np.zeros_like(grey)
    gy[:, 1:-1] = (grey[:, 2:] - grey[:, :-2]) / 2
    gx[:, :, 1:-1] = (grey[:, :, 2:] - grey[:, :, :-2]) / 2
    grad = np.hypot(gy, gx).ravel().take(fg).astype(np.float64)
    lap = 4 * grey
    lap[:, 1:] -= grey[:, :-1]; lap[:, :-1] -= grey[:, 1:]
    lap[:, :, 1:] -= grey[:, :, :-1]; lap[:, :, :-1] -= grey[:, :, 1:]
    lap_fg = lap.ravel().take(fg).astype(np.float64)
    padded = np.pad(ins, ((0, 0), (1, 1), (1, 1)), mode="constant")
    c = padded[:, 1:-1, 1:-1]
    edge = ((padded[:, :-2, 1:-1] != c) | (padded[:, 2:, 1:-1] != c)
            | (padded[:, 1:-1, :-2] != c) | (padded[:, 1:-1, 2:] != c)).ravel().take(fg)

    chans = [*rgb, h_fg, e_fg]
    cols1 = [yy, xx, *chans, *(ch * ch for ch in chans), grad, grad * grad, lap_fg * lap_fg, edge.astype(np.float64)]
    with np.errstate(invalid="ignore", divide="ignore"):
        s1 = _per_nucleus_means(glab, cols1, area)
        cy, cx = s1[:, 0], s1[:, 1]
        dy, dx = yy - cy[glab], xx - cx[glab]
        s2 = _per_nucleus_means(glab, [dy * dy, dx * dx, dy * dx], area)
        means = [s1[:, 2 + i] for i in range(5)]
        stds = [np.sqrt(np.maximum(s1[:, 7 + i] - means[i] ** 2, 0)) for i in range(5)]
        g_mu = s1[:, 12]
        g_sd = np.sqrt(np.maximum(s1[:, 13] - g_mu**2, 0))
        lap_e = s1[:, 14]
        perim_px = np.maximum(s1[:, 15] * area * 1.12, 1.0)  # boundary pixels -> contour length
        # +1/12: the second moment of a unit pixel, so a one-pixel nucleus has finite axes
        myy, mxx, mxy = s2[:, 0] + 1 / 12, s2[:, 1] + 1 / 12, s2[:, 2]
        half_tr = (myy + mxx) / 2
        disc = np.sqrt(((myy - mxx) / 2) ** 2 + mxy**2)
        l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 1e-12)
        major, minor = 4 * np.sqrt(l1), 4 * np.sqrt(l2)
        dark = np.bincount(glab, weights=(h_fg > (means[3] + stds[3])[glab]), minlength=total) / area
        h_p90 = means[3] + 1.2816 * stds[3]
        # bounding boxes: find_objects over the batch with global ids (C speed; no ufunc.at)
        glob = np.where(ins > 0, ins + offsets[:bsz, None, None].astype(np.int32), 0)
        boxes = ndimage.find_objects(glob, max_label=total)
        bbox_area = np.array([(sl[1].stop - sl[1].start) * (sl[2].stop - sl[2].start) if sl is not None else np.nan
                              for sl in boxes], dtype=np.float64)

        # ring: background pixels within RING_UM of a nucleus (one ring width per batch; per-image
        # widths differ only when pixel sizes differ, in which case images come one at a time)
        ring_px = max(1, int(round(RING_UM / float(np.median(mpp_arr)))))
        grown = ndimage.maximum_filter(ins, size=(1, 2 * ring_px + 1, 2 * ring_px + 1), mode="constant", cval=0)
        grown[ins > 0] = 0
        gflat = grown.reshape(bsz, -1)
        rg = np.flatnonzero(gflat)
        rb = rg // (hgt * wid)
        rlab = offsets[rb] + gflat.ravel()[rg].astype(np.int64) - 1
        r_area = np.bincount(rlab, minlength=total).astype(np.float64)
        rpx = rgb_flat.take(rg, axis=0)
        r_h, r_e = hematoxylin_eosin(rpx[None])
        r_ch = [*(rpx[:, i].astype(np.float64) for i in range(3)), r_h[0], r_e[0]]
        rs = _per_nucleus_means(rlab, [*r_ch, *(ch * ch for ch in r_ch[:4])], r_area)
        has_ring = r_area > 0
        r_means = [np.where(has_ring, rs[:, i], means[i]) for i in range(5)]
        r_stds = [np.where(has_ring, np.sqrt(np.maximum(rs[:, 5 + i] - rs[:, i] ** 2, 0)), 0.0) for i in range(4)]
        grey_n = (means[0] + means[1] + means[2]) / 3
        grey_r = (r_means[0] + r_means[1] + r_means[2]) / 3
        ring_full = (2 * ring_px + np.sqrt(area / np.pi) * 2) ** 2 - area

        m = mpp_arr[img_of]
        cols = [
            area * m * m, np.log(area * m * m), perim_px * m, 4 * np.pi * area / perim_px**2,
            major * m, minor * m, major / minor, np.sqrt(1 - l2 / l1), area / bbox_area,
            area / (np.pi * major * minor / 4),
            *means, *stds, g_mu, g_sd, lap_e, h_p90, dark, *r_means, *r_stds,
            means[3] - r_means[3], grey_r - grey_n, np.minimum(r_area / np.maximum(ring_full, 1), 1.0),
        ]
    out = np.stack(cols, axis=1)
    out[area == 0] = np.nan
    out32 = out.astype(np.float32)
    return [out32[offsets[b]:offsets[b + 1]] for b in range(bsz)]


# -- cache ----------------------------------------------------------------------------------------
def store_fingerprint(store: "Store") -> str:
    """sha256 over the store's committed ingest units (name, folder, file fingerprint, taxonomy)."""
    units = store.units()
    text = "|".join(f"{r.unit}:{r.dir}:{r.fingerprint}:{r.taxonomy_hash}" for r in units.itertuples())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_array(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cache_dir(store: "Store", backbone_id: str) -> Path:
    return store.path / "features" / backbone_id


def load_cached(store: "Store", backbone: "Backbone") -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (features, nucleus_ids) when valid for this store state; None when absent or stale.

    A cache whose arrays fail their checksum is reported with a warning and treated as absent.
    """
    folder = cache_dir(store, backbone.id)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("store_fingerprint") != store_fingerprint(store) or meta.get("config") != backbone.config():
            return None
        feats = np.load(folder / "features.npy", allow_pickle=False)
        ids = np.load(folder / "nucleus_ids.npy", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        log.warning("%s: feature cache is unreadable (%s); recomputing", folder, exc)
        return None
    if _sha256_array(feats) != meta.get("features_sha256") or _sha256_array(ids) != meta.get("ids_sha256"):
        log.warning("%s: feature cache fails its checksum (corrupted); recomputing", folder)
        return None
    return feats, ids


def save_cache(store: "Store", backbone: "Backbone", feats: np.ndarray, ids: np.ndarray) -> Path:
    """Write the cache atomically (temp folder + rename)."""
    folder = cache_dir(store, backbone.id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{backbone.id}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        np.save(tmp / "features.npy", feats, allow_pickle=False)
        np.save(tmp / "nucleus_ids.npy", ids, allow_pickle=False)
        meta = {
            "backbone": backbone.id, "config": backbone.config(), "feature_names": list(backbone.feature_names),
            "n_nuclei": int(len(ids)), "n_features": int(feats.shape[1]),
            "features_sha256": _sha256_array(feats), "ids_sha256": _sha256_array(ids),
            "store_fingerprint": store_fingerprint(store), "ledger_head": store.ledger.head()[0],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".old-{backbone.id}-{secrets.token_hex(4)}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def nucleus_features(store: "Store", backbone: "Backbone", *, use_cache: bool = True,
                     progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features of every nucleus (kind "nucleus") of the store, from the cache or computed.

    Returns
    -------
    (M, F) float32 features and (M,) int64 nucleus ids (row order).
    """
    if use_cache:
        cached = load_cached(store, backbone)
        if cached is not None:
            return cached
    nuclei = store.nuclei(include_ignore=False)
    if nuclei.empty:
        raise StoreError("the store has no nuclei; run `curate ingest` first", path=store.path)
    feats, ids = backbone.extract(store, nuclei, progress=progress)
    if use_cache and not store.readonly:
        save_cache(store, backbone, feats, ids)
    return feats, ids


def check_features(feats: np.ndarray, ids: np.ndarray, *, where: str | os.PathLike[str]) -> None:
    """Refuse NaN/inf features with a one-line error naming how many and which nucleus first."""
    bad = ~np.isfinite(feats).all(axis=1)
    if bad.any():
        raise InputFormatError(
            where, f"{int(bad.sum())} nuclei have NaN or infinite features (first: nucleus {int(ids[bad][0])}); "
                   "recompute the features or exclude these nuclei",
        )
