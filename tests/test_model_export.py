"""Model export: TorchScript and ONNX with metadata; onnxruntime outputs match PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellcurate.errors import InputFormatError, ModelError
from cellcurate.models.export import (
    check_onnx,
    check_torchscript,
    export_onnx,
    export_torchscript,
    load_torchscript,
    read_onnx_metadata,
)
from cellcurate.models.predict import load_for_inference

META = {
    "kind": "test",
    "architecture": "two-conv",
    "classes": ["Background", "Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil"],
    "colors": ["#000000", "#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#42d4f4", "#f032e6"],
    "mpp": 0.25,
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


class TwoConv(torch.nn.Module):
    """The smallest model that obeys the package contract."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.register_buffer("mean", torch.tensor(META["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(META["std"]).view(1, 3, 1, 1))
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.meta = dict(META)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1((x - self.mean) / self.std)))
        return {"np": y[:, :2], "hv": torch.tanh(y[:, 2:4]), "tp": y[:, 4:]}


@pytest.fixture()
def tiny():
    return TwoConv().eval()


def test_onnx_roundtrip_matches_and_keeps_metadata(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "m.onnx")
    assert check_onnx(tiny, path) < 1e-5
    meta = read_onnx_metadata(path)
    assert meta["classes"] == META["classes"] and meta["mpp"] == 0.25 and meta["mean"] == META["mean"]
    assert meta["format"] == "onnx" and meta["output_names"] == ["np", "hv", "tp"]


def test_onnx_named_outputs_and_dynamic_axes(tiny, tmp_path):
    import onnxruntime as ort

    path = export_onnx(tiny, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["np", "hv", "tp"]
    x = np.random.default_rng(0).random((3, 3, 96, 160), dtype=np.float32)
    np_out, hv_out, tp_out = sess.run(None, {"image": x})
    assert np_out.shape == (3, 2, 96, 160) and hv_out.shape == (3, 2, 96, 160) and tp_out.shape == (3, 8, 96, 160)
    with torch.inference_mode():
        ref = tiny(torch.from_numpy(x))
    np.testing.assert_allclose(tp_out, ref["tp"].numpy(), atol=1e-4)


def test_torchscript_roundtrip_keeps_dict_outputs_and_metadata(tiny, tmp_path):
    path = export_torchscript(tiny, tmp_path / "m.torchscript.pt")
    assert check_torchscript(tiny, path) == 0.0
    loaded = load_torchscript(path)
    assert loaded.meta["architecture"] == "two-conv" and loaded.meta["format"] == "torchscript"
    out = loaded(torch.rand(2, 3, 32, 96))
    assert sorted(out) == ["hv", "np", "tp"] and out["tp"].shape == (2, 8, 32, 96)


def test_check_raises_when_outputs_differ(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "m.onnx")
    other = TwoConv(seed=1).eval()
    with pytest.raises(ModelError, match="differ from PyTorch"):
        check_onnx(other, path)
    ts = export_torchscript(tiny, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="differ from PyTorch"):
        check_torchscript(other, ts, atol=1e-6)


def test_loaded_onnx_behaves_like_a_model(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "m.onnx")
    model = load_for_inference(path)
    assert model.meta["input_size"] == 64
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x)["hv"], tiny(x)["hv"], atol=1e-5)


