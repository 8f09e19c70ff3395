"""Pluggable feature backbones: ``handcrafted`` (default, no weights), ``cnn`` and ``timm``.

Every backbone has an :attr:`~Backbone.id` (the name of its cache folder, which changes whenever
its configuration or weights change), a JSON-able :meth:`~Backbone.config` and
:meth:`~Backbone.extract` ``(store, nuclei) -> (features (M, F) float32, nucleus_ids (M,) int64)``.

- ``handcrafted``: :func:`cellcurate.relabel.features.handcrafted_batch_features`, batched over
  same-sized tiles.
- ``cnn``: a small CNN trained on 64×64 nucleus-centred crops of the nuclei whose source label is
  already resolved (classes balanced by under-sampling); features = its penultimate layer.
  Note: it sees the labels it will later help to check, so it is less neutral than the others.
- ``timm``: any timm encoder from a local weights file (``torch.load(weights_only=True)`` or
  safetensors), run once per window of the image at the encoder's pixel size; the patch tokens under
  each nucleus are averaged (weighted by the pixels the nucleus covers in each token).
  ``h-optimus-0`` is known by name (``vit_giant_patch14_reg4_dinov2``, 224 px at 0.5 µm/px, its
  published mean/std). ``tiny-vit-test`` is a random-weight configuration for tests and must be
  asked for by name; a missing or mismatched weights file is a :class:`~cellcurate.errors.ModelError`.

Dimensions: M nuclei, F features, B tiles, H×W pixels, T tokens of a window.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from ..errors import ConfigError, ModelError
from .features import FEATURE_NAMES, handcrafted_batch_features

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..datasets.store import Store

BackboneName = Literal["handcrafted", "cnn", "timm"]
BACKBONES: tuple[str, ...] = ("handcrafted", "cnn", "timm")
HANDCRAFTED_VERSION = 1
BATCH_TILES = 64


class Backbone(Protocol):
    id: str
    feature_names: tuple[str, ...]

    def config(self) -> dict[str, Any]: ...

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def iter_image_batches(store: "Store", image_ids: list[str], *, batch: int = BATCH_TILES,
                       progress: bool | None = None, desc: str = "features"
                       ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (image_ids, images (B, H, W, 3) uint8, instances (B, H, W) int32, mpp (B,)) batches.

    Tiles of a stacked unit (PanNuke) come ``batch`` at a time in storage order, read as one slice;
    images of their own size (MoNuSAC) come one at a time.
    """
    from tqdm import tqdm

    mpp_of = store.images().set_index("image_id")["mpp"]
    bar = tqdm(total=len(image_ids), disable=None if progress is None else not progress, desc=desc, unit="image")
    try:
        for ids, imgs, inss in store.iter_slabs(list(image_ids), batch=batch):
            bar.update(len(ids))
            yield ids, imgs, inss, mpp_of.reindex(ids).to_numpy(np.float64)
    finally:
        bar.close()


def _scatter(nuclei: "pd.DataFrame", per_image: dict[str, np.ndarray], n_features: int) -> np.ndarray:
    """Rows of ``nuclei`` from per-image (n, F) arrays indexed by instance id - 1."""
    feats = np.full((len(nuclei), n_features), np.nan, dtype=np.float32)
    pos = np.arange(len(nuclei))
    for image_id, grp_pos in nuclei.assign(_pos=pos).groupby("image_id", sort=False)["_pos"]:
        f = per_image.get(str(image_id))
        if f is None:
            continue
        inst = nuclei["instance_id"].to_numpy(np.int64)[grp_pos.to_numpy()]
        ok = inst <= len(f)
        feats[grp_pos.to_numpy()[ok]] = f[inst[ok] - 1]
    return feats


