"""Post-processing: watershed instances, majority-vote classes, probabilities, polygons."""

from __future__ import annotations

import numpy as np
import pytest

from cellcurate.errors import ConfigError
from cellcurate.models.postprocess import (
    PostprocessConfig,
    boundary_energy,
    classify_instances,
    instance_polygons,
    instance_table,
    instances_from_maps,
    majority_vote,
    mask_to_polygon,
    postprocess,
)
from cellcurate.models.targets import hover_targets

NAMES = ["Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil"]


def disks(shape, specs):
    """Instance map with disks (cy, cx, r); later disks do not overwrite earlier ones."""
    rows, cols = np.indices(shape)
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(specs, start=1):
        inst[((rows - cy) ** 2 + (cols - cx) ** 2 <= r * r) & (inst == 0)] = i
    return inst


def ideal_hv(inst):
    return hover_targets(inst, (inst > 0).astype(np.uint8))["hv"]


def best_iou(a, b):
    """For every instance of a, the best IoU with an instance of b."""
    out = []
    for i in range(1, a.max() + 1):
        m = a == i
        ids, counts = np.unique(b[m], return_counts=True)
        best = 0.0
        for j, c in zip(ids, counts):
            if j:
                best = max(best, c / np.logical_or(m, b == j).sum())
        out.append(best)
    return np.array(out)


# -- exact small cases -------------------------------------------------------------------------


def test_majority_vote_exact():
    inst = np.array([[1, 1, 1, 2, 2, 0, 3]])
    lab = np.array([[2, 2, 0, 1, 3, 5, 0]])
    # instance 1: votes 2,2 (0 excluded) -> 2; instance 2: tie 1 vs 3 -> lower = 1; 3: only background -> 0
    assert majority_vote(inst, lab, n_labels=8).tolist() == [0, 2, 1, 0]


def test_majority_vote_ignores_out_of_range_labels():
    inst = np.array([[1, 1, 1]])
    lab = np.array([[255, 255, 4]])
    assert majority_vote(inst, lab, n_labels=8).tolist() == [0, 4]


def test_classify_instances_exact():
    inst = np.array([[1, 1, 2, 2, 0]])
    tp = np.zeros((3, 1, 5), np.float32)
    # instance 1: pixel votes 1 and 2, probs tie-broken by lower id; instance 2: all background
    tp[:, 0, 0] = [0.2, 0.5, 0.3]
    tp[:, 0, 1] = [0.2, 0.3, 0.5]
    tp[:, 0, 2] = [0.6, 0.1, 0.3]
    tp[:, 0, 3] = [0.8, 0.0, 0.2]
    tp[:, 0, 4] = [1.0, 0.0, 0.0]
    classes, probs = classify_instances(inst, tp)
    assert classes.tolist() == [1, 2]  # 2: no foreground vote -> highest mean fg prob (0.25 vs 0.05)
    np.testing.assert_allclose(probs, [[0.2, 0.4, 0.4], [0.7, 0.05, 0.25]], atol=1e-6)


def test_classify_instances_empty():
    classes, probs = classify_instances(np.zeros((4, 4), np.int32), np.ones((8, 4, 4)) / 8)
    assert classes.shape == (0,) and probs.shape == (0, 8)


def test_classify_rejects_gaps_in_ids():
    inst = np.array([[1, 3]])
    with pytest.raises(ConfigError, match="contiguous"):
        classify_instances(inst, np.ones((2, 1, 2)) / 2)


def test_mask_to_polygon_square_in_pixel_edge_coordinates():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 2:5] = True  # rows 1-2, columns 2-4
    poly = mask_to_polygon(mask, offset=(10, 20), tolerance=0)
    assert np.array_equal(poly[0], poly[-1])
    # level-0.5 contour passes through edge midpoints: x in [22, 25], y in [11, 13]
    assert poly[:, 0].min() == pytest.approx(22.0) and poly[:, 0].max() == pytest.approx(25.0)
    assert poly[:, 1].min() == pytest.approx(11.0) and poly[:, 1].max() == pytest.approx(13.0)
    assert mask_to_polygon(np.zeros((3, 3), bool)).shape == (0, 2)


def test_polygon_area_close_to_pixel_area():
    from shapely.geometry import Polygon

    inst = disks((64, 64), [(20, 20, 9), (45, 40, 6)])
    polys = instance_polygons(inst)
    for i, poly in enumerate(polys, start=1):
        area = Polygon(poly).area
        # the 0.5-level contour cuts the corners of the pixel squares: slightly less area
        assert 0.85 * (inst == i).sum() < area <= (inst == i).sum()


