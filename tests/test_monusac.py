"""Tests of the MoNuSAC reader: real XMLs first, then tiny exact cases, then bad inputs."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import polygon

from cellcurate.datasets.monusac import (
    MonusacRegion,
    discover_monusac,
    iter_monusac,
    looks_like_monusac,
    parse_annotation_xml,
    rasterize_regions,
    read_monusac_image,
)
from cellcurate.datasets.records import SOURCE_NUCLEI_COLUMNS, IngestReport
from cellcurate.errors import ConfigError, InputFormatError, InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "monusac"  # real MoNuSAC XMLs, CC BY-NC-SA 4.0
KK = "TCGA-KK-A6E0-01Z-00-DX1-5.xml"
EV = "TCGA-EV-5903-01Z-00-DX1_5.xml"
TRAIN = "MoNuSAC_images_and_annotations"
TEST = "MoNuSAC Testing Data and Annotations"
BARCODE = "TCGA-AB-1234-01Z-00-DX1"

needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / KK).exists(), reason=f"real MoNuSAC fixtures not found at {FIXTURES}"
)


# ---------------------------------------------------------------------------------------------
# helpers: a small ImageScope-like XML writer and image writer
# ---------------------------------------------------------------------------------------------
def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _length(v: np.ndarray) -> float:
    d = np.roll(v, -1, axis=0) - v
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def make_xml(blocks: list[tuple[str, list[list[tuple[float, float]]]]], *, mpp: str | None = "0.250000") -> str:
    """``blocks``: (class name, list of vertex lists); Region Ids restart at 1 in each block."""
    root_attr = "" if mpp is None else f' MicronsPerPixel="{mpp}"'
    out = [f"<Annotations{root_attr}>"]
    for a, (cls, regions) in enumerate(blocks, start=1):
        out.append(f'<Annotation Id="{a}" Name="Layer {a}"><Attributes><Attribute Name="{cls}" Id="0" Value=""/></Attributes>')
        out.append('<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>')
        for r, verts in enumerate(regions, start=1):
            v = np.asarray(verts, dtype=float)
            out.append(f'<Region Id="{r}" Type="0" Length="{_length(v):.1f}" Area="{_area(v):.1f}"><Attributes/><Vertices>')
            out.extend(f'<Vertex X="{x:g}" Y="{y:g}" Z="0"/>' for x, y in verts)
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    return "\n".join(out) + "\n"


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def rgb(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def make_case(
    tmp_path: Path,
    xml_text: str | bytes,
    *,
    shape: tuple[int, int] = (40, 40),
    release: str = TRAIN,
    patient: str = BARCODE,
    stem: str | None = None,
    image: np.ndarray | None = None,
    suffix: str = ".tif",
) -> Path:
    """Write <release>/<patient>/<stem>.xml and its image; return the release folder."""
    folder = tmp_path / release / patient
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{patient}_1"
    data = xml_text.encode() if isinstance(xml_text, str) else xml_text
    (folder / f"{stem}.xml").write_bytes(data)
    if suffix:
        image = rgb(*shape) if image is None else image
        tifffile.imwrite(folder / f"{stem}{suffix}", image, photometric="rgb" if image.ndim == 3 else None)
    return tmp_path / release


def read_one(release: Path, report: IngestReport | None = None):
    items = discover_monusac(release)
    assert len(items) == 1
    return read_monusac_image(items[0], report=report)


def reference_labels(regions, shape: tuple[int, int]) -> np.ndarray:
    """Label map by the documented rule, computed independently: per pixel, the covering region
    of smallest polygon area wins, ties go to the earlier region; ids 1..n in document order."""
    best = np.full(shape, np.inf)
    owner = np.zeros(shape, dtype=np.int32)
    for k, r in enumerate(regions):
        mask = np.zeros(shape, dtype=bool)
        mask[polygon(r.vertices[:, 1], r.vertices[:, 0], shape=shape)] = True
        wins = mask & (_area(r.vertices) < best)  # strict: of equal areas the earlier one stays
        best[wins] = _area(r.vertices)
        owner[wins] = k + 1
    return owner


def pixel_counts(instances: np.ndarray) -> list[int]:
    return np.bincount(instances.ravel())[1:].tolist()


# ---------------------------------------------------------------------------------------------
# real XMLs
# ---------------------------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize(
    "name, mpp, classes, empty_blocks, duplicates",
    [
        (KK, 0.2468, {"Epithelial": 4, "Macrophage": 3}, 2, 2),
        (EV, 0.252, {"Macrophage": 5}, 3, 4),
    ],
)
def test_real_xml_parses_exactly(name, mpp, classes, empty_blocks, duplicates):
    report = IngestReport()
    ann = parse_annotation_xml(FIXTURES / name, report=report)
    assert ann.mpp == mpp
    assert Counter(r.label for r in ann.regions) == Counter(classes)
    assert ann.n_annotation_blocks == 4
    assert report.counts["annotation_blocks_empty"] == empty_blocks
    # Area/Length attributes are a checksum of the vertices: none may mismatch
    assert report.counts["area_mismatches"] == 0
    assert report.counts["length_mismatches"] == 0
    assert report.warnings == []
    for r in ann.regions:
        assert r.vertices.dtype == np.float64 and r.vertices.shape[1] == 2
        assert r.area_attr == _area(r.vertices)
    # consecutive duplicate vertices (EV-5903: 2 in each of two regions; KK-A6E0: 2 in one)
    assert report.counts["duplicate_vertices_dropped"] == duplicates
    assert report.counts["closing_vertices_dropped"] == len(ann.regions)
    assert report.counts["regions_skipped_degenerate"] == 0


@needs_fixtures
def test_real_xml_crlf_parses_identically(tmp_path):
    crlf = tmp_path / KK
    crlf.write_bytes((FIXTURES / KK).read_bytes().replace(b"\n", b"\r\n"))
    assert b"\r\n" in crlf.read_bytes()
    a, b = parse_annotation_xml(FIXTURES / KK), parse_annotation_xml(crlf)
    assert a.mpp == b.mpp and len(a.regions) == len(b.regions) == 7
    for ra, rb in zip(a.regions, b.regions):
        assert (ra.region_id, ra.label, ra.area_attr, ra.length_attr, ra.annotation_id) == (
            rb.region_id, rb.label, rb.area_attr, rb.length_attr, rb.annotation_id
        )
        np.testing.assert_array_equal(ra.vertices, rb.vertices)


@needs_fixtures
@pytest.mark.parametrize("name, shape, overlaps", [(KK, (500, 560), 15), (EV, (180, 280), 0)])
def test_real_xml_with_synthetic_image(tmp_path, name, shape, overlaps):
    patient = name[:23]
    folder = tmp_path / TRAIN / patient
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / name, folder / name)
    stem = name[:-4]
    image = rgb(*shape)
    tifffile.imwrite(folder / f"{stem}.tif", image)

    report = IngestReport()
    (img,) = list(iter_monusac(tmp_path / TRAIN, report=report))
    ann = parse_annotation_xml(FIXTURES / name)
    assert img.key == stem and img.split == "train"
    assert img.origin_file == f"{patient}/{stem}.tif"
    assert img.annotation_file == f"{patient}/{name}"
    assert img.origin_index == -1 and img.tissue is None
    assert img.patient_id == patient[:12]
    assert img.mpp == ann.mpp
    np.testing.assert_array_equal(img.image, image)  # native size, never resized
    assert img.instances.shape == shape and img.instances.dtype == np.int32
    assert list(img.nuclei.columns) == list(SOURCE_NUCLEI_COLUMNS)
    for col, dtype in SOURCE_NUCLEI_COLUMNS.items():
        assert str(img.nuclei[col].dtype) == dtype, col
    assert img.nuclei["source_label"].tolist() == [r.label for r in ann.regions]
    assert img.nuclei["origin_region"].tolist() == [r.region_id for r in ann.regions]
    assert set(img.nuclei["kind"]) == {"nucleus"}
    assert (img.nuclei["origin_channel"] == -1).all() and (img.nuclei["origin_instance"] == -1).all()
    # reference: each pixel belongs to the smallest covering region (ties: earlier), from plain skimage
    assert report.counts["regions_clipped"] == 0
    assert img.instances.max() == len(ann.regions)
    np.testing.assert_array_equal(img.instances, reference_labels(ann.regions, shape))
    assert report.counts["overlap_pixels"] == overlaps  # neighbours share boundary pixels
    assert report.counts["nuclei"] == len(ann.regions) and report.counts["images"] == 1


# ---------------------------------------------------------------------------------------------
# tiny exact cases
# ---------------------------------------------------------------------------------------------
def test_square_rasterises_to_expected_pixels(tmp_path):
    release = make_case(tmp_path, make_xml([("Lymphocyte", [square(10, 10, 20, 20)])]))
    img = read_one(release)
    assert pixel_counts(img.instances) == [121]  # pixel centres inside or on the closed square
    rows, cols = np.nonzero(img.instances)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 20, 10, 20)
    assert img.nuclei["source_label"].tolist() == ["Lymphocyte"]


@pytest.mark.parametrize("big_first", [True, False])
def test_overlap_smaller_region_wins(tmp_path, big_first):
    big, small = ("Epithelial", [square(0, 0, 20, 20)]), ("Neutrophil", [square(10, 10, 15, 15)])
    blocks = [big, small] if big_first else [small, big]
    report = IngestReport()
    img = read_one(make_case(tmp_path, make_xml(blocks)), report)
    labels = img.nuclei["source_label"].tolist()
    assert labels == ([b[0] for b in blocks])  # ids follow document order
    small_id = labels.index("Neutrophil") + 1
    big_id = labels.index("Epithelial") + 1
    counts = np.bincount(img.instances.ravel())
    assert counts[small_id] == 36 and counts[big_id] == 441 - 36
    assert (img.instances[10:16, 10:16] == small_id).all()
    assert report.counts["overlap_pixels"] == 36
    assert report.counts["regions_lost_to_overlap"] == 0


def test_overlap_equal_areas_earlier_region_wins(tmp_path):
    xml = make_xml([("Lymphocyte", [square(0, 0, 10, 10), square(5, 5, 15, 15)])])
    report = IngestReport()
    img = read_one(make_case(tmp_path, xml), report)
    assert (img.instances[5:11, 5:11] == 1).all()
    assert pixel_counts(img.instances) == [121, 121 - 36]
    assert report.counts["overlap_pixels"] == 36


def test_region_covered_by_smaller_regions_is_lost(tmp_path):
    # A (area 16) is covered row 0-2 by B1 (area 8) and rows 3-4 by B2 (area 4)
    xml = make_xml(
        [("Lymphocyte", [square(0, 0, 4, 2), square(0, 0, 4, 4), square(0, 3, 4, 4)])]
    )
    report = IngestReport()
    img = read_one(make_case(tmp_path, xml), report)
    assert img.nuclei["origin_region"].tolist() == ["1", "3"]
    assert pixel_counts(img.instances) == [15, 10]
    assert report.counts["regions_lost_to_overlap"] == 1
    assert report.counts["overlap_pixels"] == 25
    assert any("Id=2" in w and "dropped" in w for w in report.warnings)


def test_degenerate_region_is_skipped_and_counted(tmp_path):
    xml = make_xml(
        [
            (
                "Macrophage",
                [
                    [(5, 5), (5, 5), (10, 10), (5, 5)],  # 2 distinct vertices
                    [(1, 1), (3, 3)],  # 2 vertices
                    square(20, 20, 25, 25),
                ],
            )
        ]
    )
    report = IngestReport()
    img = read_one(make_case(tmp_path, xml), report)
    assert img.nuclei["origin_region"].tolist() == ["3"]
    assert report.counts["regions_skipped_degenerate"] == 2
    assert report.counts["duplicate_vertices_dropped"] == 1
    assert sum("fewer than 3 distinct vertices" in w for w in report.warnings) == 2
    assert all(w.startswith(str(tmp_path)) for w in report.warnings)


def test_vertices_outside_image_are_clipped(tmp_path):
    xml = make_xml(
        [
            (
                "Epithelial",
                [
                    square(-5, -5, 10, 10),  # clipped to rows/cols 0..10
                    square(35, 20, 50, 25),  # clipped on the right: cols 35..39
                    square(100, 100, 110, 110),  # entirely outside
                    [(0.2, 0.2), (0.8, 0.3), (0.5, 0.7)],  # no pixel centre inside
                ],
            )
        ]
    )
    report = IngestReport()
    img = read_one(make_case(tmp_path, xml, shape=(40, 40)), report)
    assert pixel_counts(img.instances) == [121, 5 * 6]
    assert img.nuclei["origin_region"].tolist() == ["1", "2"]
    assert report.counts["regions_clipped"] == 2
    assert report.counts["regions_skipped_outside"] == 1
    assert report.counts["regions_skipped_empty"] == 1


def test_ambiguous_becomes_ignore_in_test_split(tmp_path):
    xml = make_xml([("ambiguous", [square(0, 0, 30, 30)]), ("LYMPHOCYTE", [square(5, 5, 9, 9)])])
    release = make_case(tmp_path, xml, release=TEST)
    report = IngestReport()
    img = read_one(release, report)
    assert img.split == "test"
    assert img.nuclei["kind"].tolist() == ["ignore", "nucleus"]
    assert img.nuclei["source_label"].tolist() == ["Ambiguous", "Lymphocyte"]
    assert pixel_counts(img.instances) == [31 * 31 - 25, 25]  # the nucleus keeps its pixels
    assert report.counts["ignore_regions"] == 1 and report.counts["nuclei"] == 1


def test_rgba_image_loses_alpha(tmp_path):
    image = rgb(30, 50, channels=4)
    report = IngestReport()
    img = read_one(make_case(tmp_path, make_xml([("Lymphocyte", [square(1, 1, 5, 5)])]), image=image), report)
    assert img.image.shape == (30, 50, 3) and img.image.dtype == np.uint8
    np.testing.assert_array_equal(img.image, image[..., :3])
    assert report.counts["images_rgba"] == 1


def test_svs_fallback_reads_level_0(tmp_path):
    folder = tmp_path / TRAIN / BARCODE
    folder.mkdir(parents=True)
    (folder / f"{BARCODE}_1.xml").write_text(make_xml([("Neutrophil", [square(2, 2, 6, 6)])]))
    level0 = rgb(64, 48)
    with tifffile.TiffWriter(folder / f"{BARCODE}_1.svs") as tw:  # a pyramid: level 0 + half size
        tw.write(level0, subifds=1, photometric="rgb")
        tw.write(level0[::2, ::2], subfiletype=1, photometric="rgb")
    report = IngestReport()
    (item,) = discover_monusac(tmp_path / TRAIN)
    assert item.image.suffix == ".svs"
    img = read_monusac_image(item, report=report)
    np.testing.assert_array_equal(img.image, level0)
    assert img.origin_file == f"{BARCODE}/{BARCODE}_1.svs"
    assert report.counts["images_from_svs"] == 1
    # where both exist, the .tif is preferred
    tifffile.imwrite(folder / f"{BARCODE}_1.tif", rgb(64, 48, seed=1))
    assert discover_monusac(tmp_path / TRAIN)[0].image.suffix == ".tif"


def test_area_and_length_mismatch_reported_not_fatal(tmp_path):
    xml = make_xml([("Lymphocyte", [square(0, 0, 10, 10)])]).replace('Area="100.0"', 'Area="400.0"')
    xml = xml.replace('Length="40.0"', 'Length="40.04"')  # within rounding tolerance
    path = tmp_path / "a.xml"
    path.write_text(xml)
    report = IngestReport()
    ann = parse_annotation_xml(path, report=report)
    assert len(ann.regions) == 1 and ann.regions[0].area_attr == 400.0
    assert report.counts["area_mismatches"] == 1 and report.counts["length_mismatches"] == 0
    (warning,) = report.warnings
    assert warning.startswith(str(path)) and "Id=1" in warning and "Area" in warning


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _two_releases(tmp_path: Path) -> Path:
    xml = make_xml([("Lymphocyte", [square(1, 1, 4, 4)])])
    make_case(tmp_path, xml, patient="TCGA-B2-0002-01Z-00-DX1", stem="TCGA-B2-0002-01Z-00-DX1-1")
    make_case(tmp_path, xml, patient="TCGA-A1-0001-01Z-00-DX1", stem="TCGA-A1-0001-01Z-00-DX1_001")
    make_case(tmp_path, xml, patient="TCGA-A1-0001-01Z-00-DX1", stem="TCGA-A1-0001-01Z-00-DX1_1")
    make_case(tmp_path, xml, release=TEST, patient="TCGA-C3-0003-01Z-00-DX1")
    (tmp_path / TRAIN / "._stray.xml").write_text("resource fork")  # hidden files are ignored
    return tmp_path


def test_discover_parent_release_and_patient_folders(tmp_path):
    root = _two_releases(tmp_path)
    items = discover_monusac(root)
    assert [(it.split, it.xml.stem) for it in items] == [
        ("train", "TCGA-A1-0001-01Z-00-DX1_001"),
        ("train", "TCGA-A1-0001-01Z-00-DX1_1"),
        ("train", "TCGA-B2-0002-01Z-00-DX1-1"),
        ("test", "TCGA-C3-0003-01Z-00-DX1_1"),
    ]
    assert [it.split for it in discover_monusac(root, split="test")] == ["test"]
    assert len(discover_monusac(root / TRAIN)) == 3
    assert {it.split for it in discover_monusac(root / TRAIN, split="test")} == {"test"}  # override
    (one,) = discover_monusac(root / TEST / "TCGA-C3-0003-01Z-00-DX1")
    assert one.split == "test" and one.patient_folder == "TCGA-C3-0003-01Z-00-DX1"
    keys = [img.key for img in iter_monusac(root)]
    assert keys == [it.image.stem for it in items]  # deterministic order
    with pytest.raises(ConfigError, match="split must be one of"):
        discover_monusac(root, split="val")


def test_looks_like_monusac(tmp_path):
    root = _two_releases(tmp_path / "m")
    assert looks_like_monusac(root) and looks_like_monusac(root / TRAIN)
    assert looks_like_monusac(root / TRAIN / "TCGA-A1-0001-01Z-00-DX1")
    pannuke = tmp_path / "p" / "Fold 1" / "images" / "fold1"
    pannuke.mkdir(parents=True)
    np.save(pannuke / "types.npy", np.array(["Breast"]))
    assert not looks_like_monusac(tmp_path / "p")
    assert not looks_like_monusac(tmp_path / "missing")
    assert not looks_like_monusac(pannuke / "types.npy")


def test_duplicate_stems_are_rejected(tmp_path):
    xml = make_xml([("Lymphocyte", [square(1, 1, 4, 4)])])
    make_case(tmp_path, xml, patient="TCGA-A1-0001-01Z-00-DX1", stem="same")
    make_case(tmp_path, xml, patient="TCGA-B2-0002-01Z-00-DX1", stem="same")
    with pytest.raises(InputFormatError, match="also used by"):
        discover_monusac(tmp_path / TRAIN)


# ---------------------------------------------------------------------------------------------
# bad inputs: each a one-line error naming the file
# ---------------------------------------------------------------------------------------------
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<Annotations MicronsPerPixel="0.25">&lol3;</Annotations>
"""


