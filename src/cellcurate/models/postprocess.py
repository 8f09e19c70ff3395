"""Turn a model's dense outputs into nucleus instances, classes and polygons.

Dimensions: H×W pixels, K type channels (channel 0 = background, 1..K-1 = the unified
classes), n instances in one image (ids 1..n, contiguous).

The pipeline follows HoVer-Net's idea (Graham et al. 2019) in our own formulation:

1. foreground ``fg = np_prob >= threshold``, minus connected components under ``min_area`` px;
2. boundary energy ``E = max(relu(-d/dx h), relu(-d/dy v))`` from Sobel derivatives of the
   (lightly smoothed) h/v maps, divided by 8 (the Sobel response of a sharp +1 → -1 step, i.e.
   the border between two touching nuclei) and clipped to [0, 1]. Inside a nucleus h rises with
   x and v with y, so only a *fall* marks a border;
3. markers = ``fg & (E < edge_threshold)``, opened, labelled, small markers removed; a
   foreground component left without a marker becomes its own marker (nothing is lost);
4. distance surface ``(1 - E) * fg`` (smoothed); watershed of its negative from the markers,
   restricted to ``fg``; instances under ``min_area`` px removed; ids relabelled 1..n.

Models with the Cellpose flow head (``meta["head"] == "flow"``) are post-processed by flow
following instead (:func:`postprocess_outputs`, :mod:`cellcurate.models.flows`).

Per-instance class (:func:`classify_instances`): majority vote of the per-pixel argmax type over
the instance's pixels, background votes excluded (ties go to the lower class id); an instance
whose every pixel voted background gets the foreground class with the highest mean probability.
Per-instance probabilities: mean softmax of the type channels over the instance's pixels.

Coordinates (:func:`instance_table`, :func:`mask_to_polygon`): x = column, y = row, and pixel
(row r, column c) covers the square [c, c+1) × [r, r+1), as in QuPath; so a pixel's centre is
(c + 0.5, r + 0.5). Polygons trace the pixel edges (:mod:`cellcurate.core.geometry`, the same
outline as the QuPath GeoJSON export), so they rasterise back to the exact mask.

>>> import numpy as np
>>> inst = np.zeros((6, 6), np.int32); inst[1:4, 1:4] = 1
>>> tp = np.zeros((3, 6, 6), np.float32); tp[0] = 1; tp[:, 1:4, 1:4] = [[[0.1]], [[0.2]], [[0.7]]]
>>> classes, probs = classify_instances(inst, tp)
>>> classes.tolist(), probs.astype(float).round(2).tolist()
([2], [[0.1, 0.2, 0.7]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import morphology, segmentation

from ..core.geometry import mask_to_polygon as _core_mask_to_polygon
from ..errors import ConfigError

if TYPE_CHECKING:
    from .flows import FlowConfig

#: Sobel response of a sharp fall by 2 (an h/v map jumping from +1 to -1 between two pixels).
_STEP_RESPONSE = 8.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Knobs of :func:`instances_from_maps`; sizes in pixels at the model's resolution."""

    threshold: float = 0.5
    edge_threshold: float = 0.4
    min_area: int = 10
    min_marker_area: int = 5
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"postprocess threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 < self.edge_threshold <= 1.0:
            raise ConfigError(f"postprocess edge_threshold must be in (0, 1], got {self.edge_threshold}")
        if self.min_area < 0 or self.min_marker_area < 0:
            raise ConfigError(
                f"postprocess min_area and min_marker_area must be >= 0, got {self.min_area}, {self.min_marker_area}"
            )
        if self.sigma < 0:
            raise ConfigError(f"postprocess sigma must be >= 0, got {self.sigma}")


@dataclass
class Postprocessed:
    """Result of :func:`postprocess` for one image.

    Attributes
    ----------
    instances
        (H, W) int32, 0 = background, 1..n.
    classes
        (n,) int64 class id (1..K-1) of instance ``i + 1``.
    probs
        (n, K) float32 mean softmax over the instance's pixels (rows sum to 1).
    """

    instances: np.ndarray
    classes: np.ndarray
    probs: np.ndarray

    @property
    def n(self) -> int:
        return int(self.classes.shape[0])

    def class_map(self) -> np.ndarray:
        """(H, W) uint8 pixel class map (0 background)."""
        lut = np.concatenate([[0], self.classes]).astype(np.uint8)
        return lut[self.instances]


