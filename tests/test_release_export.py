"""`curate export`: releases, splits, counts, immutability, unreviewed flags, verify, diff."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellcurate.datasets.records import SourceImage
from cellcurate.datasets.store import Store
from cellcurate.errors import ConfigError, StateError

# -- a tiny store painted by hand ------------------------------------------------------------------
PN_LABELS = ["Neoplastic", "Inflammatory", "Connective", "Neoplastic"]
MO_LABELS = ["Lymphocyte", "Epithelial", "Ambiguous"]


def _disc_image(size: tuple[int, int], n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), 220, np.uint8)
    img[..., 0] = rng.integers(200, 240, (h, w))
    ins = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[:h, :w]
    for k in range(n):
        cy, cx = 8 + 14 * (k // 3), 8 + 14 * (k % 3)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        ins[disc] = k + 1
        img[disc] = (80 + 20 * k, 40, 140)
    return img, ins


def _item(key: str, split: str, labels: list[str], *, size=(48, 48), seed=0, patient=None, mpp=0.25,
          origin_file="f.npy", index=-1, regions=False) -> SourceImage:
    img, ins = _disc_image(size, len(labels), seed=seed)
    n = len(labels)
    kinds = ["ignore" if lab == "Ambiguous" else "nucleus" for lab in labels]
    nuc = pd.DataFrame({
        "instance_id": np.arange(1, n + 1, dtype=np.int32), "kind": kinds, "source_label": labels,
        "origin_channel": np.full(n, -1 if regions else 0, np.int16),
        "origin_instance": np.full(n, -1) if regions else np.arange(n) + 10,
        "origin_region": [str(k + 1) for k in range(n)] if regions else "",
    })
    return SourceImage(key=key, split=split, image=img, instances=ins, nuclei=nuc, origin_file=origin_file,
                       origin_index=index, mpp=mpp, patient_id=patient, tissue="Breast" if not regions else None)


def build_test_store(path: Path) -> Store:
    """PanNuke fold1 (2 tiles), fold3 (1 tile), MoNuSAC train (3 patients) + test (1 patient)."""
    store = Store.create(path)
    for fold, n in (("fold1", 2), ("fold3", 1)):
        items = [_item(f"{fold}/{i:05d}", fold, PN_LABELS, seed=i, origin_file=f"Fold {fold[-1]}/images.npy", index=i)
                 for i in range(n)]
        with store.unit_writer(f"pannuke-{fold}", "pannuke", fingerprint=fold, origin="/src",
                               stacked=(n, 48, 48)) as w:
            for it in items:
                w.add(it)
            w.commit()
    for split, patients in (("train", ["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]), ("test", ["TCGA-BB-0009"])):
        for p in patients:
            labels = MO_LABELS if split == "test" else MO_LABELS[:2]
            it = _item(f"{p}/{p}-01", split, labels, size=(40, 56), seed=len(p), patient=p, mpp=0.2505,
                       origin_file=f"{split}/{p}/{p}-01.xml", regions=True)
            with store.unit_writer(f"monusac-{p}", "monusac", fingerprint=p, origin="/src") as w:
                w.add(it)
                w.commit()
    return store


def add_round(store: Store, *, flag_unreviewed: bool = True) -> dict[str, int]:
    """Round 1: auto-accept Lymphocyte for PanNuke Inflammatory nuclei, flag one Neoplastic."""
    nuc = store.nuclei()
    started = store.ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "started",
                                    "payload": {"seed": 0}}])[0]
    infl = nuc[nuc["source_label"] == "Inflammatory"]["nucleus_id"].tolist()
    probs = [0.05, 0.8, 0.05, 0.02, 0.03, 0.03, 0.02]
    store.ledger.append([{"kind": "proposal", "round": 1, "nucleus_id": n, "actor": "relabel:r1:m", "action": "auto_accepted",
                          "label": 2, "score": 0.8, "ref": started, "payload": {"probs": probs}} for n in infl])
    neo = int(nuc[nuc["source_label"] == "Neoplastic"]["nucleus_id"].iloc[0])
    flag_probs = [0.1, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0]
    flag = store.ledger.append([{"kind": "flag", "round": 1, "nucleus_id": neo, "actor": "relabel:r1:m",
                                 "action": "confident_disagreement", "label": 5, "prev_label": 1, "score": 0.9,
                                 "ref": started, "payload": {"probs": flag_probs}}])[0]
    store.ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "finished", "ref": started}])
    if not flag_unreviewed:
        store.ledger.append([{"kind": "decision", "nucleus_id": neo, "actor": "alice", "action": "set_class",
                              "label": 5, "prev_label": 1, "round": 1, "ref": flag, "payload": {"source": "csv"}}])
    return {"flagged": neo, "started": started}


@pytest.fixture()
def store(tmp_path):
    s = build_test_store(tmp_path / "store")
    yield s
    s.close()


def _export(store, version="v1", **kw):
    from cellcurate.curation.release import export_release

    kw.setdefault("progress", False)
    return export_release(store, version, **kw)


# -- tests ------------------------------------------------------------------------------------------
def test_export_layout_counts_and_provenance(store, tmp_path):
    info = add_round(store, flag_unreviewed=False)
    res = _export(store, out=tmp_path / "rel")
    rel = tmp_path / "rel" / "v1"
    assert res.path == rel
    for name in ("manifest.json", "MANIFEST.sha256", "nuclei.parquet", "images.parquet", "taxonomy.json",
                 "DATASET_CARD.md", "class_distribution.png", "arrays.zarr/zarr.json"):
        assert (rel / name).is_file(), name
    m = json.loads((rel / "manifest.json").read_text())
    assert m["version"] == "v1" and m["licence"] == "CC BY-NC-SA 4.0" and len(m["attribution"]) == 2
    assert m["store"]["ledger_seq"] == store.ledger.head()[0]
    assert m["store"]["ledger_chain"] == store.ledger.head()[1]
    assert m["store"]["taxonomy_hash"] == store.taxonomy.hash
    assert m["review"] == {"allow_unreviewed": False, "unreviewed_flags": 0}
    # splits: fold1 (2 tiles), fold3 (1 tile), MoNuSAC: 3 train patients -> 1 val, 2 train; test 1
    assert m["splits"]["n_images"] == {"fold1": 2, "fold3": 1, "train": 2, "val": 1, "test": 1}
    # fold1: 2 tiles x (Neoplastic 2 + Lymphocyte 1 + Connective 1), the flagged nucleus set to Epithelial
    assert m["counts"]["fold1"]["Neoplastic"] + m["counts"]["fold1"]["Epithelial"] == 4
    assert m["counts"]["fold1"]["Lymphocyte"] == 2 and m["counts"]["fold1"]["Connective"] == 2
    assert m["counts"]["total"]["Epithelial"] == 1
    # MoNuSAC Epithelial is unresolved (two candidates): ignore; Ambiguous: ignore region
    assert m["ignore_counts"]["total"] == {"rejected": 0, "unresolved": 4, "conflict": 0, "ambiguous": 1}
    assert m["counts"]["total"]["Lymphocyte"] == 2 + 1 + 4  # PanNuke auto-accepted + fold3 + MoNuSAC
    nuc = pd.read_parquet(rel / "nuclei.parquet")
    flagged = nuc[nuc["nucleus_id"] == info["flagged"]].iloc[0]
    assert flagged["decided"] == "reviewed" and flagged["decided_by"] == "alice" and flagged["decided_round"] == 1
    assert flagged["label"] == 5 and flagged["issue_score"] == pytest.approx(0.9)
    assert list(flagged["probs"]) == pytest.approx([0.1, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0])
    auto = nuc[nuc["source_label"] == "Inflammatory"]
    assert set(auto["decided"]) == {"auto_accepted"} and set(auto["class_value"]) == {2}
    mo = nuc[nuc["source"] == "monusac"]
    assert mo["origin_region"].ne("").all() and mo["origin_file"].str.endswith(".xml").all()
    assert nuc.loc[nuc["source_label"] == "Connective", "probs"].isna().all()  # no round output: null


def test_class_maps_ignore_regions_never_background(store, tmp_path):
    import zarr

    _export(store, out=tmp_path / "rel", allow_unreviewed=True)
    rel = tmp_path / "rel" / "v1"
    images = pd.read_parquet(rel / "images.parquet")
    nuc = pd.read_parquet(rel / "nuclei.parquet")
    for r in images.itertuples():
        g = rel / "arrays.zarr" / r.zarr_group
        sel = r.zarr_index if r.zarr_index >= 0 else Ellipsis
        ins = zarr.open_array(str(g / "instances"), mode="r")[sel]
        cls = zarr.open_array(str(g / "classes"), mode="r")[sel]
        img = zarr.open_array(str(g / "image"), mode="r")[sel]
        s_img, s_ins = store.read(r.image_id)
        assert np.array_equal(ins, s_ins) and np.array_equal(img, s_img)
        assert cls.dtype == np.uint8 and np.array_equal(cls == 0, ins == 0)
        for n in nuc[nuc["image_id"] == r.image_id].itertuples():
            assert set(np.unique(cls[ins == n.instance_id])) == {n.class_value}
    amb = nuc[nuc["kind"] == "ignore"]
    assert len(amb) == 1 and amb["class_value"].iloc[0] == 255 and amb["ignore_reason"].iloc[0] == "ambiguous"


def test_rejected_nucleus_is_ignore_and_counted(store, tmp_path):
    nid = int(store.nuclei().query("source_label == 'Connective'")["nucleus_id"].iloc[0])
    store.ledger.append([{"kind": "decision", "nucleus_id": nid, "actor": "bob", "action": "not_nucleus",
                          "label": -1, "prev_label": 3, "payload": {"source": "csv"}}])
    res = _export(store, out=tmp_path / "rel")
    assert res.manifest["ignore_counts"]["total"]["rejected"] == 1
    nuc = pd.read_parquet(res.path / "nuclei.parquet").set_index("nucleus_id")
    assert nuc.loc[nid, "class_value"] == 255 and nuc.loc[nid, "decided"] == "rejected"


def test_refuses_unreviewed_flags_unless_allowed(store, tmp_path):
    add_round(store, flag_unreviewed=True)
    with pytest.raises(StateError, match="1 flagged nuclei are not reviewed"):
        _export(store, out=tmp_path / "rel")
    assert not (tmp_path / "rel" / "v1").exists()
    assert not [p for p in (tmp_path / "rel").iterdir()] if (tmp_path / "rel").exists() else True
    res = _export(store, out=tmp_path / "rel", allow_unreviewed=True)
    assert res.manifest["review"] == {"allow_unreviewed": True, "unreviewed_flags": 1}


def test_undone_decision_makes_flag_unreviewed_again(store):
    from cellcurate.curation.release import unreviewed_flags

    info = add_round(store, flag_unreviewed=False)
    assert unreviewed_flags(store).empty
    ev = store.ledger.events(kinds=["decision"])
    dec = int(ev["seq"].iloc[-1])
    store.ledger.append([{"kind": "decision", "nucleus_id": info["flagged"], "actor": "alice", "action": "undo",
                          "ref": dec}])
    assert unreviewed_flags(store)["nucleus_id"].tolist() == [info["flagged"]]
    # a superseded run's flags leave the queue
    store.ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "superseded",
                          "ref": info["started"]}])
    assert unreviewed_flags(store).empty


def test_existing_version_is_refused_and_untouched(store, tmp_path):
    res = _export(store, out=tmp_path / "rel")
    before = (res.path / "manifest.json").read_bytes()
    with pytest.raises(StateError, match="already exists"):
        _export(store, out=tmp_path / "rel")
    assert (res.path / "manifest.json").read_bytes() == before
    assert [p.name for p in (tmp_path / "rel").iterdir()] == ["v1"]  # no temp folder left


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "v 1", ".hidden"])
def test_bad_version_names(store, tmp_path, bad):
    with pytest.raises(ConfigError, match="release version"):
        _export(store, bad, out=tmp_path / "rel")


def test_release_files_are_read_only_and_verify_passes(store, tmp_path):
    from cellcurate.curation.release import verify_release

    res = _export(store, out=tmp_path / "rel")
    mode = (res.path / "nuclei.parquet").stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert verify_release(res.path) == []


def _flip_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["nuclei.parquet", "chunk", "DATASET_CARD.md", "manifest.json"])
def test_verify_names_the_tampered_file(store, tmp_path, target):
    from cellcurate.curation.release import verify_release

    res = _export(store, out=tmp_path / "rel")
    rel = res.path
    if target == "chunk":
        chunks = sorted(p for p in (rel / "arrays.zarr").rglob("*") if p.is_file() and "/c/" in p.as_posix())
        path = chunks[len(chunks) // 2]
    else:
        path = rel / target
    _flip_byte(path, len(path.read_bytes()) // 2)
    problems = verify_release(rel)
    rel_name = path.relative_to(rel).as_posix()
    assert problems and problems[0].startswith(rel_name), problems
    if target != "manifest.json":  # a changed manifest may also disagree with the file it altered
        assert len(problems) == 1, problems


def test_verify_reports_missing_and_added_files(store, tmp_path):
    from cellcurate.curation.release import verify_release

    rel = _export(store, out=tmp_path / "rel").path
    os.chmod(rel / "DATASET_CARD.md", 0o644)
    (rel / "DATASET_CARD.md").unlink()
    (rel / "extra.txt").write_text("x")
    problems = verify_release(rel)
    assert "DATASET_CARD.md: missing" in problems
    assert "extra.txt: not listed in the manifest (added)" in problems


def test_export_is_deterministic_in_content(store, tmp_path):
    a = _export(store, "a", out=tmp_path / "rel")
    b = _export(store, "b", out=tmp_path / "rel")
    fa, fb = a.manifest["files"], b.manifest["files"]
    for name in ("nuclei.parquet", "images.parquet", "taxonomy.json"):
        assert fa[name]["sha256"] == fb[name]["sha256"], name
    zarr_a = {k: v["sha256"] for k, v in fa.items() if k.startswith("arrays.zarr/")}
    zarr_b = {k: v["sha256"] for k, v in fb.items() if k.startswith("arrays.zarr/")}
    assert zarr_a == zarr_b


def test_diff_lists_label_changes_per_class_pair(store, tmp_path):
    from cellcurate.curation.release import diff_releases

    a = _export(store, "v1", out=tmp_path / "rel")
    info = add_round(store, flag_unreviewed=False)  # Inflammatory -> Lymphocyte, one Neoplastic -> Epithelial
    b = _export(store, "v2", out=tmp_path / "rel")
    d = diff_releases(a.path, b.path)
    pairs = {(r.from_class, r.to_class): r.count for r in d.pairs.itertuples()}
    assert pairs == {("ignore", "Lymphocyte"): 3, ("Neoplastic", "Epithelial"): 1}
    assert info["flagged"] in set(d.changes["nucleus_id"])
    assert d.added.size == 0 and d.removed.size == 0 and d.n_common == len(store.nuclei())


def test_store_content_hash_ignores_labels_but_not_units(store, tmp_path):
    from cellcurate.curation.release import store_content_hash

    h0 = store_content_hash(store)
    add_round(store)
    assert store_content_hash(store) == h0
    with store.unit_writer("monusac-extra", "monusac", fingerprint="x", origin="/src") as w:
        w.add(_item("TCGA-CC-0001/TCGA-CC-0001-01", "train", ["Lymphocyte"], patient="TCGA-CC-0001", regions=True,
                    origin_file="train/x.xml"))
        w.commit()
    assert store_content_hash(store) != h0


@pytest.mark.slow
def test_cli_export_verify_diff(store, tmp_path):
    from click.testing import CliRunner

    from cellcurate.cli.main import cli

    path = store.path
    store.close()
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(path), "--version", "v1", "--out", str(tmp_path / "rel")])
    assert r.exit_code == 0, r.output
    assert "v1" in r.output
    r = runner.invoke(cli, ["export", str(path), "--version", "v1", "--out", str(tmp_path / "rel")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(cli, ["verify", str(tmp_path / "rel" / "v1")])
    assert r.exit_code == 0, r.output
    import shutil

    shutil.copytree(tmp_path / "rel" / "v1", tmp_path / "tampered")
    _flip_byte(tmp_path / "tampered" / "images.parquet", 100)
    r = runner.invoke(cli, ["verify", str(tmp_path / "tampered")])
    assert r.exit_code == 1 and "images.parquet: sha256 differs" in r.output, r.output
    r = runner.invoke(cli, ["export", str(path), "--version", "v2", "--out", str(tmp_path / "rel")])
    r = runner.invoke(cli, ["diff", str(tmp_path / "rel" / "v1"), str(tmp_path / "rel" / "v2")])
    assert r.exit_code == 0 and "0 label changes" in r.output, r.output
    r = runner.invoke(cli, ["diff", str(tmp_path / "rel" / "v1"), str(tmp_path / "rel" / "v2"), "--csv",
                            str(tmp_path / "d.csv")])
    assert r.exit_code == 0 and (tmp_path / "d.csv").is_file()
    # default --out: <store>/releases
    r = runner.invoke(cli, ["export", str(path), "--version", "v9"])
    assert r.exit_code == 0 and (path / "releases" / "v9" / "manifest.json").is_file()


# -- failures inside export (issue 10: shutil.rmtree(onexc=) does not exist on Python 3.11) ----------
def _failing_after_freeze(errno_: int):
    import cellcurate.curation.release as rel

    original = rel._fsync_and_freeze

    def fail(root):
        original(root)  # the release files are read-only now, as in a real late failure
        raise OSError(errno_, os.strerror(errno_), str(root / "manifest.json"))

    return fail


@pytest.mark.parametrize("errno_, message", [(28, "no space left on device"), (13, "Permission denied")])
def test_export_failure_gives_one_line_error_and_leaves_nothing(store, tmp_path, monkeypatch, errno_, message):
    from click.testing import CliRunner

    import cellcurate.curation.release as rel
    from cellcurate.cli.main import cli

    path = store.path
    store.close()
    monkeypatch.setattr(rel, "_fsync_and_freeze", _failing_after_freeze(errno_))
    out = tmp_path / "rel"
    r = CliRunner().invoke(cli, ["export", str(path), "--version", "v1", "--out", str(out)])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, TypeError)
    assert list(out.iterdir()) == []  # no .tmp-* folder, no release


def test_remove_tree_removes_frozen_trees_on_this_python(tmp_path):
    from cellcurate.core.atomic import remove_tree

    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    for p in (root / "a", root / "sub" / "b"):
        p.write_text("x")
        p.chmod(stat.S_IRUSR)
    (root / "sub").chmod(stat.S_IRUSR | stat.S_IXUSR)  # a read-only folder: its files cannot be unlinked
    remove_tree(root)
    assert not root.exists()
    remove_tree(root)  # absent: no error
# -- other readers: pyarrow only, Hugging Face datasets (issue 12) -----------------------------------
def test_tables_have_the_declared_arrow_types_and_join_with_pyarrow_only(store, tmp_path):
    """One string type across tables (before: image_id was string in nuclei.parquet and
    large_string in images.parquet, and a pyarrow join failed); all-null columns keep their type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cellcurate.datasets.release_format import release_schema

    rel = _export(store, out=tmp_path / "rel").path  # no round ran: probs and flag_reason all null
    nuclei, images = pq.read_table(rel / "nuclei.parquet"), pq.read_table(rel / "images.parquet")
    assert nuclei.schema.equals(release_schema("nuclei")) and images.schema.equals(release_schema("images"))
    probs = nuclei.schema.field("probs").type
    assert pa.types.is_list(probs) and probs.value_type == pa.float64()
    assert str(nuclei.schema.field("flag_reason").type) == "string"
    # (pyarrow's hash join cannot carry list columns, so probs is left out of this one)
    joined = nuclei.drop_columns(["probs"]).join(images, keys=["image_id", "split"], right_suffix="_image")
    assert joined.num_rows == nuclei.num_rows and "mpp" in joined.column_names