def _case_malformed(tmp: Path):
    return make_case(tmp, '<Annotations MicronsPerPixel="0.25">\n<Annotation>\n</Annotations>\n'), "_1.xml"


def _case_bomb(tmp: Path):
    return make_case(tmp, BOMB), "_1.xml"


def _case_external_entity(tmp: Path):
    secret = tmp / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (
        f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Attributes>'
        '<Attribute Name="&x;"/></Attributes></Annotation></Annotations>\n'
    )
    return make_case(tmp, xml), "_1.xml"


def _case_unknown_class(tmp: Path):
    return make_case(tmp, make_xml([("Tumor", [square(1, 1, 4, 4)])])), "_1.xml"


def _case_missing_mpp(tmp: Path):
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])], mpp=None)), "_1.xml"


def _case_invalid_mpp(tmp: Path):
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])], mpp="n/a")), "_1.xml"


def _case_bad_vertex(tmp: Path):
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])]).replace('X="4"', 'X="four"', 1)), "_1.xml"


def _case_xml_without_image(tmp: Path):
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])]), suffix=""), "_1.xml"


def _case_no_monusac_data(tmp: Path):
    (tmp / "empty" / "sub").mkdir(parents=True)
    return tmp / "empty", "empty"


def _case_missing_path(tmp: Path):
    return tmp / "nowhere", "nowhere"


