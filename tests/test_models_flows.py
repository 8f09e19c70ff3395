"""Cellpose flows: targets, flow following, the flow head through predict, training and export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcurate.errors import ConfigError
from cellcurate.models.flows import (
    FlowConfig,
    FlowTileDataset,
    flow_targets,
    instances_from_flows,
)
from cellcurate.models.postprocess import PostprocessConfig, postprocess_outputs
from cellcurate.models.targets import IGNORE

pytest.importorskip("cellpose")

CENTRES = ((20, 20), (40, 44))
RADII = (8, 9)


def _two_discs(h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((h, w), np.int32)
    for k, ((cy, cx), r) in enumerate(zip(CENTRES, RADII), start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k * 3  # ids 3 and 6: not contiguous
    return inst


def test_flows_of_two_discs_point_to_their_centres():
    inst = _two_discs()
    f = flow_targets(inst)
    assert f.shape == (2, 64, 64) and f.dtype == np.float32
    assert np.all(f[:, inst == 0] == 0)
    norm = np.hypot(f[0], f[1])
    off = (inst > 0) & (np.abs(norm - 1) > 1e-5)  # at most the diffusion source: the centre pixel
    assert set(zip(*(v.tolist() for v in np.nonzero(off)))) <= set(CENTRES)
    yy, xx = np.mgrid[:64, :64]
    for k, (cy, cx) in zip((3, 6), CENTRES):
        m = (inst == k) & (np.hypot(yy - cy, xx - cx) >= 2)
        dot = f[0][m] * (cx - xx[m]) + f[1][m] * (cy - yy[m])  # flow · (centre - pixel)
        assert (dot > 0).all()
    # on the horizontal through a centre, the x-flow is exactly +1 left of it and -1 right of it
    assert f[0, 20, 13] == pytest.approx(1.0) and f[0, 20, 27] == pytest.approx(-1.0)
    assert f[1, 13, 20] == pytest.approx(1.0) and f[1, 27, 20] == pytest.approx(-1.0)


def test_following_the_flows_recovers_the_two_discs():
    inst = _two_discs()
    got = instances_from_flows((inst > 0).astype(np.float32), flow_targets(inst))
    assert got.dtype == np.int32 and got.max() == 2
    for k in (3, 6):
        ids = np.unique(got[inst == k])
        assert len(ids) == 1 and ids[0] > 0
        assert np.array_equal(got == ids[0], inst == k)  # the same pixels, exactly


def test_empty_maps_and_bad_shapes():
    assert not flow_targets(np.zeros((8, 8), np.int32)).any()
    assert instances_from_flows(np.zeros((8, 8)), np.zeros((2, 8, 8))).max() == 0
    with pytest.raises(ConfigError, match="flow"):
        instances_from_flows(np.zeros((8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ConfigError, match="threshold"):
        FlowConfig(threshold=1.5)


def test_postprocess_dispatches_on_the_head_and_votes_classes():
    inst = _two_discs()
    tp = np.zeros((8, 64, 64), np.float32)
    tp[0] = 1.0
    tp[:, inst == 3] = np.eye(8, dtype=np.float32)[2][:, None]
    tp[:, inst == 6] = np.eye(8, dtype=np.float32)[5][:, None]
    post = postprocess_outputs((inst > 0).astype(np.float32), flow_targets(inst), tp, head="flow",
                               config=PostprocessConfig(min_area=5))
    assert post.n == 2 and sorted(post.classes.tolist()) == [2, 5]
    with pytest.raises(ConfigError, match="unknown model head"):
        postprocess_outputs(np.zeros((4, 4)), np.zeros((2, 4, 4)), np.zeros((8, 4, 4)), head="star")


class FlowOracle(torch.nn.Module):
    """Returns the exact maps of one known image: nucleus logits, Cellpose flows and types."""

    def __init__(self, inst: np.ndarray, classes: dict[int, int]) -> None:
        super().__init__()
        self.meta = {"mpp": 0.25, "head": "flow"}
        fg = torch.from_numpy(inst > 0).float()
        self.np_ = torch.stack([-10 * fg + 5, 10 * fg - 5])
        self.hv = torch.from_numpy(flow_targets(inst))
        tp = torch.full((8,) + inst.shape, -10.0)
        tp[0] = 10.0
        for k, c in classes.items():
            tp[0][torch.from_numpy(inst == k)] = -10.0
            tp[c][torch.from_numpy(inst == k)] = 10.0
        self.tp = tp

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, _, h, w = x.shape
        return {"np": self.np_[:, :h, :w].expand(b, -1, -1, -1), "hv": self.hv[:, :h, :w].expand(b, -1, -1, -1),
                "tp": self.tp[:, :h, :w].expand(b, -1, -1, -1)}


def test_predict_image_follows_the_flows_of_a_flow_model():
    from cellcurate.models.predict import predict_image

    inst = _two_discs()
    pred = predict_image(FlowOracle(inst, {3: 1, 6: 4}), np.zeros((64, 64, 3), np.uint8), tile=64, overlap=0)
    assert len(pred.nuclei) == 2
    assert sorted(pred.nuclei["class_id"].tolist()) == [1, 4]
    assert sorted(pred.nuclei["area"].tolist()) == sorted(int((inst == k).sum()) for k in (3, 6))


class _Release(torch.utils.data.Dataset):
    def __init__(self) -> None:
        inst = _two_discs()
        cls = np.where(inst > 0, 2, 0).astype(np.uint8)
        cls[:, 40:] = np.where(cls[:, 40:] > 0, IGNORE, cls[:, 40:])  # the second disc partly ignored
        self.item = {"image": torch.full((3, 64, 64), 200, dtype=torch.uint8), "instances": torch.from_numpy(inst),
                     "classes": torch.from_numpy(cls), "image_id": "two", "mpp": 0.25}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        return self.item


def test_flow_tiles_carry_flows_of_the_unignored_nuclei():
    tiles = FlowTileDataset(_Release(), tile_size=64, mode="grid", mpp=0.25)
    item = tiles[0]
    inst = _two_discs()
    cls = _Release().item["classes"].numpy()
    want = flow_targets(np.where(cls != IGNORE, inst, 0))
    assert torch.equal(item["hv"], torch.from_numpy(want))
    calls: list[int] = []
    tiles.tile_instances = lambda idx: calls.append(idx)  # type: ignore[method-assign]
    again = tiles[0]["hv"]  # computed once per grid tile, kept as float16
    assert calls == [] and again.dtype == torch.float32
    torch.testing.assert_close(again, item["hv"], atol=1e-3, rtol=0)
    assert not item["hv"][:, cls == IGNORE].any()


class _Discs(torch.utils.data.Dataset):
    """Four 64-px images of 5 random discs each (3 classes)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:64, :64]
        self.items = []
        for i in range(4):
            inst = np.zeros((64, 64), np.int32)
            cls = np.zeros((64, 64), np.uint8)
            image = np.full((3, 64, 64), 235, np.uint8)
            for k in range(1, 6):
                r = int(rng.integers(5, 8))
                cy, cx = (int(v) for v in rng.integers(r, 64 - r, 2))
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                c = int(rng.integers(1, 4))
                inst[disc], cls[disc] = k, c
                image[:, disc] = np.array([(110, 40, 150), (40, 20, 90), (190, 110, 180)][c - 1], np.uint8)[:, None]
            self.items.append({"image": torch.from_numpy(image), "instances": torch.from_numpy(inst),
                               "classes": torch.from_numpy(cls), "image_id": f"d{i}", "mpp": 0.25})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.mark.slow
