"""Pluggable feature backbones: ``handcrafted`` (default, no weights), ``cnn`` and ``timm``.

Every backbone has an :attr:`~Backbone.id` (the name of its cache folder, which changes whenever
its configuration or weights change), a JSON-able :meth:`~Backbone.config` and
:meth:`~Backbone.extract` ``(store, nuclei) -> (features (M, F) float32, nucleus_ids (M,) int64)``.

- ``handcrafted``: :func:`cellcurate.relabel.features.handcrafted_batch_features`, batched over
  same-sized tiles.
- ``cnn``: small CNNs trained on 64×64 nucleus-centred crops of the nuclei whose source label is
  already resolved (classes balanced by under-sampling), **out of fold** by nucleus group: the
  features of a nucleus (class probabilities) come from a net that never saw its group's labels.
  ``oof_folds=1`` keeps the old in-sample net (penultimate layer; it has seen the labels it checks).
- ``timm``: any timm encoder from a local weights file (``torch.load(weights_only=True)`` or
  safetensors), run once per window of the image at the encoder's pixel size; the patch tokens under
  each nucleus are averaged (weighted by the pixels the nucleus covers in each token).
  Encoders come from the one registry :mod:`cellcurate.core.encoders` (shared with the models):
  ``h-optimus-0`` is known by name (``vit_giant_patch14_reg4_dinov2``, 224 px at 0.5 µm/px, its
  published mean/std). ``tiny-vit-test`` is a random-weight configuration for tests and must be
  asked for by name; a missing or mismatched weights file is a :class:`~cellcurate.errors.ModelError`.
  ``device``: ``cpu`` (default), ``cuda`` (batched windows in fp16) or ``auto``; ``precision``:
  ``fp32``, ``fp16`` (CUDA only) or ``bf16`` (CUDA or CPU), through autocast; default fp16 on CUDA,
  fp32 on CPU. Features at another precision differ in the last bits, so they get their own cache.

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

from ..errors import ConfigError, ModelError, StateError
from .features import FEATURE_NAMES, handcrafted_batch_features

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from ..datasets.store import Store

BackboneName = Literal["handcrafted", "cnn", "timm"]
BACKBONES: tuple[str, ...] = ("handcrafted", "cnn", "timm")
HANDCRAFTED_VERSION = 1
BATCH_TILES = 64


class Backbone(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def feature_names(self) -> tuple[str, ...]: ...

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
    """A small CNN trained on 64×64 nucleus-centred crops of the nuclei whose source label is
    already resolved (classes balanced by under-sampling).

    ``oof_folds >= 2`` (default 3): **out-of-fold feature nets**. The nucleus groups (patient /
    PanNuke fold, :func:`cellcurate.relabel.classify.nucleus_groups`) are dealt into
    ``oof_folds`` folds; for each fold a net is trained on the other folds' nuclei only, and gives
    the features of the nuclei of its fold. So the features of a nucleus never come from a net
    that saw its label, or any label of its group. Nets of different folds do not share a feature
    space, so the features are each net's class probabilities (F = K, one per taxonomy class;
    0 for a class the net did not see), which mean the same in every fold.

    ``oof_folds = 1``: one net trained on all resolved nuclei, features = its penultimate layer
    (F = 4 * width). It has seen the labels it then helps to check (in-sample; kept for
    comparison, not neutral).
    """

    epochs: int = 4
    crop: int = 64
    width: int = 16
    per_class: int = 2000  # under-sampling cap: every class gets min(smallest class, per_class) crops
    seed: int = 0
    oof_folds: int = 3
    device: str = "cpu"
    _names: tuple[str, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.oof_folds, int) or self.oof_folds < 1:
            raise ConfigError(f"oof_folds must be an integer >= 1, got {self.oof_folds!r}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        if self._names is not None:
            return self._names
        if self.oof_folds > 1:
            raise StateError("the cnn backbone's feature names (one per taxonomy class) are known after extract()")
        return tuple(f"cnn_{i}" for i in range(4 * self.width))

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"backbone": "cnn", "epochs": self.epochs, "crop": self.crop, "width": self.width,
                               "per_class": self.per_class, "seed": self.seed}
        if self.oof_folds > 1:
            cfg["oof_folds"] = self.oof_folds
        return cfg

    @property
    def id(self) -> str:
        return "cnn-" + hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:12]

    def _train(self, crops: np.ndarray, labels: np.ndarray, train_pool: np.ndarray, classes: list[int],
               rng: np.random.Generator) -> Any:
        """A net trained on the balanced resolved nuclei of ``train_pool`` (indices)."""
        import torch
        from torch import nn

        lab = labels[train_pool]
        take = min(min(int((lab == c).sum()) for c in classes), self.per_class)
        train_idx = np.concatenate([rng.choice(train_pool[lab == c], take, replace=False) for c in classes])
        cls_pos = {c: i for i, c in enumerate(classes)}
        w = self.width
        body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        model = nn.Sequential(body, nn.Linear(4 * w, len(classes))).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        y_all = torch.tensor([cls_pos[int(c)] for c in labels[train_idx]])
        model.train()
        for _ in range(self.epochs):
            order = rng.permutation(len(train_idx))
            for s in range(0, len(order), 128):
                b = order[s:s + 128]
                x = self._tensor(crops, train_idx[b])
                if rng.random() < 0.5:
                    x = x.flip(3)
                loss = nn.functional.cross_entropy(model(x), y_all[b].to(self.device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    def _tensor(self, crops: np.ndarray, idx: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float().div(255.0).to(self.device)

    def _apply(self, net: Any, crops: np.ndarray, idx: np.ndarray, *, probs: bool) -> np.ndarray:
        import torch

        outs = []
        with torch.no_grad():
            for s in range(0, len(idx), 512):
                x = self._tensor(crops, idx[s:s + 512])
                out = torch.softmax(net(x), dim=1) if probs else net[0](x)
                outs.append(out.float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from .classify import nucleus_groups

        self.device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        crops = nucleus_crops(store, nuclei, size=self.crop, progress=progress)
        labels = nuclei["unified_label"].to_numpy(np.int64)
        resolved = np.flatnonzero(labels > 0)
        classes = [int(c) for c in np.unique(labels[resolved])]
        if len(classes) < 2:
            raise ConfigError(f"{store.path}: the cnn backbone needs nuclei of at least 2 resolved classes, "
                              f"found {len(classes)}")
        ids = nuclei["nucleus_id"].to_numpy(np.int64)
        if self.oof_folds == 1:
            net = self._train(crops, labels, resolved, classes, rng)
            self._names = tuple(f"cnn_{i}" for i in range(4 * self.width))
            return self._apply(net, crops, np.arange(len(nuclei)), probs=False).astype(np.float32), ids
        groups = nucleus_groups(nuclei, store.images())
        uniq = np.array(sorted(set(groups.tolist())), dtype=object)
        if len(uniq) < 2:
            raise ConfigError(f"{store.path}: out-of-fold cnn features need nuclei of at least 2 groups "
                              f"(patients / PanNuke folds), found {len(uniq)}; use oof_folds=1 (in-sample)")
        folds = min(self.oof_folds, len(uniq))
        fold_of_group = dict(zip(uniq[rng.permutation(len(uniq))], np.arange(len(uniq)) % folds))
        fold = np.array([fold_of_group[g] for g in groups], np.int64)
        k = len(store.taxonomy.classes)
        out = np.zeros((len(nuclei), k), np.float32)
        for f in range(folds):
            pool = resolved[fold[resolved] != f]
            present = [c for c in classes if (labels[pool] == c).any()]
            if len(present) < 2:
                raise ConfigError(f"{store.path}: out-of-fold cnn features: the nuclei outside fold {f + 1} "
                                  f"of {folds} hold fewer than 2 resolved classes; use fewer oof_folds")
            net = self._train(crops, labels, pool, present, rng)
            target = np.flatnonzero(fold == f)
            out[np.ix_(target, np.asarray(present) - 1)] = self._apply(net, crops, target, probs=True)
        self._names = tuple(f"cnn_p{c.id}" for c in store.taxonomy.classes)
        return out, ids


# -- timm ----------------------------------------------------------------------------------------
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")


def resolve_precision(precision: str | None, device: str) -> str:
    """``None`` -> fp16 on CUDA, fp32 on CPU; fp16 needs CUDA (CPU half-precision matmuls are
    emulated and slow), bf16 runs on both."""
    if precision is None:
        return "fp16" if device.startswith("cuda") else "fp32"
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if name == "fp16" and not device.startswith("cuda"):
        raise ConfigError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    return name


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` / ``cuda:N`` must be available."""
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
        return name
    raise ConfigError(f"unknown --device {device!r}; expected auto, cpu, cuda or cuda:N")