# -- handcrafted ---------------------------------------------------------------------------------
@dataclass
class HandcraftedBackbone:
    """Shape, size, colour and texture statistics per nucleus and its ring (no weights)."""

    feature_names: tuple[str, ...] = FEATURE_NAMES

    @property
    def id(self) -> str:
        return f"handcrafted-v{HANDCRAFTED_VERSION}"

    def config(self) -> dict[str, Any]:
        return {"backbone": "handcrafted", "version": HANDCRAFTED_VERSION, "features": list(self.feature_names)}

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        per_image: dict[str, np.ndarray] = {}
        for ids, imgs, inss, mpp in iter_image_batches(store, list(nuclei["image_id"].unique()),
                                                        progress=progress, desc="handcrafted features"):
            ns = inss.reshape(len(ids), -1).max(axis=1)
            if len(np.unique(mpp)) > 1:  # one ring width per batch: split by pixel size
                outs = [handcrafted_batch_features(imgs[i:i + 1], inss[i:i + 1], ns[i:i + 1], mpp=mpp[i:i + 1])[0]
                        for i in range(len(ids))]
            else:
                outs = handcrafted_batch_features(imgs, inss, ns, mpp=mpp)
            per_image.update(zip(ids, outs))
        return _scatter(nuclei, per_image, len(self.feature_names)), nuclei["nucleus_id"].to_numpy(np.int64)


# -- crops shared by cnn ---------------------------------------------------------------------------
def nucleus_crops(store: "Store", nuclei: "pd.DataFrame", *, size: int = 64,
                  progress: bool | None = None) -> np.ndarray:
    """(M, size, size, 3) uint8 crops centred on each nucleus (zero padding at image edges)."""
    crops = np.zeros((len(nuclei), size, size, 3), np.uint8)
    half = size // 2
    pos_of = {nid: i for i, nid in enumerate(nuclei["nucleus_id"].to_numpy())}
    by_image = {k: g for k, g in nuclei.groupby("image_id", sort=False)}
    for ids, imgs, _ins, _mpp in iter_image_batches(store, list(by_image), progress=progress, desc="crops"):
        for image_id, img in zip(ids, imgs):
            g = by_image[image_id]
            padded = np.pad(img, ((half, half), (half, half), (0, 0)))
            cy = np.round(g["centroid_y"].to_numpy()).astype(int)
            cx = np.round(g["centroid_x"].to_numpy()).astype(int)
            for nid, y, x in zip(g["nucleus_id"].to_numpy(), cy, cx):
                crops[pos_of[nid]] = padded[y:y + size, x:x + size]
    return crops


