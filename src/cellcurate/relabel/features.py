"""Per-nucleus features: the weight-free handcrafted default, and the per-backbone feature cache.

The handcrafted features are computed vectorised over chunks of a few tiles (never one
``regionprops`` call per nucleus): every pixel of a nucleus or of its ring is grouped by segment
once (runs of equal labels, radix-sorted) and each statistic is one segmented ``reduceat``: size
and shape from the pixel moments, colour and texture statistics inside the nucleus, and the same
colour statistics over a ring around it. Sizes are in µm (each image's ``mpp``), so PanNuke and
MoNuSAC nuclei are comparable. Speed (``benchmarks/bench_relabel.py``, one core): ~20,000 nuclei/s
on PanNuke tiles, 8× the first implementation, same values to ~1e-6.

The cache lives in ``STORE/features/<backbone-id>/``::

    features.npy      (M, F) float32
    nucleus_ids.npy   (M,) int64, the order of the rows
    meta.json         backbone id + config, feature names, sha256 of both arrays, store fingerprint

It is reused by every round while the store's ingest units are unchanged; a cache whose arrays do
not match their checksums is recomputed with a warning.

Dimensions: M nuclei, F features, B images of H×W pixels, n instances of one image, U pixels in
nuclei or rings, S segments (nuclei and rings).

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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.atomic import remove_tree, replace_dir
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
# (H, E) = max(0, sum over c of OD(v_c) * _HED_FROM_RGB[c, :2]), the two terms held as the real and
# imaginary part of a complex64: a table over (R, G) pairs (index R + 256 G, 512 KiB) and one over B,
# so two look-ups and one addition give both channels
_HE_TERMS = [_OD_LUT * _HED_FROM_RGB[c, 0] + 1j * _OD_LUT * _HED_FROM_RGB[c, 1] for c in range(3)]
_HE_LUT_RG = (_HE_TERMS[0][None, :] + _HE_TERMS[1][:, None]).astype(np.complex64).reshape(-1)
_HE_LUT_B = _HE_TERMS[2].astype(np.complex64)


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


def _hematoxylin_eosin_pixels(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`hematoxylin_eosin` of P pixels given as three (P,) uint8 channels, as two (P,) float64
    arrays (the hot path: float32 tables, so values agree with the float64 ones to ~1e-7)."""
    rg = g.astype(np.uint16)
    rg <<= 8
    rg |= r
    he = _HE_LUT_RG.take(rg)
    he += _HE_LUT_B.take(b)
    h, e = he.real.astype(np.float64), he.imag.astype(np.float64)
    np.maximum(h, 0, out=h)  # skimage clips negative concentrations to 0
    np.maximum(e, 0, out=e)
    return h, e


