import numpy as np
import pytest
import torch

from cellcurate.errors import ConfigError, ModelError
from cellcurate.relabel.backbones import CNNBackbone, TimmBackbone, make_backbone
from cellcurate.relabel.features import nucleus_features
from relabel_synth import build_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("bb") / "s", tiles=2, patients=2)


def test_named_encoder_without_weights_is_an_error():
    with pytest.raises(ModelError, match="needs a local weights file"):
        make_backbone("timm", encoder="h-optimus-0")


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="weights file not found") as info:
        TimmBackbone(encoder="tiny-vit-test", weights=str(tmp_path / "nope.pt"))
    assert str(tmp_path / "nope.pt") in str(info.value)


def test_wrong_weights_name_the_file(tmp_path):
    bad = tmp_path / "wrong.pt"
    torch.save({"patch_embed.proj.weight": torch.zeros(5, 3, 8, 8)}, bad)
    bb = TimmBackbone(encoder="tiny-vit-test", weights=str(bad))
    with pytest.raises(ModelError, match="weights do not fit") as info:
        bb.feature_names
    assert "wrong.pt" in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot read weights safely"):
        TimmBackbone(encoder="tiny-vit-test", weights=str(junk)).feature_names


def test_matching_weights_load_and_change_the_id(tmp_path):
    ref = TimmBackbone(encoder="tiny-vit-test")
    path = tmp_path / "ok.pt"
    torch.save(ref._load().state_dict(), path)
    loaded = TimmBackbone(encoder="tiny-vit-test", weights=str(path))
    assert len(loaded.feature_names) == 32 and loaded.id != ref.id
    assert loaded.config()["weights_sha256"] != "random-seed-0"


def test_unknown_backbone_and_encoder():
    with pytest.raises(ConfigError, match="unknown backbone"):
        make_backbone("resnet")
    with pytest.raises(ConfigError, match="unknown encoder"):
        make_backbone("timm", encoder="no_such_model_xyz")


def test_tiny_vit_features_pool_tokens(small_store):
    bb = TimmBackbone(encoder="tiny-vit-test")
    feats, ids = nucleus_features(small_store, bb, progress=False)
    assert feats.shape == (len(small_store.nuclei(include_ignore=False)), 32) and np.isfinite(feats).all()
    assert len(np.unique(feats[:, 0])) > len(feats) // 4  # tokens differ between nuclei
    assert (small_store.path / "features" / bb.id / "meta.json").exists()


def test_cnn_backbone_small(small_store):
    bb = CNNBackbone(epochs=1, width=4, per_class=50)
    feats, ids = bb.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    assert feats.shape == (len(ids), 16) and np.isfinite(feats).all()
    assert bb.id.startswith("cnn-") and bb.id != CNNBackbone(epochs=2).id
