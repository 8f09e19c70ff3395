"""Image encoders from timm, by name and local weights file.

An encoder turns a normalised (B, 3, h, w) image at *its own* pixel size into a list of L feature
maps (B, C_l, g_h, g_w) taken from several depths (ViT blocks or CNN stages). The teacher resamples
tiles from the dataset's pixel size (~0.25 µm/px) to the encoder's (:attr:`EncoderSpec.mpp`) and
its decoder brings the features back to the tile's resolution.

Dimensions: B tiles, L feature levels (always 4), C_l channels, g_h×g_w feature grid.

Rules
-----
- A named foundation encoder (``h-optimus-0`` or any timm name) needs a local weights file;
  without one, :func:`build_encoder` raises :class:`~cellcurate.errors.ModelError` unless the
  caller passes ``random_init=True`` (tests, demos). The ``tiny-*`` specs are random by design.
- Weights load with ``torch.load(weights_only=True)`` (``.pt``/``.pth``/``.bin``) or safetensors
  (``.safetensors``); missing keys, unexpected keys or a shape mismatch raise ``ModelError`` naming
  the file. A model is never left silently random.

>>> spec = resolve_encoder("h-optimus-0")
>>> spec.timm_name, spec.mpp, spec.input_size
('vit_giant_patch14_reg4_dinov2', 0.5, 224)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelError

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "FeatureEncoder",
    "build_encoder",
    "file_digest",
    "load_encoder_weights",
    "resolve_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """What is needed to build an encoder and feed it.

    Attributes
    ----------
    name
        The name users type (``"h-optimus-0"``, ``"tiny-vit"`` or a timm model name).
    timm_name
        The timm architecture.
    timm_kwargs
        Extra keyword arguments for ``timm.create_model`` (e.g. ``init_values``, ``depth``).
    mpp
        Pixel size the encoder was trained at, µm/px.
    input_size
        Native input size in pixels (the teacher's ``encoder_input="native"`` windows use the
        built ViT's own ``img_size``, which the known specs set to this value).
    mean, std
        Per-channel normalisation of RGB in [0, 1].
    random_ok
        True for test/demo configurations that are meant to be randomly initialised.
    """

    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    mpp: float = 0.5
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    random_ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        try:
            return cls(
                name=str(d["name"]),
                timm_name=str(d["timm_name"]),
                timm_kwargs=dict(d.get("timm_kwargs", {})),
                mpp=float(d["mpp"]),
                input_size=int(d["input_size"]),
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                random_ok=bool(d.get("random_ok", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"encoder spec is incomplete or malformed ({exc!r})") from None


#: Known encoders. ``h-optimus-0``: Bioptimus H-Optimus-0 (ViT-g/14 with 4 registers, ~1.13e9
#: parameters), 224 px at 0.5 µm/px, with its published normalisation.
ENCODERS: dict[str, EncoderSpec] = {
    "h-optimus-0": EncoderSpec(
        name="h-optimus-0",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"init_values": 1e-5, "img_size": 224, "dynamic_img_size": True},
        mpp=0.5,
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
    ),
    # A 4-block ViT-Ti/16 (~2 M parameters): tests and the CPU demo; random weights by design.
    "tiny-vit": EncoderSpec(
        name="tiny-vit",
        timm_name="vit_tiny_patch16_224",
        timm_kwargs={"depth": 4, "img_size": 224, "dynamic_img_size": True},
        mpp=0.5,
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        random_ok=True,
    ),
    # Two blocks, 64 channels: the fastest configuration for unit tests.
    "micro-vit": EncoderSpec(
        name="micro-vit",
        timm_name="vit_tiny_patch16_224",
        timm_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 224, "dynamic_img_size": True},
        mpp=0.5,
        input_size=224,
        random_ok=True,
    ),
}


def resolve_encoder(name: str, *, mpp: float | None = None, **timm_kwargs: Any) -> EncoderSpec:
    """Return the :class:`EncoderSpec` of a known name or of any timm architecture.

    Parameters
    ----------
    name
        A key of :data:`ENCODERS` (case-insensitive) or a timm model name.
    mpp
        Override the encoder's pixel size (µm/px); timm models default to 0.5.
    **timm_kwargs
        Extra arguments merged into the spec's ``timm_kwargs``.
    """
    import timm

    key = name.strip().lower()
    if key in ENCODERS:
        spec = ENCODERS[key]
    elif timm.is_model(name):
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # timm raises various errors for models without a default cfg
            cfg = None
        mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN)) if cfg is not None else IMAGENET_MEAN
        std = tuple(getattr(cfg, "std", IMAGENET_STD)) if cfg is not None else IMAGENET_STD
        size = int(getattr(cfg, "input_size", (3, 224, 224))[-1]) if cfg is not None else 224
        spec = EncoderSpec(name=name, timm_name=name, timm_kwargs={"dynamic_img_size": True}, mpp=0.5,
                           input_size=size, mean=mean, std=std)  # type: ignore[arg-type]
    else:
        known = ", ".join(sorted(ENCODERS))
        raise ConfigError(f"unknown encoder {name!r}: expected one of {known} or a timm model name")
    if mpp is not None:
        if not mpp > 0:
            raise ConfigError(f"encoder mpp must be > 0, got {mpp}")
        spec = replace(spec, mpp=float(mpp))
    if timm_kwargs:
        spec = replace(spec, timm_kwargs={**spec.timm_kwargs, **timm_kwargs})
    return spec


def file_digest(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """sha256 of a file, hex (used to key feature caches and to check a teacher's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _create(spec: EncoderSpec) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **spec.timm_kwargs}
    try:
        return timm.create_model(spec.timm_name, **kwargs)
    except TypeError:
        if "dynamic_img_size" not in kwargs:
            raise
        kwargs.pop("dynamic_img_size")  # CNNs take any size and do not know this argument
        return timm.create_model(spec.timm_name, **kwargs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError("encoder weights file not found", path=path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # unpickling refused, truncated zip, bad safetensors header, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot read weights safely ({type(exc).__name__}: {first})", path=path) from None
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("weights file does not hold a state dict of tensors", path=path)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_encoder_weights(model: nn.Module, path: str | os.PathLike[str], *, assign: bool = False) -> None:
    """Load a state dict from ``path`` into ``model`` strictly.

    Keys of a classification head (``head.*``, ``fc.*``) that the headless model lacks are
    dropped; every other missing/unexpected key or shape mismatch raises ``ModelError``.

    Parameters
    ----------
    model
        The timm model (headless, ``num_classes=0``).
    path
        ``.safetensors`` or a ``torch.save`` file (read with ``weights_only=True``).
    assign
        Pass ``assign=True`` to ``load_state_dict`` (used when the model lives on ``meta``).
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise ModelError(f"weights do not match the encoder: {'; '.join(parts)}", path=path)
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ModelError(
            f"weights do not match the encoder: {len(bad)} shape mismatches (e.g. {k}: file {got}, model {want})",
            path=path,
        )
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise ModelError(f"weights do not match the encoder ({str(exc).splitlines()[0]})", path=path) from None


class FeatureEncoder(nn.Module):
    """A timm model that returns 4 feature maps (B, C_l, g_h, g_w) from several depths.

    For ViTs (a ``blocks`` attribute) the levels are the outputs of blocks at 1/4, 1/2, 3/4 and
    the full depth (blocks 9, 19, 29, 39 of H-Optimus-0's 40); for CNNs the last 4 stages.
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        blocks = getattr(backbone, "blocks", None)
        if blocks is not None and hasattr(backbone, "patch_embed"):
            depth = len(blocks)
            self.levels = [max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)]
            self.patch = int(backbone.patch_embed.patch_size[0])
        else:
            self.levels = [-4, -3, -2, -1]
            self.patch = 32
        self._unique = sorted(set(self.levels))
        #: native input side (px) of a ViT with absolute position embeddings, else None
        self.native_size: int | None = None
        if blocks is not None and getattr(backbone, "pos_embed", None) is not None:
            img = getattr(backbone.patch_embed, "img_size", None)
            self.native_size = int(img[0]) if img is not None else int(spec.input_size)
        self.channels = self._probe_channels()
        #: the local weights file the backbone was loaded from (None: random init)
        self.weights: str | None = None
        self._digest: str | None = None

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of :attr:`weights` (computed once)."""
        if self.weights is not None and self._digest is None:
            self._digest = file_digest(self.weights)
        return self._digest

    @property
    def encoder_id(self) -> str:
        """Identifies the features this encoder computes (architecture + weights), for caches."""
        import json

        spec = json.dumps({**self.spec.to_dict(), "levels": self.levels}, sort_keys=True)
        weights = self.weights_sha256 if self.weights is not None else "random:" + _param_digest(self)
        return hashlib.sha256((spec + "|" + weights).encode()).hexdigest()[:24]

    def _probe_channels(self) -> list[int]:
        device = next(self.backbone.parameters()).device
        with torch.no_grad():
            x = torch.zeros(1, 3, 2 * self.patch, 2 * self.patch, device=device)
            feats = self.forward(x)
        return [int(f.shape[1]) for f in feats]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, h, w) normalised, h and w multiples of :attr:`patch` -> 4 × (B, C_l, g_h, g_w)."""
        if self.levels[0] < 0:
            out = self.backbone.forward_intermediates(x, indices=4, intermediates_only=True)
            return list(out)
        out = self.backbone.forward_intermediates(
            x, indices=self._unique, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        by_index = dict(zip(self._unique, out))
        return [by_index[i] for i in self.levels]


def build_encoder(
    name: str | EncoderSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    meta: bool = False,
) -> FeatureEncoder:
    """Build a frozen-ready :class:`FeatureEncoder` from a name (or spec) and a local weights file.

    Parameters
    ----------
    name
        ``"h-optimus-0"``, ``"tiny-vit"``, ``"micro-vit"``, a timm model name, or an ``EncoderSpec``.
    weights
        Local weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``).
    random_init
        Explicitly accept random weights (tests, demos). Ignored when ``weights`` is given.
    meta
        Build on the ``meta`` device without weights (parameter counts, shapes).

    Raises
    ------
    ModelError
        No weights for a named foundation encoder, an unreadable file, or weights that do not fit.
    """
    spec = name if isinstance(name, EncoderSpec) else resolve_encoder(name)
    if meta:
        with torch.device("meta"):
            return FeatureEncoder(_create(spec), spec)
    if weights is None:
        if not (random_init or spec.random_ok):
            raise ModelError(
                f"encoder {spec.name!r} needs a local weights file (--weights); "
                "random initialisation must be asked for explicitly (random_init=True / --tiny)"
            )
        return FeatureEncoder(_create(spec), spec)
    path = Path(weights)
    if not path.is_file():
        raise ModelError("encoder weights file not found", path=path)
    # Build on meta and assign the loaded tensors: no time spent on a random init of 1e9 params.
    with torch.device("meta"):
        backbone = _create(spec)
    load_encoder_weights(backbone, path, assign=True)
    leftovers = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if leftovers:  # non-persistent buffers: rebuild for real and load again
        backbone = _create(spec)
        load_encoder_weights(backbone, path)
    enc = FeatureEncoder(backbone, spec)
    enc.weights = str(path.resolve())
    return enc


def _param_digest(module: nn.Module) -> str:
    """Digest of a (small, randomly initialised) module's parameters."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(b"meta" if t.is_meta else t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
