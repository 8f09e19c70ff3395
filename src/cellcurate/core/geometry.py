"""The one polygon convention for a nucleus mask (QuPath's): pixel (row r, column c) is the
square [c, c+1] × [r, r+1] in (x, y) image coordinates, and a polygon traces the outer edges of
the mask's pixels, holes kept. Rasterising such a polygon by pixel centres gives back the exact
mask, so the predict tables (``polygon`` column), QuPath GeoJSON export and import all describe
a nucleus by the same outline.

shapely is imported inside the functions.

>>> import numpy as np
>>> m = np.zeros((3, 3), bool); m[1, 1:3] = True
>>> mask_to_geometry(m).bounds
(1.0, 1.0, 3.0, 2.0)
>>> mask_to_polygon(m).tolist()
[[1.0, 1.0], [3.0, 1.0], [3.0, 2.0], [1.0, 2.0], [1.0, 1.0]]
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GEOMETRY_TYPES", "mask_to_geometry", "mask_to_polygon", "polygonal"]

GEOMETRY_TYPES = ("Polygon", "MultiPolygon")


def polygonal(geom: Any) -> Any:
    """The Polygon/MultiPolygon part of a shapely geometry (``None`` when it has none)."""
    import shapely

    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in GEOMETRY_TYPES:
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in GEOMETRY_TYPES]
    if not parts:
        return None
    return shapely.union_all(parts)


def mask_to_geometry(mask: np.ndarray, *, offset: tuple[int, int] = (0, 0)) -> Any:
    """Polygon (or MultiPolygon) tracing the pixel edges of a binary mask.

    Parameters
    ----------
    mask
        (h, w) bool.
    offset
        (y0, x0) added to the coordinates (the crop's place in the image).

    Returns
    -------
    shapely Polygon / MultiPolygon in (x, y) image coordinates, exterior counter-clockwise in
    (x, y) (y down), holes kept; ``None`` for an empty mask. A mask whose rows each hold one run
    (most nuclei) gets its outline traced directly (:func:`_row_convex_ring`, vertices from the
    lowest-leftmost corner), any other the union of its runs: the same polygon.
    """
    import shapely

    m = np.asarray(mask, dtype=bool)
    ring = _row_convex_ring(m, offset)
    if ring is not None:
        return shapely.Polygon(ring)
    return _union_geometry(m, offset)


def _union_geometry(m: np.ndarray, offset: tuple[int, int]) -> Any:
    """:func:`mask_to_geometry` of any boolean mask: one rectangle per horizontal run of pixels,
    unioned by shapely (``None`` when empty)."""
    import shapely

    if not m.any():
        return None
    rows, c0, c1 = _runs(m)
    y0, x0 = offset
    boxes = shapely.box(c0 + x0, rows + y0, c1 + x0, rows + 1 + y0)
    geom = shapely.union_all(boxes)
    geom = shapely.simplify(geom, 0)  # drop collinear vertices of the staircase
    geom = shapely.geometry.polygon.orient(geom, 1.0) if geom.geom_type == "Polygon" else geom
    if not geom.is_valid:
        geom = polygonal(shapely.make_valid(geom))
    return geom


def mask_to_polygon(mask: np.ndarray, *, offset: tuple[int, int] = (0, 0), tolerance: float = 0.0) -> np.ndarray:
    """Outer ring of :func:`mask_to_geometry` as a (V, 2) float64 array of (x, y), first == last.

    When the mask has several components, the ring of the largest one; holes are not part of the
    ring. ``tolerance > 0`` simplifies it (Douglas-Peucker, pixels; then it no longer
    rasterises back exactly). An empty mask gives a (0, 2) array. Vertices start at the
    lowest-leftmost corner (smallest y, then smallest x), so the output is deterministic.
    """
    import shapely

    if tolerance <= 0:
        fast = _row_convex_ring(np.asarray(mask, dtype=bool), offset)
        if fast is not None:
            return fast
    geom = _union_geometry(np.asarray(mask, dtype=bool), offset)
    if geom is None:
        return np.zeros((0, 2))
    if geom.geom_type == "MultiPolygon":
        geom = max(geom.geoms, key=lambda g: g.area)
    if tolerance > 0:
        geom = shapely.simplify(geom, tolerance)
    return _closed_from_lowest(np.asarray(geom.exterior.coords, dtype=np.float64)[:-1])


def _runs(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of pixels of a boolean mask, in row-major order: (row, first column,
    column after the last), each (k,)."""
    pad = np.zeros((m.shape[0], m.shape[1] + 2), dtype=np.int8)
    pad[:, 1:-1] = m
    d = np.diff(pad, axis=1)
    rows, c0 = np.nonzero(d == 1)  # np.nonzero is row-major: sorted by row, then column
    _, c1 = np.nonzero(d == -1)
    return rows, c0, c1


def _closed_from_lowest(ring: np.ndarray) -> np.ndarray:
    """An open (V, 2) ring of (x, y) started at its lowest-leftmost vertex (smallest y, then x) and
    closed (first == last)."""
    start = int(np.lexsort((ring[:, 0], ring[:, 1]))[0])
    return np.concatenate([ring[start:], ring[:start + 1]])


def _row_convex_ring(m: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
    """:func:`mask_to_polygon`'s ring, built directly, for a mask whose rows each hold one run of
    pixels, rows contiguous and each run sharing an edge with the next (most nuclei): right edges
    down, left edges up, collinear vertices dropped, counter-clockwise in (x, y), the same start.
    None for any other mask (the caller unions the runs with shapely); the two agree exactly
    (``test_row_convex_rings_equal_the_union``)."""
    if not m.any():
        return None
    rs, ai, bi = _runs(m)
    if len(rs) > 1 and (np.any(np.diff(rs) != 1) or np.any(ai[1:] >= bi[:-1]) or np.any(ai[:-1] >= bi[1:])):
        return None  # two runs in a row, a gap between rows, or rows touching only at a corner
    y0, x0 = offset
    n = len(rs)
    r = rs.astype(np.float64) + y0
    a = ai.astype(np.float64) + x0
    b = bi.astype(np.float64) + x0
    ring = np.empty((4 * n, 2))
    ring[0:2 * n:2, 0] = b  # down the right side: (b, r), (b, r + 1) per row
    ring[1:2 * n:2, 0] = b
    ring[0:2 * n:2, 1] = r
    ring[1:2 * n:2, 1] = r + 1
    ring[2 * n::2, 0] = a[::-1]  # up the left side: (a, r + 1), (a, r) per row, bottom first
    ring[2 * n + 1::2, 0] = a[::-1]
    ring[2 * n::2, 1] = r[::-1] + 1
    ring[2 * n + 1::2, 1] = r[::-1]
    # drop repeated vertices, then those between two collinear edges (all edges are axis-parallel);
    # the right side's vertices alternate vertical / horizontal moves, so no vertex repeats but
    # where two rows' runs end in the same column (and likewise on the left)
    prev = np.empty_like(ring)
    prev[1:], prev[0] = ring[:-1], ring[-1]
    ring = ring[(ring[:, 0] != prev[:, 0]) | (ring[:, 1] != prev[:, 1])]
    prev = np.empty_like(ring)
    nxt = np.empty_like(ring)
    prev[1:], prev[0] = ring[:-1], ring[-1]
    nxt[:-1], nxt[-1] = ring[1:], ring[0]
    straight = (((prev[:, 0] == ring[:, 0]) & (ring[:, 0] == nxt[:, 0]))
                | ((prev[:, 1] == ring[:, 1]) & (ring[:, 1] == nxt[:, 1])))
    ring = ring[~straight]
    x, y = ring[:, 0], ring[:, 1]
    if float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1]) < 0:
        ring = ring[::-1]
    return _closed_from_lowest(ring)