def test_distil_and_export_the_mobilevit_flow_student(tmp_path):
    import onnxruntime as ort
    import torch.nn.functional as F

    from cellcurate.models.checkpoint import load_model
    from cellcurate.models.export import (
        check_onnx,
        check_torchscript,
        export_onnx,
        export_torchscript,
    )
    from cellcurate.models.student import Student, StudentConfig
    from cellcurate.models.teacher import TeacherConfig
    from cellcurate.models.train import TrainConfig, distill, train_teacher

    cfg = TrainConfig(epochs=1, batch_size=3, lr=5e-3, tile_size=64, progress=False, device="cpu")
    train_teacher(_Discs(), out_dir=tmp_path / "t", encoder="micro-vit",
                  teacher_config=TeacherConfig(decoder_channels=(16, 16, 8, 8, 8), tile_size=64), config=cfg)
    scfg = StudentConfig(channels=(32, 24, 16, 16, 8), encoder="mobilevit_xxs", head="flow", tile_size=64)
    result = distill(tmp_path / "t", _Discs(), out_dir=tmp_path / "s", student_config=scfg, config=cfg)
    assert len(result.history) == 1 and np.isfinite(result.history[-1]["loss"])
    assert {"kd_hv", "hv_mse", "consistency"} <= set(result.history[0])
    student = load_model(tmp_path / "s")
    assert isinstance(student, Student) and student.meta["head"] == "flow" and student.config.encoder == "mobilevit_xxs"

    onnx_path = export_onnx(student, tmp_path / "flow.onnx")
    assert check_onnx(student, onnx_path, atol=1e-4) <= 1e-4  # incl. a 57×53 input against PyTorch, padded
    assert check_torchscript(student, export_torchscript(student, tmp_path / "flow.pt"), atol=1e-4) <= 1e-4
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 100, 70)
    _, hv_out, _ = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = student(F.pad(x, [0, 58, 0, 28], mode="replicate"))  # up to 128×128: multiples of 64
    assert hv_out.shape == (1, 2, 100, 70)
    np.testing.assert_allclose(hv_out, ref["hv"][..., :100, :70].numpy(), atol=1e-4)
