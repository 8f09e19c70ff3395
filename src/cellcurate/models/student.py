"""The student: a lightweight encoder-decoder with the teacher's HoVer-Net heads or Cellpose-style
flow heads.

Dimensions: B tiles, H×W pixels at the dataset's pixel size (H, W multiples of
:attr:`Student.input_multiple`: 32 for the U-Net, 64 for a MobileViT), K = 8 type channels, L = 5
levels of widths ``channels`` at strides 1, 2, 4, 8, 16.

Two backbones (:attr:`StudentConfig.encoder`):

- ``None``: the U-Net below (5 levels of two-conv blocks, widths ``channels``), with the presets
  of :data:`STUDENT_PRESETS` (``tiny`` for the demo, ``default``, ``paper`` ≈ 48× fewer
  parameters than H-Optimus-0);
- a timm name (``mobilevit_xxs``, ``mobilevit_xs``, ``mobilevit_s``; random init, nothing is
  downloaded): its 5 feature maps at strides 2..32 feed a U-Net decoder of widths ``channels``
  (stride 16 → 1) joined at full resolution by a small convolutional stem. The authors' deployed
  student is ``mobilevit_*`` + ``head="flow"``.

Two heads (:attr:`StudentConfig.head`), the same three outputs: ``"hover"`` (``hv`` = HoVer
horizontal/vertical distance maps) and ``"flow"`` (``hv`` = the Cellpose flow field, x then y
components, unit length inside nuclei; see :mod:`cellcurate.models.flows`). ``meta["head"]`` tells
post-processing which one it is.

Same contract as the teacher: ``forward(x)`` takes (B, 3, H, W) RGB in [0, 1], normalises with
buffers, and returns ``{"np", "hv", "tp"}`` at H×W. It runs at the dataset's pixel size directly
(no resampling). Layer-wise dropout: a Dropout2d after every block whose rate grows linearly with
depth, from 0 at full resolution to ``dropout`` at the bottleneck (and back down in the decoder).

>>> s = Student(channels=(8, 16, 32, 64, 64))
>>> s(torch.rand(1, 3, 64, 64))["tp"].shape
torch.Size([1, 8, 64, 64])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.taxonomy import Taxonomy
from ..errors import ConfigError
from .encoders import ENCODERS
from .teacher import DATA_MPP, ConvBlock, HoVerHeads, model_meta

__all__ = [
    "HEADS",
    "PRESET_PARAMETERS",
    "STUDENT_PRESETS",
    "TINY_STUDENT_CHANNELS",
    "Student",
    "StudentConfig",
    "student_preset",
]

TINY_STUDENT_CHANNELS = (8, 16, 32, 64, 64)
_H_OPTIMUS = ENCODERS["h-optimus-0"]

#: Output heads: HoVer-Net distance maps or Cellpose flows in the ``hv`` output.
HEADS: tuple[str, ...] = ("hover", "flow")

#: U-Net widths by preset name. ``paper``: ≈ 48× fewer parameters than H-Optimus-0 (1.137e9),
#: the ratio of the CellGenNet paper.
STUDENT_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": TINY_STUDENT_CHANNELS,
    "default": (32, 64, 128, 256, 320),
    "paper": (64, 128, 256, 512, 704),
}

#: Exact parameter counts of the presets with the HoVer head and 8 types (a test recounts them).
PRESET_PARAMETERS: dict[str, int] = {"tiny": 309_172, "default": 5_554_604, "paper": 23_569_484}

#: Decoder widths (stride 16 → 1) of a student on a timm encoder when none are given.
TIMM_DECODER_CHANNELS = (128, 96, 64, 32, 32)


@dataclass
class StudentConfig:
    """Student hyper-parameters (saved in config.json)."""

    channels: tuple[int, int, int, int, int] = (32, 64, 128, 256, 320)
    n_types: int = 8
    dropout: float = 0.2
    data_mpp: float = DATA_MPP
    tile_size: int = 256
    #: None: the teacher's normalisation when distilling (H-Optimus-0's when built standalone)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    #: ``"hover"`` or ``"flow"`` (see the module docstring)
    head: str = "hover"
    #: None: the U-Net; else a timm encoder name (e.g. ``"mobilevit_xs"``), ``channels`` = decoder widths
    encoder: str | None = None

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        if self.mean is not None:
            self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        if self.std is not None:
            self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.channels) != 5 or min(self.channels) < 1:
            raise ConfigError(f"student channels must be 5 positive ints, got {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"student dropout must be in [0, 1), got {self.dropout}")
        if self.n_types < 2:
            raise ConfigError(f"n_types must be >= 2, got {self.n_types}")
        if self.head not in HEADS:
            raise ConfigError(f"student head must be one of {HEADS}, got {self.head!r}")
        if self.encoder is not None:
            import timm

            if not timm.is_model(self.encoder):
                raise ConfigError(f"student encoder {self.encoder!r} is not a timm model name (e.g. mobilevit_xs)")
        if (self.mean is not None and len(self.mean) != 3) or (
            self.std is not None and (len(self.std) != 3 or min(self.std) <= 0)
        ):
            raise ConfigError(f"mean/std must be 3 values each (std > 0), got {self.mean} / {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["mean"] = None if self.mean is None else list(self.mean)
        d["std"] = None if self.std is None else list(self.std)
        return d


class Student(nn.Module):
    """U-Net (5 levels) + :class:`~cellcurate.models.teacher.HoVerHeads`; see the module docstring."""

    def __init__(
        self,
        *,
        channels: tuple[int, int, int, int, int] = StudentConfig.channels,
        n_types: int = 8,
        dropout: float = 0.2,
        data_mpp: float = DATA_MPP,
        tile_size: int = 256,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        head: str = "hover",
        encoder: str | None = None,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        super().__init__()
        self.config = StudentConfig(
            tuple(channels), n_types, dropout, data_mpp, tile_size,
            tuple(_H_OPTIMUS.mean if mean is None else mean), tuple(_H_OPTIMUS.std if std is None else std),
            head, encoder,
        )  # type: ignore[arg-type]
        c = self.config.channels
        depth = len(c) - 1
        rate = [self.config.dropout * i / depth for i in range(len(c))]  # layer-wise: deeper, more
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32).view(1, 3, 1, 1))
        #: input sides must be multiples of this (the deepest stride; ×2 for MobileViT's 2×2 patches)
        self.input_multiple = 32
        if encoder is None:
            self.down = nn.ModuleList([ConvBlock(3, c[0], dropout=rate[0])])
            for i in range(1, len(c)):
                self.down.append(ConvBlock(c[i - 1], c[i], dropout=rate[i]))
            self.up = nn.ModuleList(
                [ConvBlock(c[i + 1] + c[i], c[i], dropout=rate[i]) for i in reversed(range(depth))]
            )
            arch = "unet-" + "-".join(str(v) for v in c)
        else:
            self.backbone = _timm_features(encoder)
            fch = list(self.backbone.feature_info.channels())
            if list(self.backbone.feature_info.reduction()) != [2, 4, 8, 16, 32]:
                raise ConfigError(f"student encoder {encoder!r} must give features at strides 2, 4, 8, 16, 32")
            if _patch_mobilevit_blocks(self.backbone):
                self.input_multiple = 64
            # decoder: stride 32 → 16 → 8 → 4 → 2 (joining encoder features) → 1 (joining the stem)
            d16, d8, d4, d2, d1 = c
            self.dec = nn.ModuleList([
                ConvBlock(fch[4] + fch[3], d16, dropout=rate[4]),
                ConvBlock(d16 + fch[2], d8, dropout=rate[3]),
                ConvBlock(d8 + fch[1], d4, dropout=rate[2]),
                ConvBlock(d4 + fch[0], d2, dropout=rate[1]),
                ConvBlock(d2 + d1, d1, dropout=rate[0]),
            ])
            self.stem = ConvBlock(3, d1)
            arch = f"{encoder}-unet-" + "-".join(str(v) for v in c)
        self.heads = HoVerHeads(c[0] if encoder is None else c[4], n_types)
        self.meta = model_meta(
            kind="student",
            architecture=f"cellcurate-student/{arch}" + ("+flow" if head == "flow" else ""),
            mpp=data_mpp,
            input_size=tile_size,
            mean=self.config.mean,
            std=self.config.std,
            taxonomy=taxonomy,
        )
        self.meta["input_multiple"] = self.input_multiple
        self.meta["head"] = head
        if head == "flow":
            self.meta["outputs"] = {
                "np": "logits (B,2,H,W)",
                "hv": "(B,2,H,W) Cellpose flow field, x then y, unit length inside nuclei",
                "tp": "logits (B,K,H,W)",
            }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        m = self.input_multiple
        if h % m or w % m:
            raise ConfigError(f"student input must be a multiple of {m} pixels, got {h}×{w}")
        y = (x - self.mean) / self.std
        if self.config.encoder is not None:
            return self._forward_timm(y)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            y = block(y if i == 0 else F.max_pool2d(y, 2))
            skips.append(y)
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.heads(y)

    def _forward_timm(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(y)  # strides 2, 4, 8, 16, 32
        z = feats[4]
        for block, skip in zip(self.dec[:4], reversed(feats[:4])):
            z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            z = block(torch.cat([z, skip], dim=1))
        full = self.stem(y)
        z = F.interpolate(z, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.heads(self.dec[4](torch.cat([z, full], dim=1)))

    def forward_tuple(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.forward(x)
        return out["np"], out["hv"], out["tp"]


def student_preset(name: str) -> tuple[int, int, int, int, int]:
    """U-Net widths of a preset (``tiny``, ``default``, ``paper``)."""
    try:
        return STUDENT_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown student preset {name!r}; expected one of {', '.join(STUDENT_PRESETS)}") from None


def _timm_features(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, features_only=True)


def _mobilevit_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``MobileVitBlock.forward`` for inputs whose sides are whole patches, written with
    integer shape arithmetic only, so that tracing (TorchScript, ONNX) keeps batch, height and
    width dynamic (timm's version goes through ``math.ceil`` and freezes them)."""
    shortcut = x
    x = self.conv_kxk(x)
    x = self.conv_1x1(x)
    ph, pw = self.patch_size
    b, c, h, w = x.shape
    nh, nw = h // ph, w // pw
    n = nh * nw
    x = x.reshape(b * c * nh, ph, nw, pw).transpose(1, 2)
    x = x.reshape(b, c, n, self.patch_area).transpose(1, 3).reshape(b * self.patch_area, n, -1)
    x = self.norm(self.transformer(x))
    x = x.contiguous().view(b, self.patch_area, n, -1)
    x = x.transpose(1, 3).reshape(b * c * nh, nw, ph, pw)
    x = x.transpose(1, 2).reshape(b, c, nh * ph, nw * pw)
    x = self.conv_proj(x)
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


def _patch_mobilevit_blocks(backbone: nn.Module) -> bool:
    """Give every MobileViT (v1) block of ``backbone`` the traceable forward; True if any."""
    import types

    from timm.models.mobilevit import MobileVitBlock

    found = False
    for m in backbone.modules():
        if isinstance(m, MobileVitBlock):
            m.forward = types.MethodType(_mobilevit_block_forward, m)  # type: ignore[method-assign]
            found = True
    return found