def _case_grayscale(tmp: Path):
    gray = np.zeros((20, 20), dtype=np.uint8)
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])]), image=gray), "_1.tif"


def _case_float_image(tmp: Path):
    img = np.zeros((20, 20, 3), dtype=np.float32)
    return make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])]), image=img), "_1.tif"


def _case_not_a_tiff(tmp: Path):
    release = make_case(tmp, make_xml([("Lymphocyte", [square(1, 1, 4, 4)])]), suffix="")
    (release / BARCODE / f"{BARCODE}_1.tif").write_bytes(b"not a tiff at all")
    return release, "_1.tif"


BAD_INPUTS = [
    (_case_malformed, InputFormatError, "malformed XML at line 3, column"),
    (_case_bomb, InputFormatError, "forbidden entity/DTD"),
    (_case_external_entity, InputFormatError, "forbidden entity/DTD"),
    (_case_unknown_class, InputFormatError, "unknown class 'Tumor'"),
    (_case_missing_mpp, InputFormatError, "no MicronsPerPixel"),
    (_case_invalid_mpp, InputFormatError, "invalid MicronsPerPixel 'n/a'"),
    (_case_bad_vertex, InputFormatError, "non-numeric X/Y"),
    (_case_xml_without_image, InputNotFoundError, "no image with the same stem"),
    (_case_no_monusac_data, InputNotFoundError, "no MoNuSAC annotation XML found"),
    (_case_missing_path, InputNotFoundError, "does not exist"),
    (_case_grayscale, InputFormatError, "expected an RGB or RGBA uint8 image"),
    (_case_float_image, InputFormatError, "expected an RGB or RGBA uint8 image"),
    (_case_not_a_tiff, InputFormatError, "cannot read image level 0"),
]


