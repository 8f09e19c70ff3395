"""Shared fixtures. GUI tests run headless (QT_QPA_PLATFORM=offscreen)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"real third-party fixtures not found at {FIXTURES}")
    return FIXTURES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: gpu tests cannot run either way
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory: pytest.TempPathFactory):
    """The `tiny` synthetic sample (PanNuke + MoNuSAC release formats + truth.parquet). Read-only."""
    from cellcurate.datasets.synthetic import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "sample", preset="tiny", seed=0, flip_fraction=0.10)


@pytest.fixture(scope="session")
def tiny_store_path(tiny_sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with both sources of the tiny sample ingested. Treat as read-only: copy it to modify
    (``shutil.copytree(tiny_store_path, tmp_path / "store")``)."""
    from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
    from cellcurate.datasets.store import Store

    path = tmp_path_factory.mktemp("store") / "store"
    with Store.create(path) as store:
        ingest_pannuke(store, tiny_sample.pannuke_root, progress=False)
        ingest_monusac(store, tiny_sample.monusac_root, progress=False)
    return path