# -- small CNN -------------------------------------------------------------------------------------
@dataclass
class CNNBackbone:
    """A small CNN trained on 64×64 nucleus-centred crops; features = its penultimate layer (F=64)."""

    epochs: int = 4
    crop: int = 64
    width: int = 16
    per_class: int = 2000  # under-sampling cap: every class gets min(smallest class, per_class) crops
    seed: int = 0

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"cnn_{i}" for i in range(4 * self.width))

    def config(self) -> dict[str, Any]:
        return {"backbone": "cnn", "epochs": self.epochs, "crop": self.crop, "width": self.width,
                "per_class": self.per_class, "seed": self.seed}

    @property
    def id(self) -> str:
        return "cnn-" + hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:12]

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        crops = nucleus_crops(store, nuclei, size=self.crop, progress=progress)
        labels = nuclei["unified_label"].to_numpy(np.int64)
        classes = [c for c in np.unique(labels[labels > 0])]
        if len(classes) < 2:
            raise ConfigError(f"{store.path}: the cnn backbone needs nuclei of at least 2 resolved classes, "
                              f"found {len(classes)}")
        counts = {c: int((labels == c).sum()) for c in classes}
        take = min(min(counts.values()), self.per_class)
        train_idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), take, replace=False) for c in classes])
        cls_pos = {c: i for i, c in enumerate(classes)}
        w = self.width
        body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        head = nn.Linear(4 * w, len(classes))
        model = nn.Sequential(body, head)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)

        def tensor(idx: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float().div(255.0)

        y_all = torch.tensor([cls_pos[int(c)] for c in labels[train_idx]])
        model.train()
        for _ in range(self.epochs):
            order = rng.permutation(len(train_idx))
            for s in range(0, len(order), 128):
                b = order[s:s + 128]
                x = tensor(train_idx[b])
                if rng.random() < 0.5:
                    x = x.flip(3)
                loss = nn.functional.cross_entropy(model(x), y_all[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        out = np.zeros((len(nuclei), 4 * w), np.float32)
        with torch.no_grad():
            for s in range(0, len(nuclei), 512):
                out[s:s + 512] = body(tensor(np.arange(s, min(s + 512, len(nuclei))))).numpy()
        return out, nuclei["nucleus_id"].to_numpy(np.int64)


# -- timm ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderConfig:
    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    mpp: float = 0.5
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    random_ok: bool = False


#: Encoders known by name. H-Optimus-0: 224 px at 0.5 µm/px with its published normalisation.
KNOWN_ENCODERS: dict[str, EncoderConfig] = {
    "h-optimus-0": EncoderConfig(
        "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
        {"init_values": 1e-5, "img_size": 224, "dynamic_img_size": True}, 0.5, 224,
        (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "tiny-vit-test": EncoderConfig(
        "tiny-vit-test", "vit_tiny_patch16_224",
        {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64, "patch_size": 8, "dynamic_img_size": True},
        0.5, 64, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), random_ok=True),
}


def resolve_encoder_config(name: str) -> EncoderConfig:
    """A known name (``h-optimus-0``, ``tiny-vit-test``) or any timm architecture name."""
    if name in KNOWN_ENCODERS:
        return KNOWN_ENCODERS[name]
    if name == "vit_giant_patch14_reg4_dinov2":
        return KNOWN_ENCODERS["h-optimus-0"]
    import timm

    if not timm.list_models(name):
        raise ConfigError(f"unknown encoder {name!r}; expected h-optimus-0, tiny-vit-test or a timm model name")
    return EncoderConfig(name, name, {"dynamic_img_size": True} if name.startswith(("vit", "eva")) else {})


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict of tensors from ``.safetensors`` or a ``torch.save`` file, read safely."""
    import torch

    if not path.is_file():
        raise ModelError("weights file not found", path=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, bad header, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot read weights safely ({type(exc).__name__}: {first[:160]})", path=path) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("weights file does not hold a state dict of tensors", path=path)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class TimmBackbone:
    """A timm encoder from a local weights file; tokens under each nucleus pooled (F = embed dim)."""

    encoder: str = "h-optimus-0"
    weights: str | None = None
    device: str = "cpu"
    batch: int = 8
    _model: Any = field(default=None, init=False, repr=False)
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.spec = resolve_encoder_config(self.encoder)
        if self.weights is None and not self.spec.random_ok:
            raise ModelError(f"encoder {self.encoder!r} needs a local weights file (--weights FILE); "
                             "random weights are used only for the explicit test encoder tiny-vit-test")
        if self.weights is not None:
            p = Path(self.weights)
            if not p.is_file():
                raise ModelError("weights file not found", path=p)
            self._digest = _file_sha256(p)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"tok_{i}" for i in range(self._load().num_features))

    def config(self) -> dict[str, Any]:
        s = self.spec
        return {"backbone": "timm", "encoder": s.name, "timm_name": s.timm_name, "timm_kwargs": s.timm_kwargs,
                "mpp": s.mpp, "input_size": s.input_size, "mean": list(s.mean), "std": list(s.std),
                "weights_sha256": self._digest or "random-seed-0"}

    @property
    def id(self) -> str:
        return f"timm-{self.spec.name}-" + hashlib.sha256(
            json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:12]

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        import timm
        import torch

        torch.manual_seed(0)
        kwargs = {"pretrained": False, "num_classes": 0, **self.spec.timm_kwargs}
        model = timm.create_model(self.spec.timm_name, **kwargs)
        if self.weights is not None:
            path = Path(self.weights)
            state = read_state_dict(path)
            own = model.state_dict()
            state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc."))}
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            if missing or unexpected:
                raise ModelError(f"weights do not fit {self.spec.timm_name}: {len(missing)} missing keys "
                                 f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})",
                                 path=path)
            bad = [k for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
            if bad:
                k = bad[0]
                raise ModelError(f"weights do not fit {self.spec.timm_name}: {len(bad)} shape mismatches "
                                 f"(e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})", path=path)
            model.load_state_dict(state, strict=True)
        self._model = model.eval().to(self.device)
        return self._model

    def tile_tokens(self, image: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
        """Patch tokens of one image at the encoder's pixel size.

        Returns (gh, gw, C) float32 tokens and the size of one token in image pixels.
        """
        import torch
        import torch.nn.functional as F

        model = self._load()
        patch = int(model.patch_embed.patch_size[0])
        scale = mpp / self.spec.mpp  # image px -> encoder px
        h, w = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)
        nh, nw = max(patch, int(round(h * scale))), max(patch, int(round(w * scale)))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        win = self.spec.input_size
        ph, pw = -(-nh // win) * win, -(-nw // win) * win
        x = F.pad(x, (0, pw - nw, 0, ph - nh))
        g = win // patch
        windows = x.unfold(2, win, win).unfold(3, win, win)  # (1, 3, nH, nW, win, win)
        n_h, n_w = windows.shape[2], windows.shape[3]
        windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, win, win)
        outs = []
        with torch.no_grad():
            for s in range(0, len(windows), self.batch):
                feats = model.forward_features(windows[s:s + self.batch].to(self.device))
                prefix = int(getattr(model, "num_prefix_tokens", 1))
                outs.append(feats[:, prefix:].float().cpu())
        tok = torch.cat(outs).reshape(n_h, n_w, g, g, -1).permute(0, 2, 1, 3, 4).reshape(n_h * g, n_w * g, -1)
        return tok.numpy(), patch / scale

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        from scipy import sparse

        per_image: dict[str, np.ndarray] = {}
        for ids, imgs, inss, mpps in iter_image_batches(store, list(nuclei["image_id"].unique()),
                                                        progress=progress, desc="timm features"):
            for image_id, img, ins, mpp in zip(ids, imgs, inss, mpps):
                tok, tok_px = self.tile_tokens(img, float(mpp))
                gh, gw, c = tok.shape
                n = int(ins.max(initial=0))
                fg = np.flatnonzero(ins)
                yy, xx = np.divmod(fg, ins.shape[1])
                t = np.minimum((yy / tok_px).astype(np.int64), gh - 1) * gw + np.minimum(
                    (xx / tok_px).astype(np.int64), gw - 1)
                pool = sparse.csr_matrix((np.ones(fg.size), (ins.ravel()[fg].astype(np.int64) - 1, t)),
                                         shape=(n, gh * gw))
                counts = np.asarray(pool.sum(axis=1)).ravel()
                per_image[image_id] = (pool @ tok.reshape(-1, c)) / np.maximum(counts, 1)[:, None]
        return (_scatter(nuclei, per_image, len(self.feature_names)).astype(np.float32),
                nuclei["nucleus_id"].to_numpy(np.int64))


def make_backbone(name: str = "handcrafted", *, weights: str | None = None, encoder: str | None = None,
                  seed: int = 0, device: str = "cpu") -> Backbone:
    """Build a backbone by name (``handcrafted``, ``cnn``, ``timm``)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if name == "handcrafted":
        return HandcraftedBackbone()
    if name == "cnn":
        return CNNBackbone(seed=seed)
    return TimmBackbone(encoder=encoder or "h-optimus-0", weights=weights, device=device)