@pytest.mark.parametrize("build, exc_type, message", BAD_INPUTS, ids=[b[0].__name__[6:] for b in BAD_INPUTS])
def test_bad_inputs(tmp_path, build, exc_type, message):
    path, names = build(tmp_path)
    with pytest.raises(exc_type) as info:
        list(iter_monusac(path))
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert names in text  # names the offending file
    assert "TOP-SECRET" not in text


# ---------------------------------------------------------------------------------------------
# invariants on a realistic synthetic image
# ---------------------------------------------------------------------------------------------
@needs_fixtures
def test_many_regions_invariants():
    shapes = parse_annotation_xml(FIXTURES / KK).regions + parse_annotation_xml(FIXTURES / EV).regions
    rng = np.random.default_rng(7)
    regions = []
    for i in range(300):
        s = shapes[i % len(shapes)]
        v = s.vertices - s.vertices.min(axis=0) + rng.integers(-40, 800, size=2)
        regions.append(MonusacRegion(str(i + 1), s.label, v, None, None, "1"))
    report = IngestReport()
    instances, kept = rasterize_regions(regions, (820, 840), report=report, source="synthetic")
    n = len(kept)
    assert kept == sorted(kept)
    assert instances.dtype == np.int32 and instances.max() == n
    assert (np.bincount(instances.ravel(), minlength=n + 1)[1:] > 0).all()  # every kept region has pixels
    c = report.counts
    assert n + c["regions_lost_to_overlap"] + c["regions_skipped_outside"] + c["regions_skipped_empty"] == 300
    assert c["overlap_pixels"] > 0 and c["regions_clipped"] > 0
    # the documented rule, computed independently, then renumbered to the kept regions
    lut = np.zeros(len(regions) + 1, dtype=np.int32)
    lut[np.asarray(kept) + 1] = np.arange(1, n + 1)
    np.testing.assert_array_equal(instances, lut[reference_labels(regions, (820, 840))])
    again, kept_again = rasterize_regions(regions, (820, 840))
    np.testing.assert_array_equal(instances, again)  # deterministic
    assert kept == kept_again


