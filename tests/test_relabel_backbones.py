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
        _ = bb.feature_names
    assert "wrong.pt" in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot read weights safely"):
        _ = TimmBackbone(encoder="tiny-vit-test", weights=str(junk)).feature_names


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


def test_cnn_backbone_small_in_sample(small_store):
    bb = CNNBackbone(epochs=1, width=4, per_class=50, oof_folds=1)
    feats, ids = bb.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    assert feats.shape == (len(ids), 16) and np.isfinite(feats).all() and len(bb.feature_names) == 16
    assert bb.id.startswith("cnn-") and bb.id != CNNBackbone(epochs=2).id != CNNBackbone(oof_folds=1).id


def test_cnn_features_come_from_nets_that_never_saw_the_nucleus_group(small_store, monkeypatch):
    """Issue 10: the cnn backbone was trained on the labels it then checks."""
    from cellcurate.relabel.classify import nucleus_groups

    nuclei = small_store.nuclei(include_ignore=False)
    groups = nucleus_groups(nuclei, small_store.images())
    trained_on, applied_to = [], []
    real_train, real_apply = CNNBackbone._train, CNNBackbone._apply

    def train(self, crops, labels, pool, classes, rng):
        trained_on.append(set(groups[pool]))
        return real_train(self, crops, labels, pool, classes, rng)

    def apply(self, net, crops, idx, *, probs):
        applied_to.append(idx.copy())
        return real_apply(self, net, crops, idx, probs=probs)

    monkeypatch.setattr(CNNBackbone, "_train", train)
    monkeypatch.setattr(CNNBackbone, "_apply", apply)
    bb = CNNBackbone(epochs=1, width=4, per_class=50, oof_folds=2)
    feats, ids = bb.extract(small_store, nuclei, progress=False)
    assert len(trained_on) == len(applied_to) == 2
    for seen, target in zip(trained_on, applied_to):
        assert seen and not seen & set(groups[target])  # no group on both sides
    assert sorted(np.concatenate(applied_to).tolist()) == list(range(len(nuclei)))  # each nucleus once
    assert feats.shape == (len(nuclei), 7) and bb.feature_names == tuple(f"cnn_p{c}" for c in range(1, 8))
    np.testing.assert_allclose(feats.sum(axis=1), 1.0, atol=1e-5)  # class probabilities of one net
    with pytest.raises(ConfigError, match="oof_folds"):
        CNNBackbone(oof_folds=0)


# -- device, batching, meta build, one registry (issue 10) ----------------------------------------
def test_device_cpu_works_and_cuda_without_a_device_is_a_config_error(monkeypatch):
    assert TimmBackbone(encoder="tiny-vit-test", device="cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TimmBackbone(encoder="tiny-vit-test", device="auto").device == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        TimmBackbone(encoder="tiny-vit-test", device="cuda")
    with pytest.raises(ConfigError, match="unknown --device"):
        TimmBackbone(encoder="tiny-vit-test", device="tpu")


def test_batched_windows_equal_one_image_at_a_time():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), rng.integers(0, 255, (200, 90, 3), dtype=np.uint8)]
    bb = TimmBackbone(encoder="tiny-vit-test", batch=3)
    together = bb.batch_tokens(imgs, [0.25, 0.5])
    for img, mpp, (tok, px) in zip(imgs, [0.25, 0.5], together):
        alone, px1 = TimmBackbone(encoder="tiny-vit-test", batch=1).tile_tokens(img, mpp)
        assert px == px1 and tok.shape == alone.shape
        np.testing.assert_allclose(tok, alone, atol=1e-5)


def test_weights_are_assigned_to_a_model_built_on_meta(tmp_path, monkeypatch):
    import cellcurate.core.encoders as reg

    ref = TimmBackbone(encoder="tiny-vit-test")
    path = tmp_path / "ok.pt"
    torch.save(ref._load().state_dict(), path)
    calls = []
    real = reg.create_timm_model

    def spy(spec, *, meta=False):
        calls.append(meta)
        return real(spec, meta=meta)

    monkeypatch.setattr(reg, "create_timm_model", spy)
    loaded = TimmBackbone(encoder="tiny-vit-test", weights=str(path))._load()
    assert calls[0] is True  # never a random init before the file is read
    for k, v in ref._load().state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_one_encoder_registry_for_relabel_and_models(monkeypatch):
    from dataclasses import replace

    import cellcurate.core.encoders as reg
    from cellcurate.models.encoders import build_encoder, resolve_encoder

    spec = replace(reg.ENCODERS["micro-vit"], name="my-new-encoder")
    monkeypatch.setitem(reg.ENCODERS, "my-new-encoder", spec)  # the one line that adds an encoder
    assert TimmBackbone(encoder="my-new-encoder").spec == spec
    assert resolve_encoder("my-new-encoder") == spec and build_encoder("my-new-encoder").spec == spec