def boundary_energy(hv: np.ndarray, *, sigma: float = 0.5) -> np.ndarray:
    """Where the h/v maps fall: high on borders between touching nuclei.

    Parameters
    ----------
    hv
        (2, H, W) float, channel 0 = horizontal (x) map, channel 1 = vertical (y) map, in [-1, 1].
    sigma
        Gaussian smoothing (pixels) before the Sobel derivative; 0 for none.

    Returns
    -------
    (H, W) float32 in [0, 1].
    """
    hv = np.asarray(hv, dtype=np.float32)
    if hv.ndim != 3 or hv.shape[0] != 2:
        raise ConfigError(f"hv must be (2, H, W), got {hv.shape}")
    h, v = hv[0], hv[1]
    if sigma > 0:
        h = ndi.gaussian_filter(h, sigma)
        v = ndi.gaussian_filter(v, sigma)
    dh = ndi.sobel(h, axis=1, mode="nearest")
    dv = ndi.sobel(v, axis=0, mode="nearest")
    energy = np.maximum(np.maximum(-dh, 0.0), np.maximum(-dv, 0.0)) / _STEP_RESPONSE
    return np.clip(energy, 0.0, 1.0).astype(np.float32)


def instances_from_maps(
    np_prob: np.ndarray,
    hv: np.ndarray,
    *,
    config: PostprocessConfig | None = None,
) -> np.ndarray:
    """Split the foreground into nucleus instances with a marker-controlled watershed.

    Parameters
    ----------
    np_prob
        (H, W) float, probability that a pixel belongs to a nucleus.
    hv
        (2, H, W) float, horizontal and vertical distance maps in [-1, 1].
    config
        Thresholds and sizes; :class:`PostprocessConfig` defaults when ``None``.

    Returns
    -------
    (H, W) int32 instance map, 0 = background, ids 1..n contiguous.
    """
    cfg = config or PostprocessConfig()
    np_prob = np.asarray(np_prob, dtype=np.float32)
    if np_prob.ndim != 2 or np.shape(hv)[1:] != np_prob.shape:
        raise ConfigError(f"np_prob must be (H, W) and hv (2, H, W); got {np_prob.shape} and {np.shape(hv)}")
    fg = np_prob >= cfg.threshold
    fg = _drop_small(fg, cfg.min_area)
    if not fg.any():
        return np.zeros(np_prob.shape, np.int32)
    energy = boundary_energy(hv, sigma=cfg.sigma)
    energy[~fg] = 1.0

    seeds = fg & (energy < cfg.edge_threshold)
    seeds = ndi.binary_opening(seeds, structure=morphology.disk(1))
    markers, _ = ndi.label(_drop_small(seeds, cfg.min_marker_area))
    # foreground components without any marker become their own marker
    comps, n_comps = ndi.label(fg)
    has_marker = np.zeros(n_comps + 1, bool)
    has_marker[comps[markers > 0]] = True
    orphan = ~has_marker[comps] & fg
    if orphan.any():
        extra, _ = ndi.label(orphan)
        markers = np.where(extra > 0, extra + markers.max(), markers)

    surface = (1.0 - energy) * fg
    if cfg.sigma > 0:
        surface = ndi.gaussian_filter(surface, cfg.sigma)
    labels = segmentation.watershed(-surface, markers, mask=fg)
    labels = _drop_small_labels(labels, cfg.min_area)
    relabelled, _, _ = segmentation.relabel_sequential(labels)
    return relabelled.astype(np.int32)


