"""The teacher: a frozen foundation encoder + a trainable UNETR/CellViT-style decoder with
HoVer-Net heads.

Dimensions: B tiles, H×W pixels at the dataset's pixel size (~0.25 µm/px, H and W multiples of
32), K = 8 type channels, 4 encoder feature levels of (C_l, g_h, g_w).

``forward(x)``: x (B, 3, H, W) float32 RGB in [0, 1] → ``{"np": (B, 2, H, W) logits,
"hv": (B, 2, H, W) in [-1, 1], "tp": (B, K, H, W) logits}``. Inside, the tile is normalised
(mean/std are buffers), resampled to the encoder's pixel size (rounded to whole patches), encoded
into 4 feature maps, and decoded back to H×W: the deepest features start at H/16, the shallower
ones join at H/8, H/4, H/2 (each projected, resized and refined), and a small convolutional stem on
the full-resolution tile joins at H. ``encode``/``decode`` split the two halves so that training
computes the frozen encoder's features once per tile and caches them.

>>> t = Teacher(build_encoder("micro-vit"), decoder_channels=(32, 32, 16, 16, 8))
>>> sorted(t(torch.rand(1, 3, 64, 64)))
['hv', 'np', 'tp']
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.taxonomy import Taxonomy
from ..errors import ConfigError
from .encoders import EncoderSpec, FeatureEncoder, build_encoder

__all__ = [
    "ConvBlock",
    "HoVerHeads",
    "Teacher",
    "TeacherConfig",
    "build_teacher",
    "count_parameters",
    "model_meta",
]

DATA_MPP = 0.25


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Exact number of parameters (works on the ``meta`` device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_meta(
    *, kind: str, architecture: str, mpp: float, input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
    taxonomy: Taxonomy | None = None,
) -> dict[str, Any]:
    """The metadata every model exposes as ``model.meta`` (written into exported models)."""
    tax = taxonomy or Taxonomy.default()
    return {
        "kind": kind,
        "architecture": architecture,
        "classes": ["Background", *tax.names],
        "colors": ["#000000", *(c.color for c in tax.classes)],
        "mpp": float(mpp),
        "input_size": int(input_size),
        "input_multiple": 32,
        "input_range": [0.0, 1.0],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "outputs": {"np": "logits (B,2,H,W)", "hv": "(B,2,H,W) in [-1,1], h then v", "tp": "logits (B,K,H,W)"},
    }


class ConvBlock(nn.Sequential):
    """Two 3×3 conv + BatchNorm + ReLU, then optional Dropout2d."""

    def __init__(self, cin: int, cout: int, *, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class HoVerHeads(nn.Module):
    """Three branches on a (B, C, H, W) map: np (2 logits), hv (2, tanh), tp (K logits)."""

    def __init__(self, cin: int, n_types: int) -> None:
        super().__init__()

        def branch(nout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, padding=1, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU(inplace=True),
                nn.Conv2d(cin, nout, 1),
            )

        self.np_head = branch(2)
        self.hv_head = branch(2)
        self.tp_head = branch(n_types)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"np": self.np_head(x), "hv": torch.tanh(self.hv_head(x)), "tp": self.tp_head(x)}


@dataclass
class TeacherConfig:
    """Decoder hyper-parameters. ``decoder_channels`` are the widths at H/16, H/8, H/4, H/2, H."""

    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 32)
    n_types: int = 8
    data_mpp: float = DATA_MPP
    tile_size: int = 256

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)  # type: ignore[assignment]
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ConfigError(f"decoder_channels must be 5 positive ints, got {self.decoder_channels}")
        if self.n_types < 2:
            raise ConfigError(f"n_types must be >= 2, got {self.n_types}")
        if not self.data_mpp > 0:
            raise ConfigError(f"data_mpp must be > 0, got {self.data_mpp}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d


class Teacher(nn.Module):
    """Frozen :class:`FeatureEncoder` + trainable decoder + :class:`HoVerHeads`."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        *,
        decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 32),
        n_types: int = 8,
        data_mpp: float = DATA_MPP,
        tile_size: int = 256,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        super().__init__()
        self.config = TeacherConfig(tuple(decoder_channels), n_types, data_mpp, tile_size)  # type: ignore[arg-type]
        c16, c8, c4, c2, c1 = self.config.decoder_channels
        spec: EncoderSpec = encoder.spec
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.scale = data_mpp / spec.mpp  # encoder pixels per data pixel
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", (torch.outer(k, k) / 16).expand(3, 1, 3, 3).clone(), persistent=False)
        self.patch = encoder.patch
        ch = encoder.channels

        def proj(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        # feature level l (0 shallow .. 3 deep) joins the decoder at stride 2, 4, 8, 16
        self.proj = nn.ModuleList([proj(ch[0], c2), proj(ch[1], c4), proj(ch[2], c8), proj(ch[3], c16)])
        self.bottom = ConvBlock(c16, c16)
        self.up8 = ConvBlock(c16 + c8, c8)
        self.up4 = ConvBlock(c8 + c4, c4)
        self.up2 = ConvBlock(c4 + c2, c2)
        self.stem = ConvBlock(3, c1)
        self.up1 = ConvBlock(c2 + c1, c1)
        self.heads = HoVerHeads(c1, n_types)
        self.meta = model_meta(
            kind="teacher",
            architecture=f"cellcurate-teacher/{spec.name}",
            mpp=data_mpp,
            input_size=tile_size,
            mean=spec.mean,
            std=spec.std,
            taxonomy=taxonomy,
        )

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm/dropout of the encoder never switch to training
        return self

    def encoder_size(self, h: int, w: int) -> tuple[int, int]:
        """Encoder input size for an (h, w) tile: resampled by pixel size, whole patches (≥ 2)."""
        p = self.patch
        return (max(2, round(h * self.scale / p)) * p, max(2, round(w * self.scale / p)) * p)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] → 4 feature maps of the frozen encoder (no gradient)."""
        size = self.encoder_size(int(x.shape[-2]), int(x.shape[-1]))
        z = self.normalise(x)
        if self.scale < 0.75:  # fixed [1, 2, 1]/4 low-pass before downsampling (exportable antialias)
            z = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), self.blur, groups=3)
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return [f.detach() for f in self.encoder(z)]

    def decode(self, feats: list[torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode cached/fresh features ``feats`` with the tile ``x`` (B, 3, H, W) in [0, 1]."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % 32 or w % 32:
            raise ConfigError(f"teacher input must be a multiple of 32 pixels, got {h}×{w}")

        def level(i: int, stride: int) -> torch.Tensor:
            f = self.proj[i](feats[i].to(x.dtype))
            return F.interpolate(f, size=(h // stride, w // stride), mode="bilinear", align_corners=False)

        def up(t: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, scale_factor=2.0, mode="bilinear", align_corners=False)

        y = self.bottom(level(3, 16))
        y = self.up8(torch.cat([up(y), level(2, 8)], dim=1))
        y = self.up4(torch.cat([up(y), level(1, 4)], dim=1))
        y = self.up2(torch.cat([up(y), level(0, 2)], dim=1))
        y = self.up1(torch.cat([up(y), self.stem(self.normalise(x))], dim=1))
        return self.heads(y)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(x), x)

    def forward_tuple(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.forward(x)
        return out["np"], out["hv"], out["tp"]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]


def build_teacher(
    encoder: str | EncoderSpec = "h-optimus-0",
    *,
    weights: str | None = None,
    random_init: bool = False,
    meta: bool = False,
    config: TeacherConfig | None = None,
    taxonomy: Taxonomy | None = None,
) -> Teacher:
    """Build a teacher from an encoder name/spec and local weights (see :func:`build_encoder`).

    With ``meta=True`` the whole teacher lives on the ``meta`` device: no memory, no weights,
    exact parameter counts (H-Optimus-0: 1,134,774,272 encoder parameters).
    """
    cfg = config or TeacherConfig()
    enc = build_encoder(encoder, weights=weights, random_init=random_init, meta=meta)
    kwargs = dict(
        decoder_channels=cfg.decoder_channels,
        n_types=cfg.n_types,
        data_mpp=cfg.data_mpp,
        tile_size=cfg.tile_size,
        taxonomy=taxonomy,
    )
    if meta:
        with torch.device("meta"):
            return Teacher(enc, **kwargs)  # type: ignore[arg-type]
    return Teacher(enc, **kwargs)  # type: ignore[arg-type]

