"""Image encoders from timm, by name and local weights file.

The names, specs and weight loading live in the one registry :mod:`cellcurate.core.encoders`
(shared with relabel features); this module adds the multi-level :class:`FeatureEncoder`.

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
from pathlib import Path

import torch
from torch import nn

from ..core.encoders import ENCODERS, EncoderSpec, build_timm_model, resolve_encoder
from ..core.weights import file_digest, load_state_dict_strict

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "FeatureEncoder",
    "build_encoder",
    "file_digest",
    "load_encoder_weights",
    "resolve_encoder",
]


def load_encoder_weights(model: nn.Module, path: str | os.PathLike[str], *, assign: bool = False) -> None:
    """Load a state dict from ``path`` into ``model`` strictly (see
    :func:`cellcurate.core.weights.load_state_dict_strict`)."""
    load_state_dict_strict(model, path, assign=assign, what="encoder weights")


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
            self.patch = int(backbone.patch_embed.patch_size[0])  # type: ignore[union-attr,index]
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
        digest = self.weights_sha256 if self.weights is not None else None
        weights = digest if digest is not None else "random:" + _param_digest(self)
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
            out = self.backbone.forward_intermediates(x, indices=4, intermediates_only=True)  # type: ignore[operator]
            return list(out)
        out = self.backbone.forward_intermediates(  # type: ignore[operator]
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
        from ..core.encoders import create_timm_model

        with torch.device("meta"):
            return FeatureEncoder(create_timm_model(spec, meta=True), spec)
    # With a file: built on meta and the tensors assigned (no random init of 1e9 parameters).
    backbone = build_timm_model(spec, weights=weights, random_init=random_init)
    enc = FeatureEncoder(backbone, spec)
    if weights is not None:
        enc.weights = str(Path(weights).resolve())
    return enc


def _param_digest(module: nn.Module) -> str:
    """Digest of a (small, randomly initialised) module's parameters."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(b"meta" if t.is_meta else t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
