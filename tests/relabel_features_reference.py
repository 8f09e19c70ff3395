"""The first implementation of the handcrafted features, kept as the reference for
``tests/test_relabel_features.py`` (values must agree) and as the speed baseline of
``benchmarks/bench_relabel.py`` (loaded there by file path).

Dimensions: B images, H×W pixels, P nucleus pixels, n instances.
"""

from __future__ import annotations

import numpy as np

from cellcurate.relabel.features import FEATURE_NAMES, RING_UM, hematoxylin_eosin


def _per_nucleus_means(labels: np.ndarray, columns: list[np.ndarray], area: np.ndarray) -> np.ndarray:
    """(n, C) per-nucleus means of C per-pixel columns (P,); ``labels`` (P,) int64 gives each pixel's nucleus."""
    n = len(area)
    return np.stack([np.bincount(labels, weights=col, minlength=n) for col in columns], axis=1) / area[:, None]


def reference_batch_features(images: np.ndarray, instances: np.ndarray, ns: list[int] | np.ndarray, *,
                               mpp: list[float] | np.ndarray) -> list[np.ndarray]:
    """The first implementation of ``handcrafted_batch_features`` (one pass over the whole batch).

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
