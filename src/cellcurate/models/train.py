"""Training the teacher and distilling the student.

Dimensions: N tiles of T×T pixels, B tiles per batch, K = 8 type channels.

:func:`train_teacher` trains the decoder of a :class:`~cellcurate.models.teacher.Teacher` on the
grid tiles of a base dataset. The frozen encoder runs **once per tile**: its 4 feature maps are
computed before the first epoch (or found in the cache) and every epoch decodes cached features.
Because the features belong to fixed tiles, the teacher is trained without spatial augmentation.

:func:`distill` trains a :class:`~cellcurate.models.student.Student` from a teacher checkpoint:
the teacher's predictions are computed once per tile and cached (for a student with the Cellpose
flow head, :mod:`~cellcurate.models.flows`, the ``hv`` target and the HoVer teacher's ``hv`` map are
replaced by flows: of the ground-truth nuclei and of the teacher's nuclei), then each batch gets a random
flip/90° rotation per tile (applied to the image, the ground truth and the teacher's maps, with the
distance-map components fixed) and a stain jitter. The loss is ground truth (BCE + Tversky + Dice,
CE + Dice, MSE + gradient MSE) + distillation (T²·KL on types, MSE on the teacher's distance maps and
soft nuclear map, BCE + Tversky on the soft nuclear map) + consistency (a second view under another
flip/rotation and stain jitter must agree).

Validation (issue 9): given a ``val`` dataset (the release's ``val`` split), every epoch ends
with an evaluation on it (:func:`~cellcurate.models.evaluate.evaluate_models`, the same path as
``curate evaluate``); the epoch with the best ``TrainConfig.val_metric`` is copied to
``out_dir/best/`` (a checkpoint folder), training stops after ``patience`` epochs without a new
best (0 = never), and ``out_dir/curves.png`` plots the training losses and validation metrics.
The returned model is then the best one.

Unlabelled data (issue 19, the CellGenNet setting): :func:`distill` also takes ``unlabelled``
images (e.g. :class:`~cellcurate.models.data.UnlabelledImages`). On their tiles no ground-truth
term applies; the teacher's soft targets are the only supervision, each pixel weighted by the
teacher's confidence (:func:`~cellcurate.models.losses.teacher_confidence`), plus a
class-balanced foreground type loss on its confident pseudo-labels. With ``teacher_on_ignore``
the ignore regions of labelled tiles are treated the same way. ``teacher=None`` trains a student
from the ground truth alone (the baseline distillation is compared against).

Both write a checkpoint folder (``model.pt``, ``config.json``, ``optimizer.pt``) after every
epoch; ``resume=True`` continues from the last completed epoch. Every epoch re-seeds its shuffling,
augmentation and dropout from ``(seed, epoch)``, so a resumed run is the run that was not stopped.
Mixed precision (bf16 where supported, else fp16 with gradient scaling) is used on CUDA when
``amp`` is true; on CPU training runs in float32.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelError, StateError
from .checkpoint import CONFIG_NAME, MODEL_NAME, load_model, load_optimizer_state, read_config, save_checkpoint
from .data import TileCache, TileDataset, augment_batch, collate_tiles, stain_jitter
from .encoders import EncoderSpec
from .losses import LossConfig, consistency_loss, distillation_loss, supervised_loss, teacher_confidence
from .student import Student, StudentConfig
from .teacher import Teacher, TeacherConfig, build_teacher, count_parameters

__all__ = ["DEVICES", "TrainConfig", "TrainResult", "distill", "plot_curves", "resolve_device", "train_teacher"]

#: Sub-folder of a checkpoint folder holding the best epoch on the validation split.
BEST_DIR = "best"
#: Training curves written beside the checkpoint.
CURVES_NAME = "curves.png"

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Options shared by :func:`train_teacher` and :func:`distill` (saved in config.json)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: Device = "auto"
    amp: bool = True
    tile_size: int = 256
    augment: bool = True  # student only: flips/rotations + stain jitter
    stain_sigma: float = 0.05
    cache_dir: str | None = None  # None: in-memory caches
    progress: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    val_metric: str = "mPQ"  # a summary metric of cellcurate.models.metrics (higher is better)
    patience: int = 0  # epochs without a new best before stopping; 0 = never stop early
    teacher_on_ignore: bool = False  # distill: the teacher's soft targets also cover ignore regions

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig.from_dict(self.loss)
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        from .metrics import SUMMARY_METRICS

        if self.val_metric not in SUMMARY_METRICS:
            raise ConfigError(f"val_metric must be one of {sorted(SUMMARY_METRICS)}, got {self.val_metric!r}")
        if int(self.patience) < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = self.loss.to_dict()
        return d


@dataclass
class TrainResult:
    """What a training run returns: the model (eval mode), its folder and per-epoch history."""

    model: nn.Module
    out_dir: Path
    history: list[dict[str, float]]
    parameters: int
    best: dict[str, Any] | None = None  # {"epoch", "metric", "value", "path"} with validation


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when present, else CPU; ``"cuda"`` without a GPU is a ConfigError."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % (2**63 - 1)


def _autocast(device: torch.device, amp: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    if not (amp and device.type == "cuda"):
        return (lambda: torch.autocast(device.type, enabled=False)), None
    bf16 = torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = None if bf16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _check_out_dir(out_dir: Path, resume: bool) -> int:
    """Completed epochs to resume from (0 for a fresh run)."""
    has = (out_dir / CONFIG_NAME).is_file() or (out_dir / MODEL_NAME).is_file()
    if resume:
        if not has:
            raise StateError(f"nothing to resume: no checkpoint in {out_dir}")
        return int(read_config(out_dir).get("epoch", 0))
    if has:
        raise StateError(f"{out_dir} already holds a checkpoint; pass --resume or choose another --out")
    return 0


def _bar(iterable: Any, *, enabled: bool, **kw: Any) -> Any:
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True, **kw)


def _fill_cache(
    cache: TileCache,
    tiles: TileDataset,
    compute: Callable[[torch.Tensor], list[torch.Tensor]],
    *,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    progress: bool,
    desc: str,
) -> int:
    """Run ``compute`` on every tile missing from ``cache``; returns how many were computed."""
    todo = [i for i in range(len(tiles)) if tiles[i]["key"] not in cache]
    if not todo:
        return 0
    loader = DataLoader(torch.utils.data.Subset(tiles, todo), batch_size=batch_size, collate_fn=collate_tiles)
    with torch.no_grad():
        for batch in _bar(loader, enabled=progress, desc=desc, unit="batch"):
            x = batch["image"].to(device).float() / 255.0
            with autocast():
                outs = compute(x)
            for j, key in enumerate(batch["key"]):
                cache.put(key, [o[j].float() for o in outs])
    return len(todo)


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Cosine decay over the planned epochs, a pure function of the epoch (resume-safe)."""
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))


