"""The one encoder registry: every timm encoder cellcurate knows by name, for relabel features
(:class:`cellcurate.relabel.backbones.TimmBackbone`) and for the models
(:func:`cellcurate.models.encoders.build_encoder`) alike.

Adding an encoder is one entry in :data:`ENCODERS` (its timm architecture, keyword arguments,
pixel size and normalisation); both users pick it up by name. Any other timm architecture name
works too, with ImageNet normalisation at 0.5 µm/px.

Building (:func:`create_timm_model`, :func:`build_timm_model`) always happens on the ``meta``
device first when a weights file is given, then the file's tensors are assigned: a 1.1e9-parameter
encoder is never randomly initialised just to be overwritten. Without a file, a named foundation
encoder is refused unless the caller asks for random weights (tests, demos).

torch and timm are imported inside the functions.

>>> spec = resolve_encoder("h-optimus-0")
>>> spec.timm_name, spec.mpp, spec.input_size
('vit_giant_patch14_reg4_dinov2', 0.5, 224)
>>> resolve_encoder("vit_giant_patch14_reg4_dinov2").name  # its timm name finds it too
'h-optimus-0'
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from .weights import load_state_dict_strict

__all__ = ["ENCODERS", "EncoderSpec", "build_timm_model", "create_timm_model", "resolve_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: H-Optimus-0's published normalisation (also used by the random test encoders).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


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
        Native input size in pixels (relabel features run windows of this size).
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


_REGISTRY: tuple[EncoderSpec, ...] = (
    # Bioptimus H-Optimus-0: ViT-g/14 with 4 registers (~1.13e9 parameters), 224 px at 0.5 µm/px.
    EncoderSpec("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
                {"init_values": 1e-5, "img_size": 224, "dynamic_img_size": True}, 0.5, 224,
                HOPTIMUS_MEAN, HOPTIMUS_STD),
    # A 4-block ViT-Ti/16 (~2 M parameters): tests and the CPU demo; random weights by design.
    EncoderSpec("tiny-vit", "vit_tiny_patch16_224", {"depth": 4, "img_size": 224, "dynamic_img_size": True},
                0.5, 224, HOPTIMUS_MEAN, HOPTIMUS_STD, random_ok=True),
    # Two blocks, 64 channels: the fastest configuration for model unit tests.
    EncoderSpec("micro-vit", "vit_tiny_patch16_224",
                {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 224, "dynamic_img_size": True},
                0.5, 224, random_ok=True),
    # Two blocks, 32 channels, 8 px patches on 64 px windows: relabel feature tests.
    EncoderSpec("tiny-vit-test", "vit_tiny_patch16_224",
                {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64, "patch_size": 8,
                 "dynamic_img_size": True}, 0.5, 64, HOPTIMUS_MEAN, HOPTIMUS_STD, random_ok=True),
)

#: Encoders known by name (lower case).
ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in _REGISTRY}


def resolve_encoder(name: str, *, mpp: float | None = None, **timm_kwargs: Any) -> EncoderSpec:
    """Return the :class:`EncoderSpec` of a known name (case-insensitive), of a known encoder's
    timm architecture, or of any timm architecture.

    Parameters
    ----------
    name
        A key of :data:`ENCODERS` or a timm model name.
    mpp
        Override the encoder's pixel size (µm/px); timm models default to 0.5.
    **timm_kwargs
        Extra arguments merged into the spec's ``timm_kwargs``.
    """
    key = name.strip().lower()
    by_timm = {s.timm_name: s for s in _REGISTRY if not s.random_ok}
    if key in ENCODERS:
        spec = ENCODERS[key]
    elif name in by_timm:
        spec = by_timm[name]
    else:
        import timm

        if not timm.is_model(name):
            known = ", ".join(sorted(ENCODERS))
            raise ConfigError(f"unknown encoder {name!r}: expected one of {known} or a timm model name")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # timm raises various errors for models without a default cfg
            cfg = None
        mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN)) if cfg is not None else IMAGENET_MEAN
        std = tuple(getattr(cfg, "std", IMAGENET_STD)) if cfg is not None else IMAGENET_STD
        size = int(getattr(cfg, "input_size", (3, 224, 224))[-1]) if cfg is not None else 224
        spec = EncoderSpec(name=name, timm_name=name, timm_kwargs={"dynamic_img_size": True}, mpp=0.5,
                           input_size=size, mean=mean, std=std)  # type: ignore[arg-type]
    if mpp is not None:
        if not mpp > 0:
            raise ConfigError(f"encoder mpp must be > 0, got {mpp}")
        spec = replace(spec, mpp=float(mpp))
    if timm_kwargs:
        spec = replace(spec, timm_kwargs={**spec.timm_kwargs, **timm_kwargs})
    return spec


def create_timm_model(spec: EncoderSpec, *, meta: bool = False) -> Any:
    """``timm.create_model`` of the spec, headless (``num_classes=0``), never downloading weights.

    ``meta=True`` builds on the ``meta`` device (no memory, no init). CNNs that do not know
    ``dynamic_img_size`` are built without it.
    """
    import timm
    import torch

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, **spec.timm_kwargs}

    def make() -> Any:
        try:
            return timm.create_model(spec.timm_name, **kwargs)
        except TypeError:
            if "dynamic_img_size" not in kwargs:
                raise
            kwargs.pop("dynamic_img_size")  # CNNs take any size and do not know this argument
            return timm.create_model(spec.timm_name, **kwargs)

    if meta:
        with torch.device("meta"):
            return make()
    return make()


def build_timm_model(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None = None,
                     random_init: bool = False, seed: int | None = None) -> Any:
    """A headless timm model on CPU: the file's weights, or (explicitly) random ones.

    With ``weights`` the model is created on the ``meta`` device and the file's tensors assigned
    (strict: :func:`~cellcurate.core.weights.load_state_dict_strict`); buffers that the file does
    not hold (non-persistent ones) are then rebuilt for real. Without, a spec that is not
    ``random_ok`` raises :class:`~cellcurate.errors.ModelError` unless ``random_init``; random
    weights are drawn from torch's global generator, seeded first with ``seed`` when given.
    """
    import torch

    if weights is None:
        if not (random_init or spec.random_ok):
            raise ModelError(
                f"encoder {spec.name!r} needs a local weights file (--weights); "
                "random initialisation must be asked for explicitly (random_init=True / --tiny)"
            )
        if seed is not None:
            torch.manual_seed(seed)
        return create_timm_model(spec)
    path = Path(weights)
    if not path.is_file():
        raise ModelError("encoder weights file not found", path=path)
    model = create_timm_model(spec, meta=True)
    load_state_dict_strict(model, path, assign=True, what="encoder weights")
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:  # non-persistent buffers (e.g. position ids): rebuild for real and load again
        model = create_timm_model(spec)
        load_state_dict_strict(model, path, what="encoder weights")
    return model