def test_release_format_doc_lists_every_column_with_its_type():
    from cellcurate.datasets.release_format import RELEASE_TABLES, release_table_types

    doc = (Path(__file__).resolve().parents[1] / "docs" / "RELEASE_FORMAT.md").read_text()
    for table in RELEASE_TABLES:
        section = doc.split(f"### {table}.parquet", 1)[1].split("\n### ", 1)[0]
        rows = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in section.splitlines() if r.startswith("| ")}
        for col, typ in release_table_types(table).items():
            assert rows.get(col) == typ, f"{table}.parquet {col}: doc says {rows.get(col)!r}, table has {typ!r}"


def test_hugging_face_datasets_loads_the_release_folder(store, tmp_path, monkeypatch):
    """`datasets.load_dataset(folder)` reads the README.md configs (before: it picked the JSON
    builder on zarr.json and failed)."""
    datasets = pytest.importorskip("datasets")
    from cellcurate.curation.release import verify_release

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    res = _export(store, out=tmp_path / "rel")
    assert "README.md" in res.manifest["files"] and verify_release(res.path) == []
    assert (res.path / "README.md").read_text().startswith("---\nlicense: cc-by-nc-sa-4.0\n")
    nuc = datasets.load_dataset(str(res.path), cache_dir=str(tmp_path / "hf-cache"))
    table = pd.read_parquet(res.path / "nuclei.parquet")
    assert set(nuc) == set(res.manifest["splits"]["n_images"])
    for split, ds in nuc.items():
        want = table[table["split"] == split]
        assert ds.num_rows == len(want) and sorted(ds["nucleus_id"]) == sorted(want["nucleus_id"])
    assert nuc["fold1"].features["probs"].feature.dtype == "float64"
    img = datasets.load_dataset(str(res.path), "images", cache_dir=str(tmp_path / "hf-cache"))
    assert {s: d.num_rows for s, d in img.items()} == res.manifest["splits"]["n_images"]
