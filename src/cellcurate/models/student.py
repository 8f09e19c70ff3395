"""The student: a lightweight U-Net encoder-decoder with the teacher's HoVer-Net heads.

Dimensions: B tiles, H×W pixels at the dataset's pixel size (H, W multiples of 32), K = 8 type
channels, L = 5 levels of widths ``channels`` at strides 1, 2, 4, 8, 16.

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

__all__ = ["Student", "StudentConfig", "TINY_STUDENT_CHANNELS"]

TINY_STUDENT_CHANNELS = (8, 16, 32, 64, 64)
_H_OPTIMUS = ENCODERS["h-optimus-0"]


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
        taxonomy: Taxonomy | None = None,
    ) -> None:
        super().__init__()
        self.config = StudentConfig(
            tuple(channels), n_types, dropout, data_mpp, tile_size,
            tuple(_H_OPTIMUS.mean if mean is None else mean), tuple(_H_OPTIMUS.std if std is None else std),
        )  # type: ignore[arg-type]
        c = self.config.channels
        depth = len(c) - 1
        rate = [self.config.dropout * i / depth for i in range(len(c))]  # layer-wise: deeper, more
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.down = nn.ModuleList([ConvBlock(3, c[0], dropout=rate[0])])
        for i in range(1, len(c)):
            self.down.append(ConvBlock(c[i - 1], c[i], dropout=rate[i]))
        self.up = nn.ModuleList(
            [ConvBlock(c[i + 1] + c[i], c[i], dropout=rate[i]) for i in reversed(range(depth))]
        )
        self.heads = HoVerHeads(c[0], n_types)
        self.meta = model_meta(
            kind="student",
            architecture="cellcurate-student/unet-" + "-".join(str(v) for v in c),
            mpp=data_mpp,
            input_size=tile_size,
            mean=self.config.mean,
            std=self.config.std,
            taxonomy=taxonomy,
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % 32 or w % 32:
            raise ConfigError(f"student input must be a multiple of 32 pixels, got {h}×{w}")
        y = (x - self.mean) / self.std
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

    def forward_tuple(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.forward(x)
        return out["np"], out["hv"], out["tp"]
