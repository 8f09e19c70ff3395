"""The teacher feeds its ViT at the ViT's native grid (windows, stitched) unless told to resize."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cellcurate.errors import ConfigError, ModelError
from cellcurate.models.checkpoint import load_model, save_checkpoint
from cellcurate.models.encoders import EncoderSpec
from cellcurate.models.export import export_torchscript, load_torchscript
from cellcurate.models.teacher import (
    TeacherConfig,
    build_teacher,
    encode_windows,
    window_starts,
)

#: A one-block ViT with H-Optimus-0's patch size (14) and a 56-px native input (4×4 tokens).
VIT14 = EncoderSpec(
    name="test-vit14",
    timm_name="vit_tiny_patch16_224",
    timm_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 56, "patch_size": 14, "dynamic_img_size": True},
    mpp=0.5,
    input_size=56,
    random_ok=True,
)
DECODER = (16, 16, 8, 8, 8)


def _teacher(mode: str = "native", tile: int = 64):
    torch.manual_seed(0)
    return build_teacher(VIT14, config=TeacherConfig(decoder_channels=DECODER, tile_size=tile, encoder_input=mode)).eval()


@pytest.fixture()
def resample_spy(monkeypatch):
    """Record every (new grid, old grid) timm's ViT asks its position-embedding resampler for."""
    import timm.models.vision_transformer as vt

    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = vt.resample_abs_pos_embed

    def spy(posemb, new_size, old_size=None, **kw):
        calls.append((tuple(int(v) for v in new_size), tuple(int(v) for v in old_size)))
        return real(posemb, new_size, old_size, **kw)

    monkeypatch.setattr(vt, "resample_abs_pos_embed", spy)
    return calls


@pytest.fixture()
def encoder_inputs(monkeypatch):
    """Record the (h, w) of every image the ViT backbone is run on."""
    from timm.models.vision_transformer import VisionTransformer

    sizes: list[tuple[int, int]] = []
    real = VisionTransformer.forward_intermediates

    def spy(self, x, *a, **kw):
        sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        return real(self, x, *a, **kw)

    monkeypatch.setattr(VisionTransformer, "forward_intermediates", spy)
    return sizes


def test_window_starts_are_whole_patches_and_cover():
    assert window_starts(56, 56, 14) == [0]
    assert window_starts(98, 56, 14) == [0, 42]
    assert window_starts(448, 224, 14) == [0, 224]
    assert window_starts(476, 224, 14) == [0, 126, 252]  # last one flush with the end (252 + 224)


def test_default_path_uses_the_native_token_grid_without_interpolation(resample_spy, encoder_inputs):
    t = _teacher()
    assert t.config.encoder_input == "native" and t.native_window == 56
    resample_spy.clear()
    encoder_inputs.clear()
    with torch.no_grad():
        out = t(torch.rand(2, 3, 192, 128))
    assert out["tp"].shape == (2, 8, 192, 128)
    assert encoder_inputs and set(encoder_inputs) == {(56, 56)}  # only native windows
    assert resample_spy and all(new == old == (4, 4) for new, old in resample_spy)


def test_resize_option_keeps_todays_interpolated_grid(resample_spy, encoder_inputs):
    t = _teacher("resize")
    resample_spy.clear()
    encoder_inputs.clear()
    with torch.no_grad():
        feats = t.encode(torch.rand(1, 3, 64, 64))
    # 64 px at 0.25 µm/px -> 32 px at 0.5 -> 28 px: a 2×2 grid from the 4×4 position embeddings
    assert encoder_inputs == [(28, 28)] and resample_spy == [((2, 2), (4, 4))]
    assert feats[0].shape[-2:] == (2, 2)


def test_one_window_is_the_encoder_on_the_padded_tile():
    t = _teacher()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got = t.encode(x)
        z = F.conv2d(F.pad(t.normalise(x), (1, 1, 1, 1), mode="replicate"), t.blur, groups=3)  # antialias
        z = F.interpolate(z, size=(28, 28), mode="bilinear", align_corners=False)
        want = t.encoder(F.pad(z, (0, 28, 0, 28)))  # a 56-px window, tile at its top-left
    for g, w in zip(got, want):
        assert g.shape == (1, 32, 2, 2)
        assert torch.equal(g, w[:, :, :2, :2])