@pytest.mark.gpu
def test_cuda_fp16_features_close_to_cpu(small_store):
    cpu = TimmBackbone(encoder="tiny-vit-test", device="cpu")
    gpu = TimmBackbone(encoder="tiny-vit-test", device="cuda")
    assert gpu.precision == "fp16" and gpu.id != cpu.id and gpu.batch == 64
    a, _ = cpu.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    b, _ = gpu.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    assert np.abs(a - b).max() < 0.05 * max(1.0, float(np.abs(a).max()))


# -- precision (issue 16): fp32 | fp16 | bf16 through autocast --------------------------------------
def test_precision_defaults_and_bad_values():
    cpu = TimmBackbone(encoder="tiny-vit-test", device="cpu")
    assert cpu.precision == "fp32" and "precision" not in cpu.config()
    bf = TimmBackbone(encoder="tiny-vit-test", device="cpu", precision="bf16")
    assert bf.precision == "bf16" and bf.config()["precision"] == "bf16" and bf.id != cpu.id
    assert TimmBackbone(encoder="tiny-vit-test", precision="FP32").id == cpu.id
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device; on CPU use bf16 or fp32"):
        TimmBackbone(encoder="tiny-vit-test", device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="unknown --precision 'int8'"):
        TimmBackbone(encoder="tiny-vit-test", precision="int8")
    with pytest.raises(ConfigError, match="applies to the timm backbone"):
        make_backbone("handcrafted", precision="bf16")


def test_bf16_on_cpu_runs_the_encoder_in_bf16_and_stays_close_to_fp32():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    ref = TimmBackbone(encoder="tiny-vit-test", batch=2).batch_tokens(imgs, [0.5] * 3)
    bb = TimmBackbone(encoder="tiny-vit-test", batch=2, precision="bf16")
    seen = []
    linear = next(m for m in bb._load().modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    out = bb.batch_tokens(imgs, [0.5] * 3)
    assert seen and set(seen) == {torch.bfloat16}  # autocast took effect: the matmuls ran in bf16
    for (a, pa), (b, pb) in zip(ref, out):
        assert pa == pb and a.shape == b.shape and b.dtype == np.float32
        assert not np.array_equal(a, b)  # bf16 keeps 8 mantissa bits: not the fp32 result ...
        assert np.abs(a - b).max() < 0.05 * max(1.0, float(np.abs(a).max()))  # ... but close to it


def test_cli_precision_errors_are_one_line(tiny_store_path, tmp_path):
    import shutil

    from click.testing import CliRunner

    from cellcurate.cli.main import cli

    store = tmp_path / "store"
    shutil.copytree(tiny_store_path, store)
    for extra, message in ((["--backbone", "timm", "--encoder", "tiny-vit-test", "--precision", "fp16"],
                            "fp16 needs a CUDA device"),
                           (["--precision", "bf16"], "applies to the timm backbone"),
                           (["--precision", "fp8"], "Invalid value for '--precision'")):
        r = CliRunner().invoke(cli, ["relabel", str(store), "--round", "1", "--dry-run", *extra])
        assert r.exit_code in (1, 2) and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_precisions_close_to_cpu(small_store, precision):
    cpu = TimmBackbone(encoder="tiny-vit-test", device="cpu")
    gpu = TimmBackbone(encoder="tiny-vit-test", device="cuda", precision=precision)
    assert gpu.precision == precision and gpu.id != cpu.id
    a, _ = cpu.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    b, _ = gpu.extract(small_store, small_store.nuclei(include_ignore=False), progress=False)
    assert np.abs(a - b).max() < 0.05 * max(1.0, float(np.abs(a).max()))
