"""Checkpoints: ``model.pt`` (a state dict) + ``config.json`` (everything needed to rebuild) in a folder.

Layout of a checkpoint folder::

    model.pt        state dict (torch.save; read back with weights_only=True)
    config.json     kind (teacher|student), architecture, encoder spec, classes, mpp, normalisation,
                    meta, training config, seed, epoch, metrics
    optimizer.pt    optimizer state (only when saved for resuming)

A teacher whose encoder came from a local weights file does **not** copy the ~4.5 GB encoder into
``model.pt``: config.json records the file's absolute path and sha256, and :func:`load_model`
loads it from there (or from ``encoder_weights=``), refusing a file with another sha256. A teacher
with a randomly initialised encoder (tests, ``--tiny``) stores everything in ``model.pt``.

>>> save_checkpoint(tmp / "ckpt", Student(channels=(8, 16, 32, 64, 64)), config={"seed": 0},
...                 epoch=1, metrics={})  # doctest: +SKIP
>>> load_model(tmp / "ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import atomic_write_with
from ..core.weights import read_state_dict, safe_torch_load
from ..errors import ModelError
from .encoders import EncoderSpec, build_encoder
from .student import Student, StudentConfig
from .teacher import Teacher, TeacherConfig

__all__ = [
    "CONFIG_NAME",
    "MODEL_NAME",
    "OPTIMIZER_NAME",
    "load_model",
    "load_optimizer_state",
    "model_config",
    "read_config",
    "save_checkpoint",
]

MODEL_NAME = "model.pt"
CONFIG_NAME = "config.json"
OPTIMIZER_NAME = "optimizer.pt"
FORMAT = "cellcurate-model"
FORMAT_VERSION = 1


def model_config(model: nn.Module) -> dict[str, Any]:
    """The part of config.json that rebuilds ``model`` (kind, architecture, encoder)."""
    if isinstance(model, Teacher):
        enc = model.encoder
        return {
            "kind": "teacher",
            "architecture": model.config.to_dict(),
            "encoder": {
                "spec": enc.spec.to_dict(),
                "weights": enc.weights,
                "weights_sha256": enc.weights_sha256,
                "in_state_dict": enc.weights is None,
            },
        }
    if isinstance(model, Student):
        return {"kind": "student", "architecture": model.config.to_dict()}
    raise ModelError(f"cannot checkpoint a {type(model).__name__}: expected a Teacher or a Student")


def _state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if isinstance(model, Teacher) and model.encoder.weights is not None:
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return {k: v.detach().cpu() for k, v in state.items()}


def save_checkpoint(
    dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int,
    metrics: dict[str, Any],
) -> Path:
    """Write ``dir/model.pt`` + ``dir/config.json`` (+ ``dir/optimizer.pt``), each atomically.

    Parameters
    ----------
    dir
        Checkpoint folder (created).
    model
        A :class:`Teacher` or :class:`Student`.
    config
        Training configuration (JSON-serialisable; its ``seed`` is copied to the top level).
    optimizer
        Saved for resuming when given.
    epoch
        Number of completed epochs.
    metrics
        JSON-serialisable metrics/history.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = getattr(model, "meta", {})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model_config(model),
        "classes": meta.get("classes"),
        "colors": meta.get("colors"),
        "mpp": meta.get("mpp"),
        "normalisation": {"mean": meta.get("mean"), "std": meta.get("std"), "input_range": [0.0, 1.0]},
        "meta": meta,
        "training": config,
        "seed": config.get("seed"),
        "epoch": int(epoch),
        "metrics": metrics,
    }
    text = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    state = _state_to_save(model)
    atomic_write_with(out / MODEL_NAME, lambda fh: torch.save(state, fh))
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        atomic_write_with(out / OPTIMIZER_NAME, lambda fh: torch.save(opt_state, fh))
    atomic_write_with(out / CONFIG_NAME, lambda fh: fh.write(text.encode("utf-8")))
    return out