def majority_vote(instances: np.ndarray, labels: np.ndarray, *, n_labels: int, exclude: Sequence[int] = (0,)) -> np.ndarray:
    """Most frequent label over each instance's pixels.

    Parameters
    ----------
    instances
        (H, W) int, 0 = background, ids 1..n (need not be contiguous).
    labels
        (H, W) int in ``0..n_labels-1``; other values (e.g. 255 = ignore) never vote.
    n_labels
        Number of label values that may vote.
    exclude
        Label values that never vote (default: 0, background).

    Returns
    -------
    (max_id + 1,) int64: entry ``i`` is the winning label of instance ``i`` (ties to the lower
    label), 0 where instance ``i`` has no voting pixel or does not exist; entry 0 is 0.
    """
    inst = np.asarray(instances).ravel().astype(np.int64)
    lab = np.asarray(labels).ravel().astype(np.int64)
    if inst.shape != lab.shape:
        raise ConfigError(f"instances and labels differ in shape: {np.shape(instances)} != {np.shape(labels)}")
    n = int(inst.max(initial=0))
    keep = (inst > 0) & (lab >= 0) & (lab < n_labels)
    for e in exclude:
        keep &= lab != e
    votes = np.bincount(inst[keep] * n_labels + lab[keep], minlength=(n + 1) * n_labels).reshape(n + 1, n_labels)
    winner = votes.argmax(axis=1)
    winner[votes.max(axis=1) == 0] = 0
    return winner.astype(np.int64)