def test_instance_table_columns_and_values():
    inst = np.zeros((8, 8), np.int32)
    inst[0:2, 0:2] = 1  # 4 px, centroid (1, 1) in pixel-edge coordinates
    inst[4:8, 4:6] = 2  # 8 px, centroid x 5, y 6
    probs = np.zeros((2, 8))
    probs[0, [0, 1, 2]] = [0.5, 0.25, 0.25]
    probs[1, [0, 7]] = [0.2, 0.8]
    table = instance_table(inst, np.array([1, 7]), probs, class_names=NAMES)
    assert table["instance_id"].tolist() == [1, 2]
    assert table["class_name"].tolist() == ["Neoplastic", "Neutrophil"]
    assert table["area"].tolist() == [4, 8]
    assert table[["centroid_x", "centroid_y"]].to_numpy().tolist() == [[1.0, 1.0], [5.0, 6.0]]
    assert table["prob_Neoplastic"].tolist() == [0.5, 0.0]
    assert table["prob_Lymphocyte"].tolist() == [0.5, 0.0]
    assert table["prob_Neutrophil"].tolist() == [0.0, 1.0]
    assert table["nucleus_prob"].tolist() == pytest.approx([0.5, 0.8])
    assert len(table["polygon"][1]) >= 4


def test_instance_table_empty_image():
    table = instance_table(np.zeros((4, 4), np.int32), np.zeros(0, int), np.zeros((0, 8)), class_names=NAMES)
    assert len(table) == 0 and "polygon" in table


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.0}, "threshold"),
        ({"edge_threshold": 0.0}, "edge_threshold"),
        ({"min_area": -1}, "min_area"),
        ({"sigma": -0.1}, "sigma"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PostprocessConfig(**kwargs)


def test_instances_from_maps_rejects_shape_mismatch():
    with pytest.raises(ConfigError, match="np_prob"):
        instances_from_maps(np.zeros((4, 4)), np.zeros((2, 4, 5)))


# -- invariants on synthetic maps ---------------------------------------------------------------


def test_boundary_energy_marks_the_border_between_touching_nuclei():
    inst = disks((40, 60), [(20, 20, 10), (20, 39, 10)])
    energy = boundary_energy(ideal_hv(inst))
    assert energy[20, 29:31].max() > 0.6  # the shared border
    assert energy[20, 15:25].max() < 0.1  # the inside of nucleus 1
    assert energy.min() >= 0 and energy.max() <= 1


def test_touching_nuclei_are_split_and_separate_ones_kept():
    inst = disks((96, 96), [(30, 30, 10), (30, 49, 10), (70, 70, 8), (75, 20, 6), (52, 30, 8)])
    np_prob = (inst > 0).astype(np.float32)
    out = instances_from_maps(np_prob, ideal_hv(inst))
    assert out.max() == inst.max()
    assert best_iou(inst, out).min() > 0.9
    assert ((out > 0) == (inst > 0)).all()  # the watershed never leaves the foreground


def test_small_objects_removed_and_ids_contiguous():
    inst = disks((64, 64), [(20, 20, 8), (50, 50, 1), (40, 15, 7)])  # a 5-px speck in between
    out = instances_from_maps((inst > 0).astype(np.float32), ideal_hv(inst), config=PostprocessConfig(min_area=10))
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert out[50, 50] == 0


def test_no_foreground_gives_empty_map():
    out = instances_from_maps(np.full((32, 32), 0.2, np.float32), np.zeros((2, 32, 32), np.float32))
    assert out.dtype == np.int32 and out.max() == 0


def test_component_without_marker_is_kept():
    # a flat hv map with strong falls everywhere gives no marker; the component must survive
    np_prob = np.zeros((32, 32), np.float32)
    np_prob[8:20, 8:20] = 1
    hv = np.zeros((2, 32, 32), np.float32)
    hv[0, :, ::2] = 1.0  # saw-tooth: energy high everywhere
    hv[1, ::2, :] = 1.0
    out = instances_from_maps(np_prob, hv)
    assert out.max() == 1 and (out > 0).sum() == 144


def test_postprocess_end_to_end_classes():
    inst = disks((64, 64), [(20, 20, 8), (45, 45, 8)])
    tp = np.zeros((8, 64, 64), np.float32)
    tp[0] = 1.0
    tp[:, inst == 1] = np.eye(8)[3][:, None]
    tp[:, inst == 2] = (0.3 * np.eye(8)[6] + 0.7 * np.eye(8)[2])[:, None]
    res = postprocess((inst > 0).astype(np.float32), ideal_hv(inst), tp)
    order = [res.instances[20, 20], res.instances[45, 45]]
    assert res.classes[np.array(order) - 1].tolist() == [3, 2]
    np.testing.assert_allclose(res.probs[order[1] - 1][[2, 6]], [0.7, 0.3], atol=1e-6)
    assert set(np.unique(res.class_map()).tolist()) == {0, 2, 3}


def test_predict_polygon_and_geojson_geometry_are_the_same_outline():
    """Issue 10: one polygon convention for a nucleus (parquet ``polygon`` vs QuPath GeoJSON)."""
    from shapely.geometry import Polygon

    from cellcurate.curation.qupath import geometry_mask, mask_to_geometry

    yy, xx = np.mgrid[:20, :20]
    mask = (yy - 9) ** 2 + (xx - 10) ** 2 <= 30
    ring = mask_to_polygon(mask, offset=(5, 7))
    geom = mask_to_geometry(mask, offset=(5, 7))
    assert Polygon(ring).equals(geom)  # same outline, vertex for vertex up to the start point
    assert Polygon(ring).area == mask.sum()
    back = geometry_mask(Polygon(ring), (40, 40), window=(5, 7, 25, 27))
    assert np.array_equal(back, mask)
