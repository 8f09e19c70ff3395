"""The teacher: a frozen foundation encoder + a trainable UNETR/CellViT-style decoder with
HoVer-Net heads.

Dimensions: B tiles, H×W pixels at the dataset's pixel size (~0.25 µm/px, H and W multiples of
32), K = 8 type channels, 4 encoder feature levels of (C_l, g_h, g_w).

``forward(x)``: x (B, 3, H, W) float32 RGB in [0, 1] → ``{"np": (B, 2, H, W) logits,
"hv": (B, 2, H, W) in [-1, 1], "tp": (B, K, H, W) logits}``. Inside, the tile is normalised
(mean/std are buffers), resampled to the encoder's pixel size (rounded to whole patches), encoded
into 4 feature maps, and decoded back to H×W: the deepest features start at H/16, the shallower
ones join at H/8, H/4, H/2 (each projected, resized and refined), and a small convolutional stem on
the full-resolution tile joins at H. With ``image_pyramid`` (:attr:`TeacherConfig.image_pyramid`)
the stem's features are also pooled and refined to H/2 and H/4 and join the decoder there, beside
the encoder's: a frozen ViT with 16-px patches (32 data px in the demo, whose encoder runs at
0.5 µm/px) cannot resolve chromatin texture or a nucleus's size, and two full-resolution convolutions
alone see only ~11 px (issue 9: on the demo release it lifts the teacher's class F1 and count R²). ``encode``/``decode`` split the two halves so that training
computes the frozen encoder's features once per tile and caches them.

Encoder input (:attr:`TeacherConfig.encoder_input`):

- ``"native"`` (default): a ViT sees only windows of its native size S (224 px for H-Optimus-0,
  a 16×16 token grid), so its position embeddings are used as trained, never interpolated. The
  resampled tile (h'×w', whole patches) is placed on a canvas of at least S×S (padded with the
  normalised mean colour, i.e. zeros), covered by S×S windows whose starts are multiples of the
  patch size (overlapping evenly), every window is encoded, the token grids are stitched back
  (overlaps averaged) and cropped to the h'/p × w'/p tokens of the tile. A 448-px tile at
  0.25 µm/px is exactly one 224-px window. Encoders without position embeddings (CNNs) take the
  resampled tile whole.
- ``"resize"``: the whole resampled tile goes through the encoder at once (a 256-px tile at
  0.25 µm/px: 126 px, 9×9 tokens, position embeddings interpolated). Checkpoints written before
  this option existed load with ``"resize"``, the behaviour they were trained with.

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
    "ENCODER_INPUTS",
    "ConvBlock",
    "HoVerHeads",
    "Teacher",
    "TeacherConfig",
    "build_teacher",
    "count_parameters",
    "model_meta",
]

DATA_MPP = 0.25

#: How the teacher feeds its encoder (see the module docstring).
ENCODER_INPUTS: tuple[str, ...] = ("native", "resize")


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


def window_starts(length: int, window: int, patch: int) -> list[int]:
    """Starts of ``window``-px windows covering ``length`` px (``length >= window``, both whole
    patches): evenly spread, the last flush with the end, every start a multiple of ``patch``."""
    if length <= window:
        return [0]
    n = -(-length // window)
    span = (length - window) // patch
    return [round(span * i / (n - 1)) * patch for i in range(n)]


def encode_windows(encoder: nn.Module, z: torch.Tensor, *, window: int, patch: int) -> list[torch.Tensor]:
    """Encode a normalised (B, 3, h, w) image (h, w whole patches) in ``window``×``window`` tiles.

    The image is padded with zeros (the normalised mean colour) to at least ``window`` on each side,
    every window goes through ``encoder`` at its native size (one batch of B × windows), and each
    of the 4 feature levels is stitched back on the (h'/p, w'/p) token canvas (overlaps averaged)
    and cropped to the h/p × w/p tokens of the image.

    Returns 4 tensors (B, C_l, h/p, w/p).
    """
    b, _, h, w = z.shape
    if h % patch or w % patch or window % patch:
        raise ConfigError(f"native-window encoding needs whole patches of {patch} px, got {h}×{w} (window {window})")
    ch, cw = max(h, window), max(w, window)
    if (ch, cw) != (h, w):
        z = F.pad(z, (0, cw - w, 0, ch - h))
    ys, xs = window_starts(ch, window, patch), window_starts(cw, window, patch)
    crops = torch.cat([z[:, :, y : y + window, x : x + window] for y in ys for x in xs], dim=0)
    feats = encoder(crops)  # 4 × (n_windows·B, C, window/p, window/p)
    g = window // patch
    out: list[torch.Tensor] = []
    for f in feats:
        if f.shape[-1] != g or f.shape[-2] != g:
            raise ConfigError(f"encoder returned a {tuple(f.shape[-2:])} token grid for a {window}-px window; expected {g}×{g}")
        acc = f.new_zeros(b, f.shape[1], ch // patch, cw // patch)
        count = f.new_zeros(1, 1, ch // patch, cw // patch)
        for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
            ty, tx = y // patch, x // patch
            acc[:, :, ty : ty + g, tx : tx + g] += f[i * b : (i + 1) * b]
            count[:, :, ty : ty + g, tx : tx + g] += 1
        out.append((acc / count)[:, :, : h // patch, : w // patch])
    return out


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
    #: ``"native"`` (windows of the encoder's own input size) or ``"resize"`` (the whole tile)
    encoder_input: str = "native"
    #: a small CNN on the tile also feeds the decoder at H/2 and H/4 (not only at H), so it sees
    #: image detail finer than the encoder's patches at every level (see the module docstring)
    image_pyramid: bool = False

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)  # type: ignore[assignment]
        if self.encoder_input not in ENCODER_INPUTS:
            raise ConfigError(f"encoder_input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}")
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
        encoder_input: str = "native",
        image_pyramid: bool = False,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        super().__init__()
        self.config = TeacherConfig(tuple(decoder_channels), n_types, data_mpp, tile_size,  # type: ignore[arg-type]
                                    encoder_input, bool(image_pyramid))
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
        pyr = self.config.image_pyramid
        self.up4 = ConvBlock(c8 + c4 + (c4 if pyr else 0), c4)
        self.up2 = ConvBlock(c4 + c2 + (c2 if pyr else 0), c2)
        self.stem = ConvBlock(3, c1)
        if pyr:  # the tile's own features at H/2 and H/4 (a 3-level CNN beside the encoder)
            self.img2 = ConvBlock(c1, c2)
            self.img4 = ConvBlock(c2, c4)
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
        self.meta["encoder_input"] = self.config.encoder_input
        if self.native_window is not None:  # the window layout depends on the tile size
            self.meta["input_fixed"] = True

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

    @property
    def native_window(self) -> int | None:
        """Side of the encoder's native input (pixels) used by ``encoder_input="native"``; None
        when the encoder has no position embeddings to protect (CNNs) or in ``"resize"`` mode."""
        if self.config.encoder_input != "native":
            return None
        return self.encoder.native_size

    @property
    def feature_id(self) -> str:
        """Identifies the features :meth:`encode` computes (encoder + input mode), for caches."""
        return f"{self.encoder.encoder_id}-{self.config.encoder_input}"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 3, H, W) in [0, 1] → 4 feature maps of the frozen encoder (no gradient)."""
        size = self.encoder_size(int(x.shape[-2]), int(x.shape[-1]))
        z = self.normalise(x)
        if self.scale < 0.75:  # fixed [1, 2, 1]/4 low-pass before downsampling (exportable antialias)
            z = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), self.blur, groups=3)
        z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
        window = self.native_window
        with torch.no_grad():
            if window is None:
                return [f.detach() for f in self.encoder(z)]
            return [f.detach() for f in encode_windows(self.encoder, z, window=window, patch=self.patch)]

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

        full = self.stem(self.normalise(x))
        y = self.bottom(level(3, 16))
        y = self.up8(torch.cat([up(y), level(2, 8)], dim=1))
        if self.config.image_pyramid:
            half = self.img2(F.max_pool2d(full, 2))
            quarter = self.img4(F.max_pool2d(half, 2))
            y = self.up4(torch.cat([up(y), level(1, 4), quarter], dim=1))
            y = self.up2(torch.cat([up(y), level(0, 2), half], dim=1))
        else:
            y = self.up4(torch.cat([up(y), level(1, 4)], dim=1))
            y = self.up2(torch.cat([up(y), level(0, 2)], dim=1))
        y = self.up1(torch.cat([up(y), full], dim=1))
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
        encoder_input=cfg.encoder_input,
        image_pyramid=cfg.image_pyramid,
        taxonomy=taxonomy,
    )
    if meta:
        with torch.device("meta"):
            return Teacher(enc, **kwargs)  # type: ignore[arg-type]
    return Teacher(enc, **kwargs)  # type: ignore[arg-type]

