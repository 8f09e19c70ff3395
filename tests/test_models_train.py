"""Tiles, caches, teacher training and distillation on synthetic discs (tiny models, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellcurate.errors import ConfigError, StateError
from cellcurate.models.checkpoint import load_model
from cellcurate.models.data import TileCache, TileDataset, augment_batch, collate_tiles, stain_jitter
from cellcurate.models.student import Student, StudentConfig, TINY_STUDENT_CHANNELS
from cellcurate.models.targets import IGNORE
from cellcurate.models.teacher import TeacherConfig, build_teacher
from cellcurate.models.train import TrainConfig, distill, train_teacher

TILE = 64
SMALL = TeacherConfig(decoder_channels=(16, 16, 8, 8, 8), tile_size=TILE)


def _discs(n: int, h: int, w: int, rng: np.random.Generator, image_id: str) -> dict:
    yy, xx = np.mgrid[:h, :w]
    image = np.full((3, h, w), 235, np.uint8)
    inst = np.zeros((h, w), np.int32)
    cls = np.zeros((h, w), np.uint8)
    colours = {1: (110, 40, 150), 2: (40, 20, 90), 3: (190, 110, 180)}
    for k in range(1, n + 1):
        r = int(rng.integers(4, 7))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        c = int(rng.integers(1, 4))
        inst[disc], cls[disc] = k, c
        image[:, disc] = np.array(colours[c], np.uint8)[:, None]
    cls[:6, :6] = IGNORE  # an ambiguous corner
    return {"image": torch.from_numpy(image), "instances": torch.from_numpy(inst),
            "classes": torch.from_numpy(cls), "image_id": image_id, "mpp": 0.25}


class Discs(torch.utils.data.Dataset):
    """Release-like items: discs of 3 classes on a pale background; sizes differ."""

    def __init__(self, sizes=((64, 64),) * 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.items = [_discs(6, h, w, rng, f"syn{i:02d}") for i, (h, w) in enumerate(sizes)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 5e-3, "tile_size": TILE, "progress": False,
                          "device": "cpu", **kw})


# -- tiles -----------------------------------------------------------------------------------------


def test_grid_tiles_cover_and_pad():
    base = Discs(sizes=((96, 80), (40, 50)))
    tiles = TileDataset(base, tile_size=TILE)
    assert [t[1:] for t in tiles.index] == [(0, 0), (0, 16), (32, 0), (32, 16), (0, 0)]
    small = tiles[4]
    assert small["image"].shape == (3, TILE, TILE) and small["tile_id"] == "syn01@0,0"
    assert not small["valid"][40:].any() and not small["valid"][:, 50:].any()
    assert (small["image"][:, 40:] == 255).all() and (small["np"][40:] == IGNORE).all()
    assert not small["valid"][:6, :6].any() and small["valid"][6:40, 6:50].all()
    again = TileDataset(base, tile_size=TILE)[1]
    assert again["key"] == tiles[1]["key"] and again["key"].startswith("syn00@0,16#")


def test_random_crops_follow_seed_and_epoch():
    base = Discs(sizes=((96, 96),) * 3)
    a = TileDataset(base, tile_size=TILE, mode="random", seed=1)
    b = TileDataset(base, tile_size=TILE, mode="random", seed=1)
    assert len(a) == 3 and a[0]["tile_id"] == b[0]["tile_id"]
    ids = set()
    for e in range(6):
        a.set_epoch(e)
        ids.add(a[0]["tile_id"])
    assert len(ids) > 1
    with pytest.raises(ConfigError, match="multiple of 32"):
        TileDataset(base, tile_size=50)


def test_other_pixel_size_is_resampled():
    item = _discs(4, 64, 64, np.random.default_rng(0), "half")
    item["mpp"] = 0.5
    tiles = TileDataset([item], tile_size=TILE, mpp=0.25)
    assert len(tiles) == 4  # 64 px at 0.5 µm/px -> 128 px at 0.25


def test_augment_keeps_targets_consistent_with_the_image():
    tiles = TileDataset(Discs(sizes=((64, 64),) * 4), tile_size=TILE)
    batch = collate_tiles([tiles[i] for i in range(4)])
    teacher = [torch.nn.functional.one_hot(batch["np"].clamp(max=1), 2).permute(0, 3, 1, 2).float(),
               batch["hv"].clone(), torch.zeros(4, 8, TILE, TILE)]
    aug, t_aug = augment_batch(batch, generator=torch.Generator().manual_seed(0), teacher=teacher, stain=False)
    pale = aug["image"].min(dim=1).values > 0.9
    assert ((aug["np"] == 1) & pale).sum() == 0  # nuclei stay where the dark discs went
    assert torch.equal(t_aug[0][:, 1].long(), aug["np"].clamp(max=1))
    torch.testing.assert_close(t_aug[1], aug["hv"])
    jittered = stain_jitter(aug["image"], generator=torch.Generator().manual_seed(1), sigma=0.1)
    assert jittered.shape == aug["image"].shape and 0 < (jittered - aug["image"]).abs().mean() < 0.1
    same = stain_jitter(aug["image"], sigma=0.0, bias=0.0)
    torch.testing.assert_close(same, aug["image"], atol=1e-4, rtol=0)


def test_tile_cache_memory_and_disk(tmp_path):
    for cache in (TileCache("ns"), TileCache("ns", directory=tmp_path)):
        cache.put("a@0,0#1", [torch.ones(2, 3), torch.zeros(4)])
        assert "a@0,0#1" in cache and "b" not in cache
        got = cache.get_batch(["a@0,0#1", "a@0,0#1"])
        assert got[0].shape == (2, 2, 3) and got[0].dtype == torch.float32 and got[1].shape == (2, 4)
    assert "a@0,0#1" in TileCache("ns", directory=tmp_path)  # survives a restart
    assert "a@0,0#1" not in TileCache("other", directory=tmp_path)


# -- training --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_teacher_encoder_runs_once_per_tile_and_loss_drops(tmp_path):
    torch.manual_seed(0)
    teacher = build_teacher("micro-vit", config=SMALL)
    seen: list[int] = []
    teacher.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    result = train_teacher(Discs(), out_dir=tmp_path / "t", model=teacher, config=_cfg(epochs=3))
    assert sum(seen) == 6  # 6 tiles, encoded once across 3 epochs
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    doc = json.loads((tmp_path / "t" / "config.json").read_text())
    assert doc["kind"] == "teacher" and doc["epoch"] == 3 and doc["training"]["seed"] == 0
    assert len(doc["metrics"]["history"]) == 3


@pytest.mark.slow
def test_teacher_disk_cache_is_reused(tmp_path):
    torch.manual_seed(0)
    teacher = build_teacher("micro-vit", config=SMALL)
    cfg = _cfg(epochs=1, cache_dir=str(tmp_path / "cache"))
    train_teacher(Discs(), out_dir=tmp_path / "a", model=teacher, config=cfg)
    seen: list[int] = []
    teacher.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    train_teacher(Discs(), out_dir=tmp_path / "b", model=teacher, config=cfg)
    assert seen == []


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    runs = [train_teacher(Discs(), out_dir=tmp_path / f"r{i}", encoder="micro-vit", teacher_config=SMALL,
                          config=_cfg(epochs=1, seed=7)) for i in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_teacher(Discs(), out_dir=tmp_path / "r2", encoder="micro-vit", teacher_config=SMALL,
                          config=_cfg(epochs=1, seed=8)).model.state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)


@pytest.mark.slow
def test_resume_continues_from_saved_epoch(tmp_path):
    full = train_teacher(Discs(), out_dir=tmp_path / "full", encoder="micro-vit", teacher_config=SMALL,
                         config=_cfg(epochs=2))
    train_teacher(Discs(), out_dir=tmp_path / "part", encoder="micro-vit", teacher_config=SMALL,
                  config=_cfg(epochs=1))
    with pytest.raises(StateError, match="already holds a checkpoint"):
        train_teacher(Discs(), out_dir=tmp_path / "part", encoder="micro-vit", teacher_config=SMALL,
                      config=_cfg(epochs=2))
    resumed = train_teacher(Discs(), out_dir=tmp_path / "part", encoder="micro-vit", teacher_config=SMALL,
                            config=_cfg(epochs=2), resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(StateError, match="nothing to resume"):
        train_teacher(Discs(), out_dir=tmp_path / "none", encoder="micro-vit", teacher_config=SMALL,
                      config=_cfg(), resume=True)


@pytest.mark.slow
def test_distill_student_from_teacher_checkpoint(tmp_path):
    train_teacher(Discs(), out_dir=tmp_path / "t", encoder="micro-vit", teacher_config=SMALL, config=_cfg(epochs=1))
    teacher = load_model(tmp_path / "t")
    seen: list[int] = []
    teacher.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    result = distill(teacher, Discs(), out_dir=tmp_path / "s",
                     student_config=StudentConfig(channels=TINY_STUDENT_CHANNELS, tile_size=TILE),
                     config=_cfg(epochs=3))
    assert sum(seen) == 6
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert {"kd_tp", "kd_hv", "kd_np", "kd_np_bt", "consistency", "np_tversky"} <= set(result.history[0])
    student = load_model(tmp_path / "s")
    assert isinstance(student, Student) and student.meta["mean"] == teacher.meta["mean"]
    x = torch.rand(1, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(student(x)["tp"], result.model(x)["tp"])
    # from the checkpoint folder, resuming one more epoch
    more = distill(tmp_path / "t", Discs(), out_dir=tmp_path / "s", config=_cfg(epochs=4), resume=True)
    assert [h["epoch"] for h in more.history] == [1, 2, 3, 4]


def test_cuda_requested_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        train_teacher(Discs(), out_dir=tmp_path, encoder="micro-vit", config=_cfg(device="cuda"))


@pytest.mark.slow
def test_cli_train_and_distill(tmp_path, monkeypatch):
    import sys
    import types

    from cellcurate.cli import distill as distill_cli
    from cellcurate.cli import train as train_cli

    fake = types.ModuleType("cellcurate.datasets.release")
    fake.load_release = lambda path, split="train", transform=None: Discs(sizes=((64, 64),) * 2)
    monkeypatch.setitem(sys.modules, "cellcurate.datasets.release", fake)
    runner = CliRunner()
    res = runner.invoke(train_cli.command, ["teacher", "--release", str(tmp_path), "--out", str(tmp_path / "t"),
                                            "--tiny", "--epochs", "1", "--tile-size", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "teacher:" in res.output and (tmp_path / "t" / "model.pt").is_file()
    res = runner.invoke(distill_cli.command, ["--teacher", str(tmp_path / "t"), "--release", str(tmp_path),
                                              "--out", str(tmp_path / "s"), "--tiny", "--epochs", "1",
                                              "--tile-size", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "config.json").read_text())["kind"] == "student"
    res = runner.invoke(train_cli.command, ["teacher", "--release", str(tmp_path), "--out", str(tmp_path / "x"),
                                            "--epochs", "1"])
    assert res.exit_code != 0 and "needs a local weights file" in str(res.exception)
