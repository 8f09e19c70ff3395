"""Encoders, teacher and student architectures, parameter counts, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from cellcurate.errors import ConfigError, ModelError
from cellcurate.models.checkpoint import load_model, save_checkpoint
from cellcurate.models.encoders import ENCODERS, build_encoder, resolve_encoder
from cellcurate.models.student import Student, StudentConfig, TINY_STUDENT_CHANNELS
from cellcurate.models.teacher import TeacherConfig, build_teacher, count_parameters

SMALL = TeacherConfig(decoder_channels=(16, 16, 8, 8, 8), tile_size=64)


def _micro_state(tmp_path, name="enc.pt", **spec_kwargs):
    torch.manual_seed(1)
    enc = build_encoder(resolve_encoder("micro-vit", **spec_kwargs))
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))
    else:
        torch.save(enc.backbone.state_dict(), path)
    return enc, path


def test_h_optimus_spec_is_the_published_one():
    spec = resolve_encoder("H-Optimus-0")
    assert spec.timm_name == "vit_giant_patch14_reg4_dinov2"
    assert spec.timm_kwargs["init_values"] == 1e-5
    assert (spec.mpp, spec.input_size) == (0.5, 224)
    assert spec.mean == (0.707223, 0.578729, 0.703617) and spec.std == (0.211883, 0.230117, 0.177517)


def test_h_optimus_parameter_count_and_ratio_to_student():
    teacher = build_teacher("h-optimus-0", meta=True)
    enc = count_parameters(teacher.encoder)
    assert enc == 1_134_774_272  # ViT-g/14 + 4 registers, counted on the meta device
    assert teacher.encoder.levels == [9, 19, 29, 39] and teacher.encoder.channels == [1536] * 4
    student = Student()
    assert count_parameters(student) == 5_554_604
    assert count_parameters(teacher) / count_parameters(student) >= 48
    assert teacher.encoder_size(256, 256) == (126, 126)  # 256 px at 0.25 µm/px -> 9×9 patches at ~0.5


@pytest.mark.parametrize("suffix", ["enc.pt", "enc.safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    ref, path = _micro_state(tmp_path, suffix)
    enc = build_encoder("micro-vit", weights=path)
    assert enc.weights == str(path.resolve())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ref.eval()(x), enc.eval()(x)):
            torch.testing.assert_close(a, b)


def test_state_dict_with_module_prefix_and_head_loads(tmp_path):
    ref, path = _micro_state(tmp_path)
    state = {"module." + k: v for k, v in torch.load(path, weights_only=True).items()}
    state["module.head.weight"] = torch.zeros(10, 64)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    build_encoder("micro-vit", weights=tmp_path / "wrapped.pth")


def test_weight_errors_name_the_file(tmp_path):
    _, path = _micro_state(tmp_path, "wide.pt", embed_dim=96, num_heads=2)
    with pytest.raises(ModelError, match=r"wide\.pt.*shape mismatch"):
        build_encoder("micro-vit", weights=path)
    state = torch.load(path, weights_only=True)
    state.pop("blocks.1.mlp.fc2.bias")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match=r"partial\.pt.*missing keys.*blocks\.1\.mlp\.fc2\.bias"):
        build_encoder("micro-vit", weights=tmp_path / "partial.pt")
    with pytest.raises(ModelError, match=r"absent\.pt: encoder weights file not found"):
        build_encoder("micro-vit", weights=tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt: cannot read weights safely"):
        build_encoder("micro-vit", weights=tmp_path / "junk.pt")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "obj": ConfigError("x")}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match=r"evil\.pt: cannot read weights safely"):
        build_encoder("micro-vit", weights=tmp_path / "evil.pt")


def test_foundation_encoder_without_weights_is_an_error():
    with pytest.raises(ModelError, match="needs a local weights file"):
        build_encoder("h-optimus-0")
    with pytest.raises(ModelError, match="needs a local weights file"):
        build_encoder("vit_tiny_patch16_224")
    enc = build_encoder(resolve_encoder("vit_tiny_patch16_224", depth=1), random_init=True)
    assert enc.weights is None and enc.levels == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="unknown encoder 'no-such-net'"):
        resolve_encoder("no-such-net")
    assert set(ENCODERS) >= {"h-optimus-0", "tiny-vit", "micro-vit"}


def test_cnn_encoder_from_timm():
    teacher = build_teacher(resolve_encoder("resnet18", mpp=0.25), random_init=True, config=SMALL)
    out = teacher(torch.rand(1, 3, 64, 64))
    assert out["tp"].shape == (1, 8, 64, 64)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_model_contract(kind):
    torch.manual_seed(0)
    model = build_teacher("micro-vit", config=SMALL) if kind == "teacher" else Student(channels=TINY_STUDENT_CHANNELS)
    model.eval()
    x = torch.rand(2, 3, 64, 96)
    out = model(x)
    assert out["np"].shape == (2, 2, 64, 96) and out["hv"].shape == (2, 2, 64, 96)
    assert out["tp"].shape == (2, 8, 64, 96) and out["hv"].abs().max() <= 1
    np_, hv, tp = model.forward_tuple(x)
    torch.testing.assert_close(tp, out["tp"])
    meta = model.meta
    assert meta["kind"] == kind and meta["mpp"] == 0.25 and len(meta["classes"]) == 8
    assert meta["classes"][0] == "Background" and meta["classes"][1] == "Neoplastic"
    assert len(meta["colors"]) == 8 and len(meta["mean"]) == 3
    assert "mean" in dict(model.named_buffers()) and "std" in dict(model.named_buffers())
    with pytest.raises(ConfigError, match="multiple of 32"):
        model(torch.rand(1, 3, 48, 64))


def test_teacher_encoder_is_frozen():
    teacher = build_teacher("micro-vit", config=SMALL)
    teacher.train()
    assert not teacher.encoder.training and teacher.heads.training
    assert all(not p.requires_grad for p in teacher.encoder.parameters())
    assert count_parameters(teacher, trainable_only=True) == sum(p.numel() for p in teacher.decoder_parameters())
    out = teacher(torch.rand(1, 3, 64, 64))
    out["tp"].sum().backward()
    assert all(p.grad is None for p in teacher.encoder.parameters())


def test_student_layerwise_dropout_grows_with_depth():
    s = Student(channels=TINY_STUDENT_CHANNELS, dropout=0.4)
    rates = [m[-1].p if isinstance(m[-1], torch.nn.Dropout2d) else 0.0 for m in s.down]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ConfigError, match="dropout"):
        StudentConfig(dropout=1.0)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_checkpoint_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    model = build_teacher("micro-vit", config=SMALL) if kind == "teacher" else Student(channels=TINY_STUDENT_CHANNELS)
    model.eval()
    save_checkpoint(tmp_path / "ck", model, config={"seed": 3, "lr": 0.1}, epoch=2, metrics={"loss": 1.5})
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["kind"] == kind and doc["seed"] == 3 and doc["epoch"] == 2 and doc["mpp"] == 0.25
    assert doc["normalisation"]["mean"] == list(model.meta["mean"])
    loaded = load_model(tmp_path / "ck" / "model.pt")
    assert type(loaded) is type(model) and not loaded.training and loaded.meta == model.meta
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_teacher_checkpoint_refers_to_encoder_file(tmp_path):
    _, path = _micro_state(tmp_path)
    teacher = build_teacher("micro-vit", weights=str(path), config=SMALL).eval()
    save_checkpoint(tmp_path / "ck", teacher, config={}, epoch=1, metrics={})
    state = torch.load(tmp_path / "ck" / "model.pt", weights_only=True)
    assert not any(k.startswith("encoder.") for k in state)
    loaded = load_model(tmp_path / "ck")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)["np"], loaded(x)["np"])
    torch.save({k: v * 2 for k, v in torch.load(path, weights_only=True).items()}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"other\.pt: encoder weights differ"):
        load_model(tmp_path / "ck", encoder_weights=tmp_path / "other.pt")
    path.unlink()
    with pytest.raises(ModelError, match=r"enc\.pt: encoder weights file of this teacher not found"):
        load_model(tmp_path / "ck")


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match=r"config\.json: checkpoint config not found"):
        load_model(tmp_path)
    save_checkpoint(tmp_path / "a", Student(channels=TINY_STUDENT_CHANNELS), config={}, epoch=0, metrics={})
    save_checkpoint(tmp_path / "b", Student(channels=(8, 16, 32, 64, 32)), config={}, epoch=0, metrics={})
    (tmp_path / "a" / "model.pt").replace(tmp_path / "b" / "model.pt")
    with pytest.raises(ModelError, match=r"b/model\.pt: weights do not match the student.*shape mismatches"):
        load_model(tmp_path / "b")
    with pytest.raises(ModelError, match=r"a/model\.pt: checkpoint weights not found"):
        load_model(tmp_path / "a")
    (tmp_path / "b" / "config.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(tmp_path / "b")