@dataclass
class TimmBackbone:
    """A timm encoder from a local weights file; tokens under each nucleus pooled (F = embed dim).

    The encoder comes from the one registry (:mod:`cellcurate.core.encoders`), is built on the
    ``meta`` device and gets the file's tensors assigned (never a random init first). Windows of
    several tiles go through the encoder together, ``batch`` at a time, at ``precision``
    (autocast; default fp16 on CUDA, fp32 on CPU; :func:`resolve_precision`).
    """

    encoder: str = "h-optimus-0"
    weights: str | None = None
    device: str = "cpu"
    batch: int | None = None  # windows per forward: 8 on CPU, 64 on CUDA
    precision: str | None = None  # fp32 | fp16 | bf16; None: fp16 on CUDA, fp32 on CPU
    _model: Any = field(default=None, init=False, repr=False)
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from ..core.encoders import resolve_encoder

        self.spec = resolve_encoder(self.encoder)
        self.device = resolve_device(self.device)
        self.precision = resolve_precision(self.precision, self.device)
        if self.batch is None:
            self.batch = 64 if self.device.startswith("cuda") else 8
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")
        if self.weights is None and not self.spec.random_ok:
            raise ModelError(f"encoder {self.encoder!r} needs a local weights file (--weights FILE); "
                             "random weights are used only for the explicit test encoder tiny-vit-test")
        if self.weights is not None:
            from ..core.weights import file_digest

            p = Path(self.weights)
            if not p.is_file():
                raise ModelError("weights file not found", path=p)
            self._digest = file_digest(p)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"tok_{i}" for i in range(self._load().num_features))

    def config(self) -> dict[str, Any]:
        s = self.spec
        cfg = {"backbone": "timm", "encoder": s.name, "timm_name": s.timm_name, "timm_kwargs": s.timm_kwargs,
               "mpp": s.mpp, "input_size": s.input_size, "mean": list(s.mean), "std": list(s.std),
               "weights_sha256": self._digest or "random-seed-0"}
        if self.precision != "fp32":  # fp16/bf16 features differ in the last bits: their own cache
            cfg["precision"] = self.precision
        return cfg

    @property
    def id(self) -> str:
        return f"timm-{self.spec.name}-" + hashlib.sha256(
            json.dumps(self.config(), sort_keys=True).encode()).hexdigest()[:12]

    def _load(self) -> Any:
        if self._model is None:
            from ..core.encoders import build_timm_model

            model = build_timm_model(self.spec, weights=self.weights, seed=0)
            self._model = model.eval().to(self.device)
        return self._model

    def _windows(self, image: np.ndarray, mpp: float) -> tuple[Any, tuple[int, int], float]:
        """Normalised (n_h * n_w, 3, win, win) windows of one image at the encoder's pixel size,
        the window grid (n_h, n_w) and the size of one token in image pixels."""
        import torch
        import torch.nn.functional as F

        patch = int(self._load().patch_embed.patch_size[0])
        scale = mpp / self.spec.mpp  # image px -> encoder px
        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
        nh, nw = max(patch, int(round(h * scale))), max(patch, int(round(w * scale)))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        mean = torch.tensor(self.spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        win = self.spec.input_size
        ph, pw = -(-nh // win) * win, -(-nw // win) * win
        x = F.pad(x, (0, pw - nw, 0, ph - nh))
        windows = x.unfold(2, win, win).unfold(3, win, win)  # (1, 3, nH, nW, win, win)
        n_h, n_w = windows.shape[2], windows.shape[3]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, win, win), (n_h, n_w), patch / scale

    def _forward(self, windows: Any) -> Any:
        """Patch tokens (N, g*g, C) float32 on CPU of (N, 3, win, win) windows, ``batch`` at a time."""
        import torch

        model = self._load()
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        outs = []
        cuda = self.device.startswith("cuda")
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(self.precision))
        with torch.inference_mode(), torch.autocast(device_type="cuda" if cuda else "cpu",
                                                    dtype=half or torch.bfloat16, enabled=half is not None):
            for s in range(0, len(windows), int(self.batch or 1)):
                xb = windows[s:s + int(self.batch or 1)].to(self.device, non_blocking=cuda)
                outs.append(model.forward_features(xb)[:, prefix:].float().cpu())
        return torch.cat(outs) if outs else torch.zeros((0, 0, 0))

    def batch_tokens(self, images: list[np.ndarray], mpps: list[float]) -> list[tuple[np.ndarray, float]]:
        """:meth:`tile_tokens` of several images, their windows batched through the encoder together."""
        import torch

        prepared = [self._windows(img, float(m)) for img, m in zip(images, mpps)]
        if not prepared:
            return []
        tokens = self._forward(torch.cat([p[0] for p in prepared]))
        g = self.spec.input_size // int(self._load().patch_embed.patch_size[0])
        out, start = [], 0
        for windows, (n_h, n_w), tok_px in prepared:
            t = tokens[start:start + len(windows)]
            start += len(windows)
            t = t.reshape(n_h, n_w, g, g, -1).permute(0, 2, 1, 3, 4).reshape(n_h * g, n_w * g, -1)
            out.append((t.numpy(), tok_px))
        return out

    def tile_tokens(self, image: np.ndarray, mpp: float) -> tuple[np.ndarray, float]:
        """Patch tokens of one image at the encoder's pixel size.

        Returns (gh, gw, C) float32 tokens and the size of one token in image pixels.
        """
        return self.batch_tokens([image], [mpp])[0]

    def extract(self, store: "Store", nuclei: "pd.DataFrame", *,
                progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        from scipy import sparse

        per_image: dict[str, np.ndarray] = {}
        for ids, imgs, inss, mpps in iter_image_batches(store, list(nuclei["image_id"].unique()),
                                                        progress=progress, desc="timm features"):
            toks = self.batch_tokens(list(imgs), [float(m) for m in mpps])
            for image_id, ins, (tok, tok_px) in zip(ids, inss, toks):
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
                  seed: int = 0, device: str = "cpu", precision: str | None = None) -> Backbone:
    """Build a backbone by name (``handcrafted``, ``cnn``, ``timm``); ``precision`` is the timm
    encoder's (:func:`resolve_precision`)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if precision is not None and name != "timm":
        raise ConfigError(f"--precision applies to the timm backbone, not {name!r}")
    if name == "handcrafted":
        return HandcraftedBackbone()
    if name == "cnn":
        return CNNBackbone(seed=seed, device=device)
    return TimmBackbone(encoder=encoder or "h-optimus-0", weights=weights, device=device, precision=precision)