def handcrafted_image_features(image: np.ndarray, instances: np.ndarray, n: int, *, mpp: float) -> np.ndarray:
    """Handcrafted features of instance ids 1..n of one image, vectorised.

    Parameters
    ----------
    image
        (H, W, 3) uint8 RGB.
    instances
        (H, W) integer instance map, 0 = background, ids 1..n.
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


def _max_filter_square(labels: np.ndarray, radius: int) -> np.ndarray:
    """Maximum over the (2r+1)×(2r+1) square around every pixel of (B, H, W) ``labels``, zeros
    outside each image; equal to ``ndimage.maximum_filter(labels, size=(1, 2r+1, 2r+1),
    mode="constant")`` but by doubling windows (about 2·log2(2r+1) ``np.maximum`` passes)."""
    out = labels
    width = 2 * radius + 1
    for axis in (1, 2):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = n + 2 * radius
        padded = np.zeros(shape, out.dtype)
        padded[(slice(None),) * axis + (slice(radius, radius + n),)] = out
        win, k = padded, 1  # win[i] = max(padded[i : i + k])
        while 2 * k <= width:
            m = win.shape[axis]
            win = np.maximum(win[(slice(None),) * axis + (slice(0, m - k),)],
                             win[(slice(None),) * axis + (slice(k, m),)])
            k *= 2
        rest = width - k  # max(padded[i : i + width]) = max(win[i], win[i + rest]), rest < k
        out = np.maximum(win[(slice(None),) * axis + (slice(0, n),)],
                         win[(slice(None),) * axis + (slice(rest, rest + n),)])
    return out


#: Pixels per chunk of a batch: a chunk's per-pixel arrays then stay in the CPU cache (4 PanNuke
#: tiles per chunk ran twice as fast as 64 in ``benchmarks/bench_relabel.py``).
CHUNK_PIXELS = 1 << 18


def _raise_heap_thresholds() -> None:
    """Allocate and free one 32 MiB block (never touched).

    glibc's malloc then raises its dynamic mmap threshold to that size and its heap-trim threshold
    to twice it, so the chunks' few-MiB temporaries are recycled on the heap instead of being mapped,
    page-faulted and unmapped again for every chunk (measured on the 2-core VM: 52,000 → 5 page
    faults and 1.5-2× faster per batch). The same happens anyway once a program frees one large
    array; elsewhere (other C libraries) this is a no-op.
    """
    np.empty(24 << 20, np.uint8)


class _Segments:
    """Per-segment sums, minima and maxima of per-pixel values, with the pixels sorted by segment.

    ``seg`` (N,) gives the segment 0..S-1 of every pixel of a flattened label map, S for a pixel in
    none. Equal neighbours form runs (a row of a nucleus is one run); the R ≪ N runs are sorted by
    segment (a stable radix sort for 8/16-bit labels) and expanded into :attr:`pix`, the flat indices
    of the U labelled pixels grouped by segment, each group in raster order. Per-pixel values taken
    at :attr:`pix` are then reduced over each segment's contiguous block by one ``ufunc.reduceat``.
    """

    def __init__(self, seg: np.ndarray, nseg: int) -> None:
        self.nseg = nseg
        run_start = np.concatenate([[0], np.flatnonzero(seg[1:] != seg[:-1]) + 1])
        run_len = np.diff(np.append(run_start, len(seg)))
        run_key = seg.take(run_start)
        order = np.argsort(run_key, kind="stable")  # the unlabelled runs (key S) come last
        run_start, run_len = run_start.take(order), run_len.take(order)
        first = np.searchsorted(run_key.take(order), np.arange(nseg + 1))
        cum = np.concatenate([[0], np.cumsum(run_len)])
        #: (S + 1,) block of segment k in sorted order: ``bounds[k]:bounds[k + 1]``
        self.bounds = cum.take(first)
        nrun, npix = int(first[-1]), int(self.bounds[-1])
        #: (U,) flat pixel indices, grouped by segment
        self.pix = np.repeat(run_start[:nrun] - cum[:nrun], run_len[:nrun]) + np.arange(npix)
        count = np.diff(self.bounds)
        self.area = count.astype(np.float64)
        self.present = count > 0
        self.starts = self.bounds[:-1][self.present]
        self._n_starts: dict[int, int] = {nseg: len(self.starts)}

    def _reduce(self, ufunc: np.ufunc, values: np.ndarray, fill: float, stop: int | None = None) -> np.ndarray:
        size = self.nseg if stop is None else stop
        k = self._n_starts.get(size)
        if k is None:
            k = self._n_starts[size] = int(np.count_nonzero(self.present[:size]))
        out = np.full(size, fill, np.float64)
        if k:
            out[self.present[:size]] = ufunc.reduceat(values, self.starts[:k])
        return out

    def sum(self, values: np.ndarray, *, stop: int | None = None) -> np.ndarray:
        """Sums (0 for an empty segment) of ``values`` given in :attr:`order`; with ``stop``, only
        segments ``0..stop-1`` (``values`` then holds their pixels only)."""
        return self._reduce(np.add, values.astype(np.float64, copy=False), 0.0, stop)

    def min(self, values: np.ndarray, *, stop: int | None = None) -> np.ndarray:
        """Minima (NaN for an empty segment); see :meth:`sum`."""
        return self._reduce(np.minimum, values, np.nan, stop)

    def max(self, values: np.ndarray, *, stop: int | None = None) -> np.ndarray:
        """Maxima (NaN for an empty segment); see :meth:`sum`."""
        return self._reduce(np.maximum, values, np.nan, stop)


def handcrafted_batch_features(images: np.ndarray, instances: np.ndarray, ns: list[int] | np.ndarray, *,
                               mpp: list[float] | np.ndarray) -> list[np.ndarray]:
    """:func:`handcrafted_image_features` of B same-sized images at once.

    The batch is processed in chunks of about :data:`CHUNK_PIXELS` pixels. In a chunk every pixel
    of a nucleus or of its ring gets a segment number (nucleus or ring of image b, id i), and each
    per-nucleus statistic is a segmented ``reduceat`` over those pixels in raster order
    (:class:`_Segments`); colours come from uint8 look-up tables, gradients and boundary tests from
    neighbour look-ups, the ring from a max filter of the label map: no per-nucleus Python.

    Parameters
    ----------
    images
        (B, H, W, 3) uint8 RGB.
    instances
        (B, H, W) integer instance maps, 0 = background, ids 1..n_b.
    ns
        (B,) number of instances of each image.
    mpp
        (B,) microns per pixel of each image. The ring width in pixels is set from their median, so
        give images of one pixel size per call.

    Returns
    -------
    B arrays (n_b, F) float32.
    """
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[:3] != instances.shape:
        raise InputFormatError(None, f"images {images.shape} and instances {instances.shape} do not match")
    if images.dtype != np.uint8 or not np.issubdtype(instances.dtype, np.integer):
        raise InputFormatError(None, f"expected uint8 images and integer instances, got {images.dtype} "
                                     f"and {instances.dtype}")
    bsz, hgt, wid = instances.shape
    ns = np.asarray(ns, dtype=np.int64).reshape(-1)
    mpp_arr = np.asarray(mpp, dtype=np.float64).reshape(-1)
    if len(ns) != bsz or len(mpp_arr) != bsz:
        raise InputFormatError(None, f"{bsz} images but {len(ns)} instance counts and {len(mpp_arr)} pixel sizes")
    if bsz == 0:
        return []
    ring_px = max(1, int(round(RING_UM / float(mpp_arr[0] if (mpp_arr == mpp_arr[0]).all() else np.median(mpp_arr)))))
    per = max(1, CHUNK_PIXELS // max(hgt * wid, 1))
    _raise_heap_thresholds()
    out: list[np.ndarray] = []
    for s in range(0, bsz, per):
        out += _chunk_features(images[s:s + per], instances[s:s + per], ns[s:s + per], mpp_arr[s:s + per],
                               ring_px=ring_px, first=s)
    return out


def _chunk_features(images: np.ndarray, instances: np.ndarray, ns: np.ndarray, mpp: np.ndarray, *,
                    ring_px: int, first: int) -> list[np.ndarray]:
    """:func:`handcrafted_batch_features` of one chunk (validated shapes; ``first`` = index of its
    first image in the batch, for messages)."""
    bsz, hgt, wid = instances.shape
    hw = hgt * wid
    nf = len(FEATURE_NAMES)
    offsets = np.concatenate([[0], np.cumsum(ns)])
    total = int(offsets[-1])
    flat_ins = instances.reshape(bsz, hw)
    top, low = flat_ins.max(axis=1), flat_ins.min(axis=1)
    bad = np.flatnonzero((top > ns) | (low < 0))
    if bad.size:
        b = int(bad[0])
        raise InputFormatError(None, f"image {first + b} of the batch has instance ids outside 0..{int(ns[b])} "
                                     f"(min {int(low[b])}, max {int(top[b])})")
    if total == 0:
        return [np.zeros((0, nf), np.float32) for _ in range(bsz)]
    top_id = int(top.max())
    lab = instances.astype(np.uint8 if top_id < 1 << 8 else np.uint16 if top_id < 1 << 16 else np.int64, copy=False)

    # ring: background pixels within ring_px (Chebyshev distance) of a nucleus, given to the largest
    # id among those nuclei; segment of a pixel: nucleus i of image b -> offsets[b] + i - 1, its ring
    # -> total + offsets[b] + i - 1 (unsigned wrap-around of the -1 cancels out)
    grown = _max_filter_square(lab, ring_px)
    nseg = 2 * total
    kdt = np.uint8 if nseg < 1 << 8 else np.uint16 if nseg < 1 << 16 else np.int64
    seg = grown.astype(kdt)
    seg += kdt(total)
    np.copyto(seg, lab, where=lab != 0)
    seg += (offsets[:-1] - 1).astype(kdt)[:, None, None]
    seg[grown == 0] = nseg  # in no nucleus or ring (grown >= id inside a nucleus)
    segs = _Segments(seg.reshape(-1), nseg)
    pix = segs.pix  # all nucleus pixels first, then the rings
    nfg = int(segs.bounds[total])

    # colour statistics of nuclei and rings
    at = pix * 3  # the R, G, B bytes of each pixel
    rgb = [images.reshape(-1).take(at + c) for c in range(3)]  # 3 × (U,) uint8
    h, e = _hematoxylin_eosin_pixels(*rgb)
    chans = [rgb[0].astype(np.float64), rgb[1].astype(np.float64), rgb[2].astype(np.float64), h, e]
    sums = [segs.sum(c) for c in chans]
    sq = [segs.sum(c * c) for c in chans[:4]]
    sq.append(segs.sum(e[:nfg] * e[:nfg], stop=total))  # eosin spread: nuclei only

    # nucleus-only statistics
    fs = pix[:nfg]
    area = segs.area[:total]
    row = fs // wid
    xx = fs - row * wid
    yy = row % hgt
    yf, xf = yy.astype(np.float64), xx.astype(np.float64)  # integer sums stay exact in float64
    mom = [segs.sum(v, stop=total) for v in (yf, xf, yf * yf, xf * xf, yf * xf)]
    bbox_area = ((segs.max(yy, stop=total) - segs.min(yy, stop=total) + 1)
                 * (segs.max(xx, stop=total) - segs.min(xx, stop=total) + 1))
    # grey (sum of R, G, B = 3 × grey), its central-difference gradient (0 on the image border) and
    # 4-neighbour Laplacian (zeros outside the image), at nucleus pixels via neighbour look-ups
    grey3 = np.add(images[..., 0], images[..., 1], dtype=np.int16)
    grey3 += images[..., 2]
    g3 = grey3.reshape(-1)
    up, down = g3.take(fs - wid, mode="clip"), g3.take(fs + wid, mode="clip")
    left, right = g3.take(fs - 1, mode="clip"), g3.take(fs + 1, mode="clip")
    top_r, bot_r, left_c, right_c = yy == 0, yy == hgt - 1, xx == 0, xx == wid - 1
    gy = (down - up).astype(np.float32)
    gy[top_r | bot_r] = 0
    gx = (right - left).astype(np.float32)
    gx[left_c | right_c] = 0
    grad = np.sqrt(gy * gy + gx * gx) * np.float32(1 / 6)
    up[top_r] = 0
    down[bot_r] = 0
    left[left_c] = 0
    right[right_c] = 0
    lap = (4 * g3.take(fs) - up - down - left - right).astype(np.float32) * np.float32(1 / 3)
    # boundary pixels: a 4-neighbour with another id, or outside the image
    edge = np.ones(lab.shape, bool)
    edge[:, 1:-1, 1:-1] = False
    diff = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= diff
    edge[:, :-1] |= diff
    diff = lab[:, :, 1:] != lab[:, :, :-1]
    edge[:, :, 1:] |= diff
    edge[:, :, :-1] |= diff
    n_edge = segs.sum(edge.reshape(-1).take(fs), stop=total)
    g_sum, g_sq, lap_sq = (segs.sum(v, stop=total) for v in (grad, grad * grad, lap * lap))

    with np.errstate(invalid="ignore", divide="ignore"):
        means = [s[:total] / area for s in sums]
        stds = [np.sqrt(np.maximum(q[:total] / area - mu**2, 0)) for q, mu in zip(sq, means)]
        thr = means[3] + stds[3]
        dark = segs.sum(h[:nfg] > np.repeat(thr, segs.bounds[1:total + 1] - segs.bounds[:total]), stop=total) / area
        h_p90 = means[3] + 1.2816 * stds[3]  # Gaussian 90th percentile
        g_mu = g_sum / area
        g_sd = np.sqrt(np.maximum(g_sq / area - g_mu**2, 0))
        lap_e = lap_sq / area
        perim_px = np.maximum(n_edge * 1.12, 1.0)  # boundary pixels -> contour length
        cy, cx = mom[0] / area, mom[1] / area
        # central second moments; +1/12: the second moment of a unit pixel, so a one-pixel nucleus
        # has finite axes
        myy = mom[2] / area - cy**2 + 1 / 12
        mxx = mom[3] / area - cx**2 + 1 / 12
        mxy = mom[4] / area - cy * cx
        half_tr = (myy + mxx) / 2
        disc = np.sqrt(((myy - mxx) / 2) ** 2 + mxy**2)
        l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 1e-12)
        major, minor = 4 * np.sqrt(l1), 4 * np.sqrt(l2)

        r_area = segs.area[total:]
        has_ring = r_area > 0
        r_means = [np.where(has_ring, s[total:] / r_area, means[i]) for i, s in enumerate(sums)]
        r_stds = [np.where(has_ring, np.sqrt(np.maximum(q[total:] / r_area - (s[total:] / r_area) ** 2, 0)), 0.0)
                  for q, s in zip(sq[:4], sums[:4])]
        grey_n = (means[0] + means[1] + means[2]) / 3
        grey_r = (r_means[0] + r_means[1] + r_means[2]) / 3
        ring_full = (2 * ring_px + np.sqrt(area / np.pi) * 2) ** 2 - area

        m = mpp[np.repeat(np.arange(bsz), ns)]
        cols = [
            area * m * m, np.log(area * m * m), perim_px * m, 4 * np.pi * area / perim_px**2,
            major * m, minor * m, major / minor, np.sqrt(1 - l2 / l1), area / bbox_area,
            area / (np.pi * major * minor / 4),
            *means, *stds, g_mu, g_sd, lap_e, h_p90, dark, *r_means, *r_stds,
            means[3] - r_means[3], grey_r - grey_n, np.minimum(r_area / np.maximum(ring_full, 1), 1.0),
        ]
    out = np.stack(cols, axis=1).astype(np.float32)
    out[area == 0] = np.nan
    return [out[offsets[b]:offsets[b + 1]] for b in range(bsz)]


# -- cache ----------------------------------------------------------------------------------------
def store_fingerprint(store: Store) -> str:
    """sha256 over the store's committed ingest units (name, folder, file fingerprint, taxonomy)."""
    units = store.units()
    text = "|".join(f"{r.unit}:{r.dir}:{r.fingerprint}:{r.taxonomy_hash}" for r in units.itertuples())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_array(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cache_dir(store: Store, backbone_id: str) -> Path:
    return store.path / "features" / backbone_id


def load_cached(store: Store, backbone: Backbone) -> tuple[np.ndarray, np.ndarray] | None:
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


def save_cache(store: Store, backbone: Backbone, feats: np.ndarray, ids: np.ndarray) -> Path:
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
            "n_nuclei": len(ids), "n_features": int(feats.shape[1]),
            "features_sha256": _sha256_array(feats), "ids_sha256": _sha256_array(ids),
            "store_fingerprint": store_fingerprint(store), "ledger_head": store.ledger.head()[0],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".old-{backbone.id}-{secrets.token_hex(4)}"
            os.replace(folder, old)
        replace_dir(tmp, folder)  # fsync files and folder, rename, fsync the parent
        if old is not None:
            remove_tree(old)
    except BaseException:
        remove_tree(tmp)
        raise
    return folder


def nucleus_features(store: Store, backbone: Backbone, *, use_cache: bool = True,
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