def test_windows_are_stitched_with_overlaps_averaged():
    t = _teacher()
    torch.manual_seed(1)
    z = torch.randn(1, 3, 98, 98)  # 7×7 tokens: windows at 0 and 42 along each axis
    with torch.no_grad():
        got = encode_windows(t.encoder, z, window=56, patch=14)
        w00 = t.encoder(z[:, :, :56, :56])
        w11 = t.encoder(z[:, :, 42:, 42:])
        w01 = t.encoder(z[:, :, :56, 42:])
    for g, a, b, c in zip(got, w00, w11, w01):
        assert g.shape == (1, 32, 7, 7)
        assert torch.equal(g[:, :, 0, 0], a[:, :, 0, 0])  # only window (0, 0)
        assert torch.equal(g[:, :, 6, 6], b[:, :, 3, 3])  # only window (42, 42)
        assert torch.allclose(g[:, :, 0, 3], (a[:, :, 0, 3] + c[:, :, 0, 0]) / 2, atol=1e-6)  # shared column


def test_feature_caches_differ_by_input_mode():
    assert _teacher("native").feature_id != _teacher("resize").feature_id


def test_encoder_input_is_validated():
    with pytest.raises(ConfigError, match="encoder_input"):
        TeacherConfig(encoder_input="crop")


def test_checkpoint_keeps_the_mode_and_old_checkpoints_load_as_resize(tmp_path):
    t = _teacher()
    save_checkpoint(tmp_path / "new", t, config={"seed": 0}, epoch=1, metrics={})
    assert load_model(tmp_path / "new").config.encoder_input == "native"
    save_checkpoint(tmp_path / "old", t, config={"seed": 0}, epoch=1, metrics={})
    cfg_path = tmp_path / "old" / "config.json"
    doc = json.loads(cfg_path.read_text())
    del doc["architecture"]["encoder_input"]  # as written before the option existed
    cfg_path.write_text(json.dumps(doc))
    assert load_model(tmp_path / "old").config.encoder_input == "resize"


def test_native_teacher_exports_fixed_size_and_refuses_others(tmp_path):
    t = _teacher()
    path = export_torchscript(t, tmp_path / "t.pt")
    loaded = load_torchscript(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x)["np"], t(x)["np"], atol=1e-5)
        with pytest.raises(ModelError, match=r"must be \(B, 3, 64, 64\), got \[1, 3, 96, 64\]"):
            loaded(torch.rand(1, 3, 96, 64))


def test_cli_train_teacher_has_the_encoder_input_option():
    from cellcurate.cli.train import command

    res = CliRunner().invoke(command, ["teacher", "--help"])
    assert res.exit_code == 0 and "--encoder-input" in res.output and "native" in res.output


def test_image_pyramid_feeds_the_tile_at_half_and_quarter_resolution(tmp_path):
    """With ``image_pyramid`` the decoder also gets the tile's own CNN features at H/2 and H/4, so a
    change of a few pixels (finer than one encoder patch) reaches those levels; it checkpoints and
    old checkpoints (without the option) load without it."""
    torch.manual_seed(0)
    cfg = TeacherConfig(decoder_channels=DECODER, tile_size=64, encoder_input="resize", image_pyramid=True)
    t = build_teacher(VIT14, config=cfg).eval()
    c16, c8, c4, c2, c1 = DECODER
    assert t.up4[0].in_channels == c8 + c4 + c4 and t.up2[0].in_channels == c4 + c2 + c2
    seen: dict[str, torch.Tensor] = {}
    t.img4.register_forward_hook(lambda m, i, o: seen.__setitem__("quarter", o))
    t.img2.register_forward_hook(lambda m, i, o: seen.__setitem__("half", o))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = t(x)
    assert seen["half"].shape[-2:] == (32, 32) and seen["quarter"].shape[-2:] == (16, 16)
    assert out["tp"].shape == (1, 8, 64, 64)
    save_checkpoint(tmp_path / "p", t, config={"seed": 0}, epoch=1, metrics={})
    back = load_model(tmp_path / "p")
    assert back.config.image_pyramid
    with torch.no_grad():
        assert torch.allclose(back(x)["tp"], out["tp"], atol=1e-6)
    plain = _teacher("resize")
    assert not plain.config.image_pyramid and not hasattr(plain, "img2")
    save_checkpoint(tmp_path / "old", plain, config={"seed": 0}, epoch=1, metrics={})
    doc = json.loads((tmp_path / "old" / "config.json").read_text())
    del doc["architecture"]["image_pyramid"]  # as written before the option existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(doc))
    assert not load_model(tmp_path / "old").config.image_pyramid