@pytest.mark.parametrize(
    "content, loader, match",
    [
        (b"not a model", read_onnx_metadata, "ONNX"),
        (b"not a model", load_torchscript, "TorchScript"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, loader, match):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(InputFormatError, match=match) as info:
        loader(path)
    assert "\n" not in str(info.value) and "bad.bin" in str(info.value)


@pytest.mark.slow
def test_real_student_exports_within_tolerance(tmp_path):
    student_mod = pytest.importorskip("cellcurate.models.student")
    torch.manual_seed(0)
    student = student_mod.Student(channels=(8, 16, 32, 64, 64)).eval()
    onnx_path = export_onnx(student, tmp_path / "s.onnx")
    assert check_onnx(student, onnx_path, atol=1e-4) <= 1e-4
    ts_path = export_torchscript(student, tmp_path / "s.pt")
    assert check_torchscript(student, ts_path) <= 1e-5
    meta = read_onnx_metadata(onnx_path)
    assert meta["kind"] == "student" and meta["input_size"] == student.meta["input_size"]


@pytest.mark.slow
def test_cli_export_model_from_checkpoint(tmp_path):
    student_mod = pytest.importorskip("cellcurate.models.student")
    checkpoint = pytest.importorskip("cellcurate.models.checkpoint")
    from cellcurate.cli.export_model import command

    torch.manual_seed(0)
    student = student_mod.Student(channels=(8, 16, 32, 64, 64)).eval()
    ckpt = checkpoint.save_checkpoint(tmp_path / "student", student, config={"seed": 0}, epoch=1, metrics={})
    out = tmp_path / "exported"
    res = CliRunner().invoke(command, [str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "max |onnxruntime - torch|" in res.output and "max |torchscript - torch|" in res.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"][1] == "Neoplastic" and meta["mpp"] == 0.25
    # every form loads for inference and agrees
    x = torch.rand(1, 3, 64, 64)
    outs = [load_for_inference(p)(x)["np"] for p in (ckpt, out / "model.onnx", out / "model.torchscript.pt")]
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_cli_export_model_rejects_unknown_format(tmp_path):
    from cellcurate.cli.export_model import command

    res = CliRunner().invoke(command, [str(tmp_path), "--out", str(tmp_path / "o"), "--format", "tflite"])
    assert res.exit_code == 2 and "onnx, torchscript" in res.output


def test_check_reports_shapes_frozen_at_export(tmp_path):
    class Frozen(TwoConv):
        def forward(self, x):
            out = super().forward(x)
            h, w = int(x.shape[-2]), int(x.shape[-1])  # tracing turns these into constants
            return {k: v.reshape(v.shape[0], v.shape[1], h * w).reshape(v.shape[0], v.shape[1], h, w) for k, v in out.items()}

    model = Frozen().eval()
    path = export_torchscript(model, tmp_path / "frozen.pt")
    with pytest.raises(ModelError, match="fails on input"):
        check_torchscript(model, path)


# -- bioimage.io, file modes (issue 12) ---------------------------------------------------------
def test_bioimageio_rdf_validates_with_bioimageio_spec(tiny, tmp_path):
    spec = pytest.importorskip("bioimageio.spec")
    from cellcurate.models.export import write_bioimageio_rdf

    out = tmp_path / "bmz"
    onnx_path = export_onnx(tiny, out / "model.onnx")
    ts_path = export_torchscript(tiny, out / "model.torchscript.pt")
    rdf = write_bioimageio_rdf(out, tiny, weights={"onnx": onnx_path, "torchscript": ts_path})
    descr = spec.load_description(rdf, perform_io_checks=True)  # checks every file's sha256 too
    summary = descr.validation_summary
    assert summary.status in ("valid-format", "passed"), summary.format()
    assert str(descr.format_version).startswith("0.5") and descr.type == "model"
    (inp,) = descr.inputs
    assert str(inp.id) == "image" and [str(a.id) for a in inp.axes] == ["batch", "channel", "y", "x"]
    assert inp.axes[2].scale == pytest.approx(0.25) and inp.axes[2].unit == "micrometer"
    assert [str(o.id) for o in descr.outputs] == ["np", "hv", "tp"]
    assert descr.weights.onnx is not None and descr.weights.torchscript is not None
    assert descr.weights.onnx.opset_version == 17
    # the test tensors are what the weights give: run the ONNX file on test_input.npy
    import onnxruntime as ort

    x = np.load(out / "test_input.npy")
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(["tp"], {"image": x})[0]
    assert np.allclose(got, np.load(out / "test_output_tp.npy"), atol=1e-4)


def test_bioimageio_rdf_refuses_weights_outside_the_folder(tiny, tmp_path):
    from cellcurate.models.export import write_bioimageio_rdf

    onnx_path = export_onnx(tiny, tmp_path / "elsewhere" / "model.onnx")
    with pytest.raises(ModelError, match="must be a file inside"):
        write_bioimageio_rdf(tmp_path / "bmz", tiny, weights={"onnx": onnx_path})


def test_exported_files_are_readable_by_others(tiny, tmp_path):
    """Mode 0644 (before: 0600, mkstemp's mode, kept by the rename)."""
    import stat

    for path in (export_onnx(tiny, tmp_path / "m.onnx"), export_torchscript(tiny, tmp_path / "m.pt")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
def test_exported_student_pads_sides_that_are_not_multiples_of_32(tmp_path):
    """An input PyTorch refuses (sides not multiples of 32) must not give silent garbage through
    onnxruntime or TorchScript: the exported graph pads it and crops the outputs back."""
    import onnxruntime as ort
    import torch.nn.functional as F

    from cellcurate.errors import ConfigError
    from cellcurate.models.student import Student

    torch.manual_seed(0)
    student = Student(channels=(8, 16, 32, 64, 64), tile_size=64).eval()
    x = torch.rand(1, 3, 70, 50)
    with pytest.raises(ConfigError, match="multiple of 32"):
        student(x)
    with torch.no_grad():
        ref = student(F.pad(x, [0, 14, 0, 26], mode="replicate"))  # 96×64, cropped back to 70×50
    session = ort.InferenceSession(str(export_onnx(student, tmp_path / "s.onnx")), providers=["CPUExecutionProvider"])
    outs = dict(zip(["np", "hv", "tp"], session.run(None, {"image": x.numpy()})))
    scripted = load_torchscript(export_torchscript(student, tmp_path / "s.pt"))
    with torch.no_grad():
        ts = scripted(x)
    for name in ("np", "hv", "tp"):
        want = ref[name][..., :70, :50].numpy()
        assert outs[name].shape == want.shape
        np.testing.assert_allclose(outs[name], want, atol=1e-4)
        np.testing.assert_allclose(ts[name].numpy(), want, atol=1e-5)