def classify_instances(instances: np.ndarray, tp_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class and class probabilities of every instance.

    Parameters
    ----------
    instances
        (H, W) int, ids 1..n contiguous.
    tp_prob
        (K, H, W) float, per-pixel softmax over the type channels (channel 0 = background).

    Returns
    -------
    classes
        (n,) int64 in 1..K-1.
    probs
        (n, K) float32, mean of ``tp_prob`` over each instance's pixels.
    """
    tp_prob = np.asarray(tp_prob, dtype=np.float32)
    inst = np.asarray(instances)
    if tp_prob.ndim != 3 or tp_prob.shape[1:] != inst.shape:
        raise ConfigError(f"tp_prob must be (K, H, W) with H, W = {inst.shape}, got {tp_prob.shape}")
    k = tp_prob.shape[0]
    n = int(inst.max(initial=0))
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, k), np.float32)
    flat = inst.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    if (area == 0).any():
        raise ConfigError(f"instance ids must be contiguous 1..{n}; missing {np.flatnonzero(area == 0)[:5] + 1}")
    sums = np.stack([np.bincount(flat, weights=tp_prob[c].ravel(), minlength=n + 1)[1:] for c in range(k)], axis=1)
    probs = (sums / area[:, None]).astype(np.float32)
    classes = majority_vote(inst, tp_prob.argmax(axis=0), n_labels=k)[1:]
    fallback = classes == 0
    if fallback.any():
        classes[fallback] = 1 + probs[fallback, 1:].argmax(axis=1)
    return classes, probs


def postprocess(
    np_prob: np.ndarray,
    hv: np.ndarray,
    tp_prob: np.ndarray,
    *,
    config: PostprocessConfig | None = None,
) -> Postprocessed:
    """Instances, classes and probabilities of one image from its dense maps.

    Parameters
    ----------
    np_prob
        (H, W) float nucleus probability.
    hv
        (2, H, W) float h/v maps.
    tp_prob
        (K, H, W) float type softmax.
    """
    instances = instances_from_maps(np_prob, hv, config=config)
    classes, probs = classify_instances(instances, tp_prob)
    return Postprocessed(instances=instances, classes=classes, probs=probs)


def postprocess_outputs(
    np_prob: np.ndarray,
    hv: np.ndarray,
    tp_prob: np.ndarray,
    *,
    head: str = "hover",
    config: PostprocessConfig | FlowConfig | None = None,
) -> Postprocessed:
    """:func:`postprocess` for a model's ``head`` (``model.meta["head"]``, default ``"hover"``).

    ``"hover"``: the watershed of this module on the distance maps ``hv``; ``"flow"``: ``hv`` holds
    Cellpose flows, followed by :func:`cellcurate.models.flows.instances_from_flows` (a
    :class:`PostprocessConfig` passes its ``threshold`` and ``min_area`` on). Classes and
    probabilities are the same per-instance vote either way.
    """
    if head == "hover":
        if config is not None and not isinstance(config, PostprocessConfig):
            raise ConfigError(f"a HoVer head takes a PostprocessConfig, got {type(config).__name__}")
        return postprocess(np_prob, hv, tp_prob, config=config)
    if head != "flow":
        raise ConfigError(f"unknown model head {head!r}; expected 'hover' or 'flow'")
    from .flows import FlowConfig, instances_from_flows

    if isinstance(config, PostprocessConfig):
        config = FlowConfig(threshold=config.threshold, min_area=config.min_area)
    instances = instances_from_flows(np_prob, hv, config=config)
    classes, probs = classify_instances(instances, tp_prob)
    return Postprocessed(instances=instances, classes=classes, probs=probs)


def mask_to_polygon(mask: np.ndarray, *, offset: tuple[int, int] = (0, 0), tolerance: float = 0.0) -> np.ndarray:
    """Outer boundary of a binary mask as a closed polygon, in the project's one convention
    (:func:`cellcurate.core.geometry.mask_to_polygon`: pixel edges, as the QuPath GeoJSON export).

    Parameters
    ----------
    mask
        (h, w) bool; when it has several components, the largest one's boundary is returned.
    offset
        (row, column) of ``mask[0, 0]`` in the full image.
    tolerance
        Simplification tolerance in pixels (0, the default, keeps the exact pixel-edge outline).

    Returns
    -------
    (V, 2) float64 vertices (x, y), first == last; (0, 2) for an empty mask.
    """
    return _core_mask_to_polygon(mask, offset=offset, tolerance=tolerance)


def instance_polygons(instances: np.ndarray, *, tolerance: float = 0.0) -> list[np.ndarray]:
    """:func:`mask_to_polygon` of every instance 1..n (loop over instances, not pixels).

    Returns a list of n (V, 2) arrays; an id absent from the map gives a (0, 2) array.
    """
    inst = np.asarray(instances)
    n = int(inst.max(initial=0))
    polygons: list[np.ndarray] = []
    for i, box in enumerate(ndi.find_objects(inst, max_label=n), start=1):
        if box is None:
            polygons.append(np.zeros((0, 2)))
            continue
        polygons.append(mask_to_polygon(inst[box] == i, offset=(box[0].start, box[1].start), tolerance=tolerance))
    return polygons


def instance_table(
    instances: np.ndarray,
    classes: np.ndarray,
    probs: np.ndarray,
    *,
    class_names: Sequence[str],
    with_polygons: bool = True,
) -> pd.DataFrame:
    """One row per nucleus: id, class, probabilities, centroid, area and polygon.

    Parameters
    ----------
    instances
        (H, W) int, ids 1..n contiguous.
    classes
        (n,) int class ids 1..K-1.
    probs
        (n, K) float mean softmax (channel 0 = background).
    class_names
        K-1 names of classes 1..K-1.

    Returns
    -------
    DataFrame with columns ``instance_id, class_id, class_name, prob_<name>`` (K-1 columns: the
    foreground probabilities renormalised to sum to 1), ``nucleus_prob`` (1 - mean background
    probability), ``centroid_x, centroid_y, area`` and, with ``with_polygons``, ``polygon``
    ((V, 2) arrays, x/y).
    """
    inst = np.asarray(instances)
    classes = np.asarray(classes, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = classes.shape[0]
    if probs.shape != (n, len(class_names) + 1):
        raise ConfigError(
            f"probs must be (n, K) = ({n}, {len(class_names) + 1}) for {len(class_names)} class names, got {probs.shape}"
        )
    if int(inst.max(initial=0)) != n:
        raise ConfigError(f"instance map holds ids up to {int(inst.max(initial=0))} but {n} classes were given")
    rows, cols = np.indices(inst.shape)
    flat = inst.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:]
    safe = np.maximum(area, 1)
    cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:] / safe + 0.5
    cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:] / safe + 0.5
    fg = probs[:, 1:]
    fg_norm = fg / np.maximum(fg.sum(axis=1, keepdims=True), 1e-12)
    names = np.asarray(list(class_names), dtype=object)
    table: dict[str, object] = {
        "instance_id": np.arange(1, n + 1, dtype=np.int32),
        "class_id": classes.astype(np.int16),
        "class_name": names[classes - 1] if n else np.zeros(0, object),
    }
    for j, name in enumerate(class_names):
        table[f"prob_{name}"] = fg_norm[:, j].astype(np.float32)
    table["nucleus_prob"] = (1.0 - probs[:, 0]).astype(np.float32)
    table["centroid_x"] = cx
    table["centroid_y"] = cy
    table["area"] = area.astype(np.int64)
    if with_polygons:
        table["polygon"] = pd.Series(instance_polygons(inst), dtype=object) if n else pd.Series([], dtype=object)
    return pd.DataFrame(table)


def _drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _drop_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    if min_area <= 1:
        return labels
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return np.where(keep[labels], labels, 0)