# -- the fast XML path: proven harmless by a byte scan, then lxml; anything else to defusedxml ------
HARMLESS_CASES = [
    (b'<?xml version="1.0" encoding="UTF-8"?>\n<Annotations/>', True),
    (b"\xef\xbb\xbf\r\n <Annotations/>", True),  # UTF-8 byte order mark, then spaces
    (b"<Annotations><!-- a comment --><![CDATA[x < y]]></Annotations>", True),
    (b"<Annotations><![CDATA[<!DOCTYPE as text]]></Annotations>", False),  # not parsed: to defusedxml
    (b'<Annotations Name="a &amp; b &#65;"/>', True),  # predefined entities and char refs only
    (b'<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>', False),
    (b'<a/>\n<!ENTITY x "y">', False),
    (b"<!doctype a><a/>", False),  # any other <! markup goes to the careful parser
    (b'<?xml version="1.0" encoding="UTF-7"?><a/>', False),  # '<' need not be a '<' byte there
    ('<?xml version="1.0" encoding="UTF-16"?><a/>'.encode("utf-16"), False),
    ("<a/>".encode("utf-16-le"), False),  # no BOM: starts with '<' but holds NUL bytes
    ("<a/>".encode("utf-32"), False),
    (b"not xml", False),
]


@pytest.mark.parametrize("data, harmless", HARMLESS_CASES, ids=range(len(HARMLESS_CASES)))
def test_byte_scan_passes_only_documents_without_markup_declarations(data, harmless):
    from cellcurate.datasets.monusac import _provably_harmless

    assert _provably_harmless(data) is harmless


