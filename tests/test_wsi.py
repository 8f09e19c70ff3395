"""The slide path: reading, tissue, chunk planning, stitching, outputs, resume, errors, cohorts.

Slides are pyramidal TIFFs written with tifffile (:func:`cellcurate.models.slide.write_pyramid`);
models are oracles that read nuclei encoded in the pixels (tests/wsi_synth.py), so the expected
nuclei are known exactly.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import torch
from click.testing import CliRunner
from wsi_synth import ContextOracle, oracle_scene, tissue_slide

from cellcurate.curation.qupath import geometry_mask, mask_to_geometry
from cellcurate.errors import InputFormatError, ModelError
from cellcurate.models.export import export_torchscript
from cellcurate.models.predict import infer_tiled, predict_image
from cellcurate.models.slide import is_slide, open_slide, write_pyramid
from cellcurate.models.tissue import TissueMap, detect_tissue
from cellcurate.models.wsi import SlideOptions, plan_chunks, predict_slide

CLI = [sys.executable, "-m", "cellcurate.cli.main"]


@pytest.fixture(scope="module")
def scene():
    return oracle_scene((1100, 1300), 0)


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory):
    return export_torchscript(ContextOracle(), tmp_path_factory.mktemp("m") / "oracle.pt")


@pytest.fixture(scope="module")
def scene_slide(scene, tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "scene.tif"
    write_pyramid(path, scene[0], mpp=0.25)
    return path


def nuclei_table(path):
    t = pq.read_table(path).to_pandas()
    t["geometry"] = shapely.from_wkb(t["polygon"])
    return t


# -- planning ------------------------------------------------------------------------------------


def test_chunk_cores_partition_the_region_at_the_middle_of_the_overlaps():
    chunks, (th, tw) = plan_chunks((500, 300), tile=256, overlap=64, chunk_tiles=1)
    # tile rows start at 0, 192, 244 (last flush); columns at 0, 44
    assert (th, tw) == (256, 256)
    assert [c.window for c in chunks] == [(0, 0, 256, 256), (0, 44, 256, 300), (192, 0, 448, 256),
                                          (192, 44, 448, 300), (244, 0, 500, 256), (244, 44, 500, 300)]
    # boundaries: (0+256+192)//2 = 224, (192+256+244)//2 = 346; (0+256+44)//2 = 150
    assert [c.core for c in chunks] == [(0, 0, 224, 150), (0, 150, 224, 300), (224, 0, 346, 150),
                                        (224, 150, 346, 300), (346, 0, 500, 150), (346, 150, 500, 300)]
    two, _ = plan_chunks((500, 300), tile=256, overlap=64, chunk_tiles=2)
    assert [c.core for c in two] == [(0, 0, 346, 300), (346, 0, 500, 300)] and len(two[0].tiles) == 4


def test_chunk_cores_lie_half_an_overlap_inside_their_windows():
    chunks, _ = plan_chunks((1000, 1700), tile=128, overlap=32, chunk_tiles=3)
    cover = np.zeros((1000, 1700), np.int32)
    for c in chunks:
        y0, x0, y1, x1 = c.core
        cover[y0:y1, x0:x1] += 1
        wy0, wx0, wy1, wx1 = c.window
        assert (y0 == 0 or y0 - wy0 >= 16) and (x0 == 0 or x0 - wx0 >= 16)
        assert (y1 == 1000 or wy1 - y1 >= 16) and (x1 == 1700 or wx1 - x1 >= 16)
    assert (cover == 1).all()


def test_tiles_off_the_tissue_are_not_planned():
    chunks, _ = plan_chunks((512, 512), tile=128, overlap=0, chunk_tiles=2, touches=lambda y0, x0, y1, x1: x0 < 128)
    assert [t for c in chunks for t in c.tiles] == [(0, 0), (128, 0), (256, 0), (384, 0)]


@pytest.mark.parametrize("kwargs, match", [({"tile": 100}, "multiple of 32"), ({"overlap": 200}, "overlap"),
                                           ({"overlap": 33}, "even"), ({"chunk_tiles": 0}, "chunk_tiles")])
def test_slide_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlideOptions(**kwargs)


# -- reading -------------------------------------------------------------------------------------


def test_pyramid_levels_pixel_size_and_lazy_reads(tmp_path, scene):
    image = scene[0][:600, :700]
    write_pyramid(tmp_path / "a.tif", image, mpp=0.5)
    assert is_slide(tmp_path / "a.tif")
    with open_slide(tmp_path / "a.tif") as s:
        assert s.dimensions == (700, 600) and s.mpp == pytest.approx(0.5)
        assert s.level_dimensions == [(700, 600), (350, 300), (175, 150)]
        assert s.best_level(1.0) == 0 and s.best_level(0.5) == 1 and s.best_level(0.26) == 1
        assert (s.read_model_region(100, 50, 300, 200, model_mpp=0.5) == image[50:250, 100:400]).all()
        # resampled reads: two halves equal the read of their union
        whole = s.read_model_region(0, 0, 800, 600, model_mpp=0.25)
        halves = np.concatenate([s.read_model_region(0, 0, 400, 600, model_mpp=0.25),
                                 s.read_model_region(400, 0, 400, 600, model_mpp=0.25)], axis=1)
        assert whole.shape == (600, 800, 3) and (whole == halves).all()
        # outside the slide reads white
        assert (s.read_level(690, 590, 20, 20, 0)[10:, :] == 255).all()
    with open_slide(tmp_path / "a.tif", mpp=0.3) as s:
        assert s.mpp == 0.3
    # a slide without a coarse level: the thumbnail is made of block means, never of the whole level
    write_pyramid(tmp_path / "flat.tif", image, mpp=0.5, levels=1)
    with open_slide(tmp_path / "flat.tif") as s:
        thumb, down = s.thumbnail(100)
    assert thumb.shape == (86, 100, 3) and down == pytest.approx(7.0)  # 7-px blocks
    np.testing.assert_allclose(thumb[10, 10], image[70:77, 70:77].reshape(-1, 3).mean(0), atol=0.51)


def test_bad_slides_are_one_line_errors(tmp_path, scene):
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    with pytest.raises(InputFormatError, match=r"fake.svs: not a readable slide"):
        open_slide(fake)
    write_pyramid(tmp_path / "nompp.tif", scene[0][:300, :300], mpp=None)
    with pytest.raises(InputFormatError, match="no pixel size; pass --mpp"):
        open_slide(tmp_path / "nompp.tif")


# -- tissue ----------------------------------------------------------------------------------------


def test_tissue_detection_on_a_synthetic_slide():
    rgb = tissue_slide((768, 1024), 1, block=256)
    mask = detect_tissue(rgb[::8, ::8])
    truth = (rgb[::8, ::8] < 240).any(axis=2)
    assert 0.05 < mask.mean() < 0.9
    assert (mask & truth).sum() / truth.sum() > 0.9 and (mask & ~truth).sum() / mask.sum() < 0.2
    assert not detect_tissue(np.full((50, 50, 3), 240, np.uint8)).any()  # blank slide: no tissue
    tm = TissueMap(mask, (1024, 768))
    assert tm.touches(0, 0, 1024, 768) and tm.fraction == pytest.approx(mask.mean())


def test_fast_morphology_and_box_tests_equal_scipys_and_a_brute_force_check():
    from scipy import ndimage as ndi

    from cellcurate.models import tissue as T

    rng = np.random.default_rng(3)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        closed = ndi.binary_closing(m, structure=np.ones((3, 3), bool), iterations=1) | m
        assert np.array_equal(T._erode3(T._dilate3(m)) | m, closed)
        assert np.array_equal(T.fill_holes(m), ndi.binary_fill_holes(m))
        tm = TissueMap(m, (w * 7, h * 5))
        xs, ys = rng.uniform(-20, w * 8, (30, 2)), rng.uniform(-20, h * 6, (30, 2))
        x0, x1, y0, y1 = xs.min(1), xs.max(1), ys.min(1), ys.max(1)
        got = tm.touches_boxes(x0, y0, x1, y1)
        # brute force: mask pixel (r, c) covers level-0 [c*7, (c+1)*7) x [r*5, (r+1)*5)
        cols, rows = np.arange(w), np.arange(h)
        want = [bool(m[np.ix_((rows * 5 < b1) & ((rows + 1) * 5 > b0), (cols * 7 < a1) & ((cols + 1) * 7 > a0))].any())
                for a0, b0, a1, b1 in zip(x0, y0, x1, y1)]
        assert got.tolist() == want
        assert [tm.touches(*b) for b in zip(x0, y0, x1, y1)] == want


def test_vectorised_planning_equals_the_scalar_one_and_windows_hug_their_tiles():
    def touches(y0, x0, y1, x1):
        return (y0 - 700) ** 2 + (x0 - 500) ** 2 < 300**2 or x1 > 1650

    def grid(y0, x0, y1, x1):
        return ((y0 - 700) ** 2 + (x0 - 500) ** 2 < 300**2) | (x1 > 1650)

    a, _ = plan_chunks((1000, 1700), tile=128, overlap=32, chunk_tiles=3, touches=touches)
    b, _ = plan_chunks((1000, 1700), tile=128, overlap=32, chunk_tiles=3, touches_grid=grid)
    full, _ = plan_chunks((1000, 1700), tile=128, overlap=32, chunk_tiles=3)
    assert [(c.window, c.core, c.tiles) for c in a] == [(c.window, c.core, c.tiles) for c in b]
    cores = {c.core: c for c in full}
    assert any(c.window != cores[c.core].window for c in a)  # some chunks run only part of their tiles
    for c in a:
        ys, xs = [t[0] for t in c.tiles], [t[1] for t in c.tiles]
        assert c.window == (min(ys), min(xs), max(ys) + 128, max(xs) + 128)
        assert set(c.tiles) <= set(cores[c.core].tiles)


# -- stitching ---------------------------------------------------------------------------------------


def _match(truth_inst, table):
    """Fraction of slide nuclei matching an in-memory instance with IoU >= 0.9, and the count."""
    ok = 0
    for geom in table["geometry"]:
        minx, miny, maxx, maxy = (int(v) for v in geom.bounds)
        win = (miny, minx, maxy, maxx)
        mask = geometry_mask(geom, truth_inst.shape, window=win)
        ids, counts = np.unique(truth_inst[miny:maxy, minx:maxx][mask], return_counts=True)
        if not len(ids) or ids[np.argmax(counts)] == 0:
            continue
        j = ids[np.argmax(counts)]
        inter = counts.max()
        iou = inter / (mask.sum() + (truth_inst == j).sum() - inter)
        ok += iou >= 0.9
    return ok / max(len(table), 1)


@pytest.mark.slow
def test_slide_path_gives_the_nuclei_of_the_in_memory_path(scene, scene_slide, tmp_path):
    model = ContextOracle()
    mem = predict_image(model, scene[0], tile=256, overlap=64, with_polygons=False)
    with open_slide(scene_slide) as s:
        res = predict_slide(model, s, tmp_path, "scene", options=SlideOptions(chunk_tiles=2),
                            polygonize=mask_to_geometry, progress=False)
    t = nuclei_table(res.nuclei_path)
    assert res.n_chunks > 4 and len(t) == res.n_nuclei
    assert abs(len(t) - len(mem.nuclei)) <= 0.01 * len(mem.nuclei)
    assert _match(mem.instances, t) >= 0.99
    # no nucleus twice: centroids unique; ids 1..n in order
    assert len(np.unique(np.round(t[["centroid_x", "centroid_y"]].to_numpy(), 3), axis=0)) == len(t)
    assert t["nucleus_id"].tolist() == list(range(1, len(t) + 1))
    # table columns as read by pyarrow/shapely: polygon area == pixel area, probs over 7 classes
    assert np.allclose([g.area for g in t["geometry"]], t["area_px"])
    assert all(len(p) == 7 for p in t["probs"]) and np.allclose([sum(p) for p in t["probs"]], 1, atol=1e-5)
    assert ((t["bbox_x0"] <= t["centroid_x"]) & (t["centroid_x"] <= t["bbox_x1"])).all()


def test_each_tile_blend_matches_infer_tiled_inside_a_single_chunk(scene, scene_slide, tmp_path):
    # with one chunk covering the image, the slide path's maps are the in-memory ones: same nuclei exactly
    img = scene[0][:400, :500]
    write_pyramid(tmp_path / "small.tif", img, mpp=0.25)
    model = ContextOracle()
    mem = predict_image(model, img, with_polygons=False)
    with open_slide(tmp_path / "small.tif") as s:
        res = predict_slide(model, s, tmp_path, "small", options=SlideOptions(chunk_tiles=8), progress=False)
    t = pq.read_table(res.nuclei_path).to_pandas()
    assert res.n_chunks == 1
    np.testing.assert_allclose(np.sort(t["centroid_x"].to_numpy()), np.sort(mem.nuclei["centroid_x"].to_numpy()))
    assert infer_tiled(model, img)["np"].shape == img.shape[:2]


def test_a_finer_slide_is_read_at_the_matching_level_and_mapped_back(scene, tmp_path):
    img = scene[0][:512, :640]
    big = img.repeat(2, axis=0).repeat(2, axis=1)  # 0.125 µm/px; level 1 is img exactly
    write_pyramid(tmp_path / "fine.tif", big, mpp=0.125)
    model = ContextOracle()
    mem = predict_image(model, img, with_polygons=False).nuclei
    with open_slide(tmp_path / "fine.tif") as s:
        res = predict_slide(model, s, tmp_path, "fine", options=SlideOptions(chunk_tiles=8),
                            polygonize=mask_to_geometry, progress=False)
    t = nuclei_table(res.nuclei_path)
    np.testing.assert_allclose(np.sort(t["centroid_x"].to_numpy()), 2 * np.sort(mem["centroid_x"].to_numpy()))
    np.testing.assert_allclose(np.sort(t["area_px"].to_numpy()), 4 * np.sort(mem["area"].to_numpy()))
    assert np.allclose(t["area_um2"], t["area_px"] * 0.125**2)


@pytest.mark.slow
def test_roi_and_tissue_restrict_the_nuclei(scene, scene_slide, tmp_path):
    roi = shapely.box(300, 200, 700, 500)
    model = ContextOracle()
    with open_slide(scene_slide) as s:
        res = predict_slide(model, s, tmp_path, "roi", roi=roi, progress=False)
        t = pq.read_table(res.nuclei_path).to_pandas()
        assert len(t) > 50
        assert shapely.contains_xy(roi, t["centroid_x"], t["centroid_y"]).all()
        full = pq.read_table(predict_slide(model, s, tmp_path, "all", progress=False).nuclei_path).to_pandas()
        inside = shapely.contains_xy(roi, full["centroid_x"], full["centroid_y"])
        assert len(t) == int(inside.sum())
        with pytest.raises(InputFormatError, match=r"ROI .* lies outside the slide \(1300x1100 px\)"):
            predict_slide(model, s, tmp_path, "out", roi=shapely.box(5000, 5000, 6000, 6000), progress=False)
        mask = np.zeros((110, 130), bool)
        mask[:, :30] = True  # tissue only in the left 300 px
        part = predict_slide(model, s, tmp_path, "left", tissue=TissueMap(mask, s.dimensions), progress=False)
    assert part.n_tiles < res.n_tiles * 10 and part.n_nuclei < len(full) / 2
    assert pq.read_table(part.nuclei_path).column("centroid_x").to_numpy().max() < 300 + 256


def test_a_failure_mid_run_leaves_no_output_and_a_resume_merges_as_an_uninterrupted_run(scene, tmp_path):
    from cellcurate.curation.qupath_slide import NucleiGeoJSONWriter

    class Flaky(ContextOracle):
        calls = 0

        def forward(self, x):
            Flaky.calls += 1
            if Flaky.calls == 6:
                raise RuntimeError("device lost")
            return super().forward(x)

    def geojson(out):
        return lambda work, meta: NucleiGeoJSONWriter(out, image_name="f.tif", meta=meta, tmp=work / "geojson.tmp")

    write_pyramid(tmp_path / "f.tif", scene[0][:500, :600], mpp=0.25)
    opts = SlideOptions(tile=64, overlap=16, chunk_tiles=1, batch_size=4)
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    with open_slide(tmp_path / "f.tif") as s:
        ref = predict_slide(ContextOracle(), s, ref_dir, "f", options=opts, sinks=[geojson(ref_dir / "f.geojson")],
                            progress=False)
        with pytest.raises(RuntimeError, match="device lost"):
            predict_slide(Flaky(), s, out, "f", options=opts, sinks=[geojson(out / "f.geojson")], progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["f.partial"]  # nothing half-written beside it
        n_done = len(list((out / "f.partial").glob("chunk_*.parquet")))
        assert n_done >= 1
        res = predict_slide(Flaky(), s, out, "f", options=opts, sinks=[geojson(out / "f.geojson")], resume=True,
                            progress=False)
    assert res.resumed_chunks == n_done and res.first_forward is not None and res.last_forward >= res.first_forward
    assert pq.read_table(res.nuclei_path).equals(pq.read_table(ref.nuclei_path))
    assert (out / "f.geojson").read_bytes() == (ref_dir / "f.geojson").read_bytes()
    assert len(json.loads((out / "f.geojson").read_text())["features"]) == ref.n_nuclei > 0
    assert sorted(p.name for p in out.iterdir()) == ["f.geojson", "f_nuclei.parquet"]


def test_out_of_memory_is_one_line_with_the_size(tmp_path):
    class Greedy(ContextOracle):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1 GiB free)")

    with pytest.raises(ModelError, match=r"out of GPU memory on a batch of 1 tiles of 256x256 px .*2.00 GiB"):
        infer_tiled(Greedy(), np.zeros((256, 256, 3), np.uint8))
    write_pyramid(tmp_path / "z.tif", np.zeros((300, 300, 3), np.uint8), mpp=0.25)
    with open_slide(tmp_path / "z.tif") as s, pytest.raises(ModelError, match=r"batch of 4 tiles .*2.00 GiB"):
        predict_slide(Greedy(), s, tmp_path, "z", progress=False)
    assert not (tmp_path / "z_nuclei.parquet").exists()

    class Host(ContextOracle):
        def forward(self, x):
            raise MemoryError("Unable to allocate 3.50 GiB for an array with shape (8, 30000, 30000)")

    with pytest.raises(ModelError, match=r"out of host memory .*3.50 GiB") as info:
        infer_tiled(Host(), np.zeros((64, 64, 3), np.uint8))
    assert "\n" not in str(info.value)


# -- CLI ----------------------------------------------------------------------------------------------


def _run(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, env=env, **kw)


@pytest.mark.slow
def test_cli_slide_outputs_and_bad_inputs(oracle_file, scene_slide, tmp_path):
    out = tmp_path / "o"
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(100, 100, 600, 400)),
        "properties": {"objectType": "annotation"}}]}))
    r = _run(["predict", str(oracle_file), str(scene_slide), "--out", str(out), "--device", "cpu", "--roi", str(roi),
              "--tissue", "all", "--offset", "1000,2000"])
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out / "scene_nuclei.parquet").to_pandas()
    with gzip.open(out / "scene.geojson.gz", "rt") as fh:
        doc = json.load(fh)
    assert len(doc["features"]) == len(t) > 20
    f = doc["features"][0]
    assert f["properties"]["objectType"] == "detection" and len(f["properties"]["classification"]["color"]) == 3
    assert {"area_px", "area_um2", "nucleus_prob", "prob_Neutrophil"} <= set(f["properties"]["measurements"])
    geoms = [shapely.geometry.shape(g["geometry"]) for g in doc["features"]]
    # the offset moves everything: the ROI's nuclei land at 1000 + x, 2000 + y
    assert all(1100 <= g.centroid.x <= 1600 and 2100 <= g.centroid.y <= 2400 for g in geoms)
    assert (t["centroid_x"] >= 1100).all() and json.loads((out / "scene_summary.json").read_text())["nuclei"] == len(t)
    assert not list(out.glob("*.partial")) and not list(out.glob(".*tmp"))

    fake = tmp_path / "fake.svs"
    fake.write_text("hello")
    nompp = tmp_path / "nompp.tif"
    write_pyramid(nompp, np.zeros((300, 300, 3), np.uint8), mpp=None)
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(9e4, 9e4, 9.1e4, 9.1e4)),
                               "properties": {"objectType": "annotation"}}))
    for args, msg in [([str(fake)], "fake.svs: not a readable slide"),
                      ([str(nompp)], "nompp.tif: the slide's metadata has no pixel size; pass --mpp"),
                      ([str(scene_slide), "--roi", str(far)], "the ROI (90000, 90000, 1000x1000) lies outside the slide")]:
        r = _run(["predict", str(oracle_file), *args, "--out", str(tmp_path / "bad"), "--device", "cpu"])
        assert r.returncode == 1 and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.parquet"))


@pytest.mark.slow
def test_cli_offset_for_plain_images(oracle_file, scene, tmp_path):
    from PIL import Image

    from cellcurate.cli.predict import command

    Image.fromarray(scene[0][:200, :240]).save(tmp_path / "r.png")
    for off, name in (("0,0", "a"), ("500.5,300", "b")):
        res = CliRunner().invoke(command, [str(oracle_file), str(tmp_path / "r.png"), "--out", str(tmp_path / name),
                                           "--device", "cpu", "--offset", off])
        assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "a" / "r.geojson").read_text())["features"]
    b = json.loads((tmp_path / "b" / "r.geojson").read_text())["features"]
    ga, gb = shapely.geometry.shape(a[0]["geometry"]), shapely.geometry.shape(b[0]["geometry"])
    assert shapely.equals_exact(shapely.affinity.translate(ga, 500.5, 300), gb, 1e-9)
    ta, tb = (pq.read_table(tmp_path / n / "r_nuclei.parquet").to_pandas() for n in "ab")
    np.testing.assert_allclose(tb["centroid_x"], ta["centroid_x"] + 500.5)
    res = CliRunner().invoke(command, [str(oracle_file), str(tmp_path / "r.png"), "--out", str(tmp_path / "c"),
                                       "--offset", "1,2,3"])
    assert res.exit_code == 2 and "expected 2 comma-separated numbers" in res.output


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(oracle_file, scene, tmp_path):
    slide = tmp_path / "scene.tif"
    write_pyramid(slide, scene[0][:400, :480], mpp=0.25)
    args = ["predict", str(oracle_file), str(slide), "--device", "cpu", "--tile", "64", "--overlap", "16",
            "--chunk-tiles", "1", "--batch-size", "4", "--tissue", "all", "--labels-zarr", "0.5"]
    ref = _run([*args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = out / "scene.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(work.glob("chunk_*.parquet"))) < 20 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    n_done = len(list(work.glob("chunk_*.parquet")))
    assert n_done >= 1 and not (out / "scene_nuclei.parquet").exists()
    r = _run([*args, "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "scene_summary.json").read_text())
    assert summary["resumed_chunks"] >= n_done - 1
    a = pq.read_table(tmp_path / "ref" / "scene_nuclei.parquet")
    b = pq.read_table(out / "scene_nuclei.parquet")
    assert a.equals(b)
    assert gzip.decompress((tmp_path / "ref" / "scene.geojson.gz").read_bytes()) == gzip.decompress(
        (out / "scene.geojson.gz").read_bytes())
    import zarr

    za, zb = (zarr.open_group(str(d / "scene_labels.ome.zarr"), mode="r") for d in (tmp_path / "ref", out))
    for name in ("instances/0", "classes/0"):
        assert np.array_equal(za[name][:], zb[name][:]), name
    assert dict(za["instances"].attrs) == dict(zb["instances"].attrs)
    # a finished slide is not run again
    again = _run([*args, "--out", str(out), "--resume"])
    assert again.returncode == 0 and "already done" in again.stdout


@pytest.mark.slow
def test_cohort_on_a_local_dask_cluster_survives_a_killed_worker(oracle_file, scene, tmp_path):
    from cellcurate.cli._slidejob import run_slide

    slides = []
    for i in range(3):
        p = tmp_path / f"s{i}.tif"
        write_pyramid(p, scene[0][i * 150 : i * 150 + 320, :400], mpp=0.25)
        slides.append(p)
    listing = tmp_path / "slides.csv"
    listing.write_text("slide\n" + "\n".join(p.name for p in slides) + "\n")
    out = tmp_path / "cohort"
    job = ["--device", "cpu", "--tile", "64", "--overlap", "16", "--chunk-tiles", "1", "--tissue", "all"]
    proc = subprocess.Popen([*CLI, "predict", str(oracle_file), "--slides", str(listing), "--out", str(out),
                             "--workers", "2", *job], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for cfg in out.glob("*.partial/config.json"):
            parts = list(cfg.parent.glob("chunk_*.parquet"))
            if len(parts) >= 5:
                try:
                    pid = json.loads(cfg.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed = cfg.parent.name.removesuffix(".partial")
                except (OSError, ValueError, KeyError):
                    continue
                break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    if killed is None:
        pytest.skip("no worker could be killed while busy")
    summary = pq.read_table(out / "cohort_summary.parquet").to_pandas()
    assert summary["status"].tolist() == ["done"] * 3 and summary["stem"].tolist() == ["s0", "s1", "s2"]
    assert "3/3 slides done" in stdout
    assert not list(out.glob("*.partial")) and not list(out.glob(".*tmp"))
    # the killed slide's outputs equal an uninterrupted run's
    ref = run_slide(str(oracle_file), str(tmp_path / f"{killed}.tif"), str(tmp_path / "ref"), device="cpu", tile=64,
                    overlap=16, chunk_tiles=1, tissue="all", progress=False)
    assert pq.read_table(out / f"{killed}_nuclei.parquet").equals(pq.read_table(ref["nuclei_table"]))
    row = summary[summary["stem"] == killed].iloc[0]
    assert row["nuclei"] == ref["nuclei"] and sum(row[f"n_{c}"] for c in ContextOracle().meta["classes"][1:]) == ref["nuclei"]


# -- QuPath script ------------------------------------------------------------------------------------


def test_qupath_script_is_filled_in_and_uses_only_existing_predict_options(oracle_file, tmp_path):
    import re

    from cellcurate.cli.predict import command as predict
    from cellcurate.cli.qupath_script import command

    out = tmp_path / "run_cellcurate.groovy"
    res = CliRunner().invoke(command, ["--out", str(out), "--model", str(oracle_file), "--curate",
                                       "'/opt/my env/bin/python' -m cellcurate.cli.main", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "{{" not in text
    assert "def CURATE = ['/opt/my env/bin/python', '-m', 'cellcurate.cli.main']" in text
    assert f"def MODEL = '{oracle_file.resolve()}'" in text and "def DEVICE = 'cpu'" in text
    # the QuPath API the script relies on
    for call in ("getSelectedObjects()", "exportObjectsToGeoJson(", "PathIO.readObjects(", "removeObjects(", "addObjects("):
        assert call in text
    # every option it passes to curate predict exists
    used = set(re.findall(r"'(--[a-z-]+)'", text))
    known = {opt for p in predict.params for opt in p.opts}
    assert used and used <= known, used - known
    # quotes and backslashes are escaped for Groovy
    from cellcurate.cli.qupath_script import render_script

    assert "def MODEL = 'C:\\\\models\\\\it\\'s.pt'" in render_script(curate=["curate"], model="C:\\models\\it's.pt",
                                                                        device="cpu")


GROOVY_PARSE = """
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases
def cu = new CompilationUnit()
cu.addSource(new File(args[0]))
cu.compile(Phases.CONVERSION)
println "parsed " + cu.AST.modules[0].statementBlock.statements.size()
"""


@pytest.mark.slow
def test_qupath_script_parses_with_groovy(oracle_file, tmp_path):
    """Syntax only (the AST, CompilePhase CONVERSION: QuPath's classes are not resolved), with the
    groovy found on PATH (e.g. Debian's groovy package); skipped where there is none."""
    import shutil

    from cellcurate.cli.qupath_script import command

    groovy = shutil.which("groovy")
    if groovy is None:
        pytest.skip("no groovy on PATH")
    out = tmp_path / "run_cellcurate.groovy"
    assert CliRunner().invoke(command, ["--out", str(out), "--model", str(oracle_file)]).exit_code == 0
    (tmp_path / "parse.groovy").write_text(GROOVY_PARSE)
    env = dict(os.environ)
    java = shutil.which("java")
    if "JAVA_HOME" not in env and java:
        env["JAVA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(java)))
    r = subprocess.run([groovy, str(tmp_path / "parse.groovy"), str(out)], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
    assert r.returncode == 0 and r.stdout.startswith("parsed "), r.stdout + r.stderr
    assert int(r.stdout.split()[1]) > 10
    (tmp_path / "broken.groovy").write_text(out.read_text().rsplit("}", 1)[0])  # the checker does catch errors
    r = subprocess.run([groovy, str(tmp_path / "parse.groovy"), str(tmp_path / "broken.groovy")], capture_output=True,
                       text=True, env=env, timeout=600, check=False)
    assert r.returncode != 0 and "startup failed" in r.stdout + r.stderr


def test_slide_geojson_validates_with_geojson_pydantic(scene, tmp_path):
    gp = pytest.importorskip("geojson_pydantic")
    from cellcurate.curation.qupath_slide import read_roi, write_nuclei_geojson

    write_pyramid(tmp_path / "g.tif", scene[0][:300, :300], mpp=0.25)
    with open_slide(tmp_path / "g.tif") as s:
        res = predict_slide(ContextOracle(), s, tmp_path, "g", polygonize=mask_to_geometry, progress=False)
    n = write_nuclei_geojson(res.nuclei_path, tmp_path / "g.geojson.gz", image_name="g.tif", object_type="cell")
    with gzip.open(tmp_path / "g.geojson.gz", "rt") as fh:
        doc = json.load(fh)
    fc = gp.FeatureCollection.model_validate(doc)
    assert len(fc.features) == n == res.n_nuclei > 10
    assert doc["features"][0]["properties"]["objectType"] == "cell" and "nucleusGeometry" in doc["features"][0]
    # a FeatureCollection of two annotations reads back as their union
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps([{"type": "Feature", "properties": {"objectType": "annotation"},
                                "geometry": shapely.geometry.mapping(shapely.box(*b))} for b in ((0, 0, 10, 10), (20, 0, 30, 10))]))
    assert read_roi(roi).area == 200
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(InputFormatError, match="empty.geojson: the ROI file has no polygon features"):
        read_roi(tmp_path / "empty.geojson")


# -- OME-Zarr label image -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_labels_zarr_has_the_table_ids_and_validates(oracle_file, scene, tmp_path, version):
    import zarr

    from cellcurate.cli._slidejob import run_slide

    slide = tmp_path / "scene.tif"
    img = scene[0][:300, :700]
    write_pyramid(slide, img, mpp=0.25)
    s = run_slide(str(oracle_file), str(slide), str(tmp_path / "o"), device="cpu", tile=64, overlap=16, chunk_tiles=2,
                  tissue="all", offset=(100.0, 40.0), labels_zarr=version, progress=False)
    path = tmp_path / "o" / "scene_labels.ome.zarr"
    assert s["labels_zarr"] == str(path) and not list((tmp_path / "o").glob(".*tmp"))
    t = pq.read_table(s["nuclei_table"]).to_pandas()
    root = zarr.open_group(str(path), mode="r")
    ins, cls = root["instances/0"][:], root["classes/0"][:]
    assert ins.shape == (300, 700) and ins.dtype == np.int32 and cls.dtype == np.uint8
    # the same nuclei, under the table's ids: every id present, pixel counts and centroids agree
    ids, counts = np.unique(ins[ins > 0], return_counts=True)
    assert ids.tolist() == t["nucleus_id"].tolist()
    np.testing.assert_array_equal(counts, t["area_px"].to_numpy())  # mpp = model's: no resampling
    rows, cols = np.nonzero(ins)
    cy = np.bincount(ins[rows, cols], weights=rows)[ids] / counts + 0.5 + 40.0
    cx = np.bincount(ins[rows, cols], weights=cols)[ids] / counts + 0.5 + 100.0
    np.testing.assert_allclose(cx, t["centroid_x"], atol=1e-6)
    np.testing.assert_allclose(cy, t["centroid_y"], atol=1e-6)
    lut = np.zeros(ids.max() + 1, np.uint8)
    lut[t["nucleus_id"]] = t["class_id"]
    assert np.array_equal(cls, lut[ins])
    # a pyramid: level k = level 0 [::2**k], down to <= 512 px
    assert root["instances/1"].shape == (150, 350)
    assert np.array_equal(root["instances/1"][:], ins[::2, ::2]) and np.array_equal(root["classes/1"][:], cls[::2, ::2])
    # someone else's validator: ome-zarr-models (Labels group, image-label of classes, multiscales)
    pytest.importorskip("ome_zarr_models")
    if version == "0.4":
        from pydantic_zarr.v2 import ArraySpec, GroupSpec, TBaseItem

        from ome_zarr_models.v04 import image, image_label, labels
        from ome_zarr_models.v04.image import ImageAttrs

        ns = {"GroupSpec": GroupSpec, "ArraySpec": ArraySpec, "TBaseItem": TBaseItem}
        for m in (labels.Labels, image_label.ImageLabel, image.Image):
            m.model_rebuild(_types_namespace=ns)
        attrs = {name: dict(root[name].attrs) for name in ("instances", "classes")}
    else:
        from ome_zarr_models.v05 import image_label, labels
        from ome_zarr_models.v05.image import ImageAttrs

        attrs = {name: dict(root[name].attrs)["ome"] for name in ("instances", "classes")}
    assert labels.Labels.from_zarr(root).ome_attributes.labels == ["instances", "classes"]
    il = image_label.ImageLabel.from_zarr(root["classes"]).ome_attributes.image_label
    props = {p.label_value: p.model_dump(by_alias=True)["class"] for p in il.properties}
    assert props[0] == "background" and props[2] == "Lymphocyte"
    for name, a in attrs.items():
        ms = ImageAttrs.model_validate({k: v for k, v in a.items() if k != "image-label"}).multiscales[0]
        assert [d.path for d in ms.datasets] == ["0", "1"]
        sc, tr = ms.datasets[1].coordinateTransformations
        assert list(sc.scale) == [0.5, 0.5] and list(tr.translation) == [40 * 0.25, 100 * 0.25], name