def _folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.parent if p.suffix in {".pt", ".json"} else p


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``config.json`` of a checkpoint folder (or of a file inside it)."""
    cfg_path = _folder(path) / CONFIG_NAME
    try:
        doc = json.loads(cfg_path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelError("checkpoint config not found", path=cfg_path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"checkpoint config is not valid JSON ({exc})", path=cfg_path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"not a cellcurate model config (expected format {FORMAT!r})", path=cfg_path)
    if doc.get("kind") not in ("teacher", "student"):
        raise ModelError(f"kind must be 'teacher' or 'student', got {doc.get('kind')!r}", path=cfg_path)
    return doc


def _load_state(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError("checkpoint weights not found", path=path)
    return read_state_dict(path, what="checkpoint weights", unwrap=False, map_location=map_location)


def _build(doc: dict[str, Any], cfg_path: Path, encoder_weights: str | os.PathLike[str] | None) -> nn.Module:
    arch = dict(doc.get("architecture") or {})
    try:
        if doc["kind"] == "student":
            return Student(**StudentConfig(**arch).to_dict())
        arch.setdefault("encoder_input", "resize")  # written before the option: trained with resize
        tcfg = TeacherConfig(**arch)
        enc_doc = doc["encoder"]
        spec = EncoderSpec.from_dict(enc_doc["spec"])
    except (KeyError, TypeError) as exc:
        raise ModelError(f"checkpoint config does not describe the architecture ({exc!r})", path=cfg_path) from None
    if enc_doc.get("in_state_dict"):
        encoder = build_encoder(spec, random_init=True)
    else:
        weights = encoder_weights or enc_doc.get("weights")
        if not weights:
            raise ModelError("teacher config names no encoder weights file", path=cfg_path)
        if not Path(weights).is_file():
            raise ModelError(
                "encoder weights file of this teacher not found (pass encoder_weights= / --weights)", path=weights
            )
        encoder = build_encoder(spec, weights=weights)
        want = enc_doc.get("weights_sha256")
        if want and encoder.weights_sha256 != want:
            raise ModelError(
                f"encoder weights differ from the teacher's (sha256 {encoder.weights_sha256[:12]}…, "  # type: ignore[index]
                f"expected {want[:12]}…)",
                path=weights,
            )
    return Teacher(encoder, **tcfg.to_dict())


def load_model(
    dir_or_file: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    encoder_weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Rebuild a teacher or student from its folder and load ``model.pt`` (weights_only=True).

    Parameters
    ----------
    dir_or_file
        The checkpoint folder, or its ``model.pt`` / ``config.json``.
    map_location
        Device of the returned model.
    encoder_weights
        A teacher's encoder weights file, overriding the path recorded in config.json.

    Returns
    -------
    nn.Module
        In eval mode, with ``.meta`` from config.json.

    Raises
    ------
    ModelError
        Missing/invalid config.json or model.pt, or weights that do not match the architecture.
    """
    folder = _folder(dir_or_file)
    doc = read_config(folder)
    cfg_path = folder / CONFIG_NAME
    model = _build(doc, cfg_path, encoder_weights)
    weights_path = folder / MODEL_NAME
    state = _load_state(weights_path, "cpu")
    own = model.state_dict()
    skip_encoder = isinstance(model, Teacher) and not doc["encoder"].get("in_state_dict")
    expected = {k for k in own if not (skip_encoder and k.startswith("encoder."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    bad = sorted(k for k in expected & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{n} {what} (e.g. {', '.join(keys[:3])})"
            for what, keys, n in (
                ("missing keys", missing, len(missing)),
                ("unexpected keys", unexpected, len(unexpected)),
                ("shape mismatches", bad, len(bad)),
            )
            if keys
        )
        raise ModelError(f"weights do not match the {doc['kind']} in config.json: {detail}", path=weights_path)
    model.load_state_dict(state, strict=not skip_encoder)
    if isinstance(doc.get("meta"), dict):
        model.meta = doc["meta"]
    return model.to(map_location).eval()


def load_optimizer_state(dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The optimizer state saved beside a checkpoint, or None when there is none."""
    path = _folder(dir) / OPTIMIZER_NAME
    if not path.is_file():
        return None
    return safe_torch_load(path, what="optimizer state")