def _utf16(text: str) -> bytes:
    return text.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>').encode("utf-16")


@pytest.mark.parametrize("encode", [str.encode, _utf16], ids=["utf-8", "utf-16"])
@pytest.mark.parametrize("hostile", ["bomb", "external"])
def test_hostile_xml_is_refused_in_any_encoding(tmp_path, encode, hostile):
    """A bomb or an external entity written in UTF-16 (invisible to a naive scan for b'<!DOCTYPE')
    still meets defusedxml and is refused; the secret is never read."""
    from cellcurate.datasets.monusac import parse_xml_bytes

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    text = BOMB if hostile == "bomb" else (
        f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        '<Annotations MicronsPerPixel="0.25">&x;</Annotations>\n')
    with pytest.raises(InputFormatError, match="forbidden entity/DTD") as info:
        parse_xml_bytes(encode(text), tmp_path / "a.xml")
    assert "TOP-SECRET" not in str(info.value)


@needs_fixtures
@pytest.mark.parametrize("name", [KK, EV])
def test_fast_and_careful_xml_paths_give_the_same_regions(monkeypatch, name):
    import cellcurate.datasets.monusac as M

    fast = M.parse_annotation_xml(FIXTURES / name)
    monkeypatch.setattr(M, "_fast_parser", lambda: None)  # every document through defusedxml
    careful = M.parse_annotation_xml(FIXTURES / name)
    assert fast.mpp == careful.mpp and len(fast.regions) == len(careful.regions) > 0
    for a, b in zip(fast.regions, careful.regions):
        assert (a.region_id, a.label, a.annotation_id, a.area_attr, a.length_attr) == \
               (b.region_id, b.label, b.annotation_id, b.area_attr, b.length_attr)
        np.testing.assert_array_equal(a.vertices, b.vertices)


def test_malformed_xml_on_the_fast_path_names_line_and_column(tmp_path):
    from cellcurate.datasets.monusac import _provably_harmless, parse_xml_bytes

    data = b'<Annotations MicronsPerPixel="0.25">\n<Annotation>\n</Annotations>\n'
    assert _provably_harmless(data)
    with pytest.raises(InputFormatError, match=r"a\.xml: malformed XML at line 3, column \d+") as info:
        parse_xml_bytes(data, tmp_path / "a.xml")
    assert "\n" not in str(info.value)