def _fit(
    model: nn.Module,
    params: list[nn.Parameter],
    tiles: TileDataset,
    step: Callable[[dict[str, Any], torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    *,
    cfg: TrainConfig,
    out_dir: Path,
    start_epoch: int,
    ckpt_config: dict[str, Any],
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    history: list[dict[str, float]],
    desc: str,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any] | None:
    """Train epochs ``start_epoch..cfg.epochs`` (see the module docstring); returns the best epoch
    on the validation data ({"epoch", "metric", "value", "path"}) when ``validate`` is given."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = _best_so_far(history, cfg.val_metric) if validate is not None else None
    if best is not None:
        best["path"] = str(out_dir / BEST_DIR)
    if validate is not None and _stopped(history, best, cfg):
        return best
    if start_epoch > 0:
        state = load_optimizer_state(out_dir)
        if state is not None:
            try:
                opt.load_state_dict(state)
            except (ValueError, KeyError) as exc:
                raise ModelError(f"optimizer state does not fit the model ({exc})", path=out_dir / "optimizer.pt") from None
    for epoch in range(start_epoch, cfg.epochs):
        seed = _epoch_seed(cfg.seed, epoch)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)  # shuffling and augmentation
        tiles.set_epoch(epoch)
        loader = DataLoader(tiles, batch_size=cfg.batch_size, shuffle=True, generator=gen, collate_fn=collate_tiles)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, epoch)
        model.train()
        t0 = time.perf_counter()
        totals: dict[str, float] = {}
        n = 0
        bar = _bar(loader, enabled=cfg.progress, desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="batch")
        for batch in bar:
            opt.zero_grad(set_to_none=True)
            loss, parts = step(batch, gen)
            if not torch.isfinite(loss):
                raise ModelError(f"loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            b = len(batch["key"])
            n += b
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v * b
            bar.set_postfix(loss=f"{totals['loss'] / n:.4f}")
        record = {k: v / max(n, 1) for k, v in totals.items()}
        record.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, lr=_lr_at(cfg, epoch))
        model.eval()
        improved = False
        if validate is not None:
            scores = validate(model)
            record.update({f"val_{k}": v for k, v in scores.items()})
            value = _score(record, cfg.val_metric)
            improved = best is None or value > best["value"]
            if improved:
                best = {"epoch": epoch + 1, "metric": cfg.val_metric, "value": value, "path": str(out_dir / BEST_DIR)}
        history.append(record)
        metrics: dict[str, Any] = {"history": history}
        if best is not None:
            metrics["best"] = best
        if improved:
            save_checkpoint(out_dir / BEST_DIR, model, config=ckpt_config, epoch=epoch + 1, metrics=metrics)
        save_checkpoint(out_dir, model, config=ckpt_config, optimizer=opt, epoch=epoch + 1, metrics=metrics)
        plot_curves(history, out_dir / CURVES_NAME, val_metric=cfg.val_metric if validate is not None else None)
        if validate is not None and _stopped(history, best, cfg):
            break
    return best


def _score(record: dict[str, Any], metric: str) -> float:
    v = record.get(f"val_{metric}")
    return -math.inf if v is None or not math.isfinite(float(v)) else float(v)


def _best_so_far(history: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    best = None
    for r in history:
        if f"val_{metric}" in r and (best is None or _score(r, metric) > best["value"]):
            best = {"epoch": int(r["epoch"]), "metric": metric, "value": _score(r, metric)}
    return best


def _stopped(history: list[dict[str, Any]], best: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best one."""
    if cfg.patience <= 0 or best is None or not history:
        return False
    return int(history[-1]["epoch"]) - int(best["epoch"]) >= cfg.patience


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike[str], *, val_metric: str | None = None) -> Path:
    """Training loss terms (left) and validation metrics (right) per epoch as a PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .predict import atomic_path

    epochs = [int(r["epoch"]) for r in history]
    skip = {"epoch", "seconds", "lr"}
    loss_keys = [k for k in history[0] if k not in skip and not k.startswith("val_")] if history else []
    val_keys = [k for k in ("val_PQ", "val_mPQ", "val_F1_classification", "val_R2_counts") if history and k in history[0]]
    if val_metric and f"val_{val_metric}" not in val_keys and history and f"val_{val_metric}" in history[0]:
        val_keys.append(f"val_{val_metric}")
    fig, axes = plt.subplots(1, 2 if val_keys else 1, figsize=(11 if val_keys else 6, 4), squeeze=False)
    ax = axes[0][0]
    for k in loss_keys:
        ax.plot(epochs, [r.get(k, math.nan) for r in history], marker="o", ms=3, lw=2.0 if k == "loss" else 1.0, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over tiles)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    if val_keys:
        ax = axes[0][1]
        for k in val_keys:
            vals = [r.get(k) for r in history]
            ax.plot(epochs, [math.nan if v is None else v for v in vals], marker="o", ms=3, label=k[4:])
        if val_metric:
            b = _best_so_far(history, val_metric)
            if b is not None:
                ax.axvline(b["epoch"], color="grey", ls="--", lw=0.8, label=f"best {val_metric} (epoch {b['epoch']})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _validator(val: Dataset | None, cfg: TrainConfig, device: torch.device) -> Callable[[nn.Module], dict[str, float]] | None:
    """Summary metrics of a model on ``val`` through the evaluation path (``curate evaluate``)."""
    if val is None:
        return None
    if len(val) == 0:  # type: ignore[arg-type]
        raise ConfigError("the validation dataset holds no images")
    from .evaluate import evaluate_models
    from .metrics import SUMMARY_METRICS

    def validate(model: nn.Module) -> dict[str, float]:
        res = evaluate_models({"model": model}, val, tile=cfg.tile_size, overlap=cfg.tile_size // 4,
                              batch_size=cfg.batch_size, device=str(device), progress=False)["models"]["model"]
        return {k: float(res[k]) for k in SUMMARY_METRICS}

    return validate


def _finish(result_model: nn.Module, out: Path, best: dict[str, Any] | None,
            encoder_weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """The best checkpoint's model when there was validation, else the last one."""
    if best is None or not (out / BEST_DIR / MODEL_NAME).is_file():
        return result_model.eval()
    return load_model(out / BEST_DIR, encoder_weights=encoder_weights).eval()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_teacher(
    base: Dataset,
    *,
    out_dir: str | os.PathLike[str],
    encoder: str | EncoderSpec = "h-optimus-0",
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    teacher_config: TeacherConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    model: Teacher | None = None,
    val: Dataset | None = None,
) -> TrainResult:
    """Train a teacher's decoder on the grid tiles of ``base`` and checkpoint it in ``out_dir``.

    Parameters
    ----------
    base
        Base dataset (see :mod:`cellcurate.models.data`).
    out_dir
        Checkpoint folder; must not hold a checkpoint unless ``resume``.
    encoder, weights, random_init
        See :func:`~cellcurate.models.encoders.build_encoder`.
    teacher_config
        Decoder widths, number of types, pixel size.
    config
        Training options.
    resume
        Continue from the checkpoint in ``out_dir`` (same encoder weights).
    model
        A ready teacher to train instead of building one from ``encoder``/``weights``.
    val
        Validation dataset (e.g. the release's ``val`` split): best-epoch selection on
        ``config.val_metric``, early stopping after ``config.patience`` epochs.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    start = _check_out_dir(out, resume)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    if start > 0:
        model = load_model(out, encoder_weights=weights)  # type: ignore[assignment]
        history = list(read_config(out).get("metrics", {}).get("history", []))
        if not isinstance(model, Teacher):
            raise StateError(f"{out} holds a {type(model).__name__}, not a teacher")
    elif model is None:
        model = build_teacher(encoder, weights=None if weights is None else str(weights),
                              random_init=random_init, config=teacher_config)
    assert model is not None
    model.to(device)
    tiles = TileDataset(base, tile_size=cfg.tile_size, mode="grid", mpp=model.config.data_mpp, seed=cfg.seed)
    autocast, scaler = _autocast(device, cfg.amp)
    cache = TileCache("enc-" + model.feature_id, directory=cfg.cache_dir)
    _fill_cache(cache, tiles, model.encode, batch_size=cfg.batch_size, device=device, autocast=autocast,
                progress=cfg.progress, desc="encoder features")

    def step(batch: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batch = _to_device(batch, device)
        feats = cache.get_batch(batch["key"], device=device)
        x = batch["image"].float() / 255.0
        with autocast():
            out_ = model.decode(feats, x)  # type: ignore[union-attr]
        return supervised_loss(out_, batch, cfg.loss)

    ckpt_config = {**cfg.to_dict(), "tiles": len(tiles), "stage": "teacher"}
    best = _fit(model, model.decoder_parameters(), tiles, step, cfg=cfg, out_dir=out, start_epoch=start,
                ckpt_config=ckpt_config, device=device, scaler=scaler, history=history, desc="teacher epoch",
                validate=_validator(val, cfg, device))
    final = _finish(model, out, best, weights)
    return TrainResult(final, out, history, count_parameters(final), best)


def _teacher_id(teacher: nn.Module, source: str | None) -> str:
    if source is not None:
        folder = Path(source)
        folder = folder.parent if folder.suffix in {".pt", ".json"} else folder
        h = hashlib.sha256()
        for name in (MODEL_NAME, CONFIG_NAME):
            with open(folder / name, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        return h.hexdigest()[:24]
    h = hashlib.sha256()
    for name, t in teacher.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _student_tiles(base: Dataset, student: Student, cfg: TrainConfig) -> TileDataset:
    """Grid tiles for ``student``: HoVer targets, or Cellpose flows in ``hv`` for a flow head."""
    kind: type[TileDataset] = TileDataset
    if student.config.head == "flow":
        from .flows import FlowTileDataset

        kind = FlowTileDataset
    return kind(base, tile_size=cfg.tile_size, mode="grid", mpp=student.config.data_mpp, seed=cfg.seed)


def _needs_teacher_flows(teacher: nn.Module, student: Student) -> bool:
    """A flow student taught by a HoVer teacher learns the flows of the teacher's nuclei."""
    head = str(getattr(teacher, "meta", {}).get("head", "hover"))
    return student.config.head == "flow" and head != "flow"


def distill(
    teacher_ckpt: str | os.PathLike[str] | nn.Module | None,
    base: Dataset,
    *,
    out_dir: str | os.PathLike[str],
    student_config: StudentConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    encoder_weights: str | os.PathLike[str] | None = None,
    val: Dataset | None = None,
    unlabelled: Dataset | None = None,
) -> TrainResult:
    """Distil a student from a teacher checkpoint (or a teacher module) on the tiles of ``base``.

    Parameters
    ----------
    teacher_ckpt
        Teacher checkpoint folder (or ``model.pt``), or a ready model with the model contract;
        None trains the student from the ground truth alone (no distillation term).
    base
        Base dataset (labelled).
    out_dir
        Student checkpoint folder; must not hold a checkpoint unless ``resume``.
    student_config
        Student widths and layer-wise dropout; mean/std default to the teacher's.
    config
        Training options (``config.loss`` holds the distillation weights and temperature).
    encoder_weights
        Override the teacher's recorded encoder weights path.
    val
        Validation dataset (see :func:`train_teacher`).
    unlabelled
        Images without annotation (items with ``labelled`` False, e.g.
        :class:`~cellcurate.models.data.UnlabelledImages`): the teacher's confidence-weighted soft
        targets are their only supervision. Needs a teacher.
    """
    cfg = config or TrainConfig()
    if teacher_ckpt is None and (unlabelled is not None or cfg.teacher_on_ignore):
        raise ConfigError("unlabelled images and teacher_on_ignore need a teacher to supervise them")
    out = Path(out_dir)
    start = _check_out_dir(out, resume)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    teacher: nn.Module | None
    if teacher_ckpt is None:
        teacher, source = None, None
    elif isinstance(teacher_ckpt, nn.Module):
        teacher, source = teacher_ckpt, None
    else:
        teacher = load_model(teacher_ckpt, encoder_weights=encoder_weights)
        source = str(teacher_ckpt)
    if teacher is not None:
        teacher.to(device).eval()
    tmeta = getattr(teacher, "meta", {}) if teacher is not None else {}
    history: list[dict[str, float]] = []
    if start > 0:
        student = load_model(out)
        history = list(read_config(out).get("metrics", {}).get("history", []))
        if not isinstance(student, Student):
            raise StateError(f"{out} holds a {type(student).__name__}, not a student")
    else:
        scfg = student_config or StudentConfig()
        if scfg.mean is None and "mean" in tmeta:
            scfg = replace(scfg, mean=tuple(tmeta["mean"]))
        if scfg.std is None and "std" in tmeta:
            scfg = replace(scfg, std=tuple(tmeta["std"]))
        torch.manual_seed(cfg.seed)
        student = Student(**scfg.to_dict())
        student.meta["classes"] = tmeta.get("classes", student.meta["classes"])
        student.meta["colors"] = tmeta.get("colors", student.meta["colors"])
    student.to(device)
    tiles: Dataset = _student_tiles(base, student, cfg)
    n_labelled = len(tiles)  # type: ignore[arg-type]
    if unlabelled is not None:
        extra = _student_tiles(unlabelled, student, cfg)
        tiles = _ConcatTiles([tiles, extra])  # type: ignore[list-item]
    autocast, scaler = _autocast(device, cfg.amp)
    cache = None
    if teacher is not None:
        to_flows = _needs_teacher_flows(teacher, student)
        cache = TileCache("teacher-" + _teacher_id(teacher, source) + ("-flows" if to_flows else ""),
                          directory=cfg.cache_dir)

        def predict(x: torch.Tensor) -> list[torch.Tensor]:
            o = teacher(x)  # type: ignore[misc]
            if to_flows:
                from .flows import teacher_flows

                return [o["np"], teacher_flows(o["np"], o["hv"]), o["tp"]]
            return [o["np"], o["hv"], o["tp"]]

        _fill_cache(cache, tiles, predict, batch_size=cfg.batch_size, device=device, autocast=autocast,  # type: ignore[arg-type]
                    progress=cfg.progress, desc="teacher predictions")
    lc = cfg.loss

    def step(batch: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        t_out = cache.get_batch(batch["key"]) if cache is not None else None
        if cfg.augment:
            batch, t_out = augment_batch(batch, generator=gen, teacher=t_out, stain=True, stain_sigma=cfg.stain_sigma)
        else:
            batch = {**batch, "image": batch["image"].float() / 255.0}
        batch = _to_device(batch, device)
        x, valid = batch["image"], batch["valid"]
        with autocast():
            s_out = student(x)
        sup, parts = supervised_loss(s_out, batch, lc)
        total = sup
        if t_out is not None:
            t_dict = {k: v.to(device) for k, v in zip(("np", "hv", "tp"), t_out)}  # type: ignore[arg-type]
            kd_mask, weight, pseudo = _teacher_mask(batch, t_dict, teacher_on_ignore=cfg.teacher_on_ignore)
            kd, kd_parts = distillation_loss(s_out, t_dict, kd_mask, lc, weight=weight, pseudo=pseudo)
            total = total + kd
            parts = {**parts, **kd_parts}
        else:
            kd_mask = valid
        if lc.consistency > 0:
            k = int(torch.randint(1, 8, (1,), generator=gen))  # a non-identity element of the group
            jitter_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            jgen = torch.Generator().manual_seed(jitter_seed)

            def perturb(z: torch.Tensor) -> torch.Tensor:
                return stain_jitter(z, generator=jgen, sigma=cfg.stain_sigma, bias=cfg.stain_sigma * 0.4)

            with autocast():
                cons = consistency_loss(student, x, kd_mask, k=k % 4, flip=k >= 4, reference=s_out,
                                        perturb=perturb if cfg.augment else None)
            total = total + lc.consistency * cons
            parts["consistency"] = float(cons.detach())
        return total, parts

    ckpt_config = {
        **cfg.to_dict(),
        "tiles": len(tiles),  # type: ignore[arg-type]
        "labelled_tiles": n_labelled,
        "unlabelled_tiles": len(tiles) - n_labelled,  # type: ignore[arg-type]
        "stage": "distill" if teacher is not None else "student",
        "teacher": source,
        "teacher_parameters": count_parameters(teacher) if teacher is not None else None,
        "teacher_architecture": tmeta.get("architecture"),
    }
    best = _fit(student, list(student.parameters()), tiles, step, cfg=cfg, out_dir=out, start_epoch=start,  # type: ignore[arg-type]
                ckpt_config=ckpt_config, device=device, scaler=scaler, history=history, desc="student epoch",
                validate=_validator(val, cfg, device))
    final = _finish(student, out, best)
    return TrainResult(final, out, history, count_parameters(final), best)


class _ConcatTiles(torch.utils.data.ConcatDataset):
    """Labelled and unlabelled tiles as one dataset (``set_epoch`` reaches both)."""

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)  # type: ignore[attr-defined]


def _teacher_mask(
    batch: dict[str, Any], teacher: dict[str, torch.Tensor], *, teacher_on_ignore: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the teacher's soft targets count, with which weight, and where its pseudo-labels train types.

    Labelled pixels (``valid``): weight 1 (the teacher refines the ground truth). Pixels without
    ground truth inside the image — every pixel of an unlabelled tile, and with
    ``teacher_on_ignore`` the ignore regions of labelled tiles — carry the teacher's confidence as
    weight and its hard types as foreground pseudo-labels. Padding never counts.
    """
    valid = batch["valid"]
    inside = batch.get("inside", torch.ones_like(valid))
    labelled = batch.get("labelled", torch.ones(valid.shape[0], dtype=torch.bool, device=valid.device))
    unl = (~labelled.to(valid.device).bool())[:, None, None] & inside
    if teacher_on_ignore:
        unl = unl | (inside & ~valid)
    mask = valid | unl
    conf = teacher_confidence(teacher).detach()
    weight = torch.where(unl, conf, torch.ones_like(conf))
    return mask, weight, unl

