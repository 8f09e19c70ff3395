"""Safe weight loading: the only place cellcurate reads a weights file.

- ``.safetensors`` through safetensors; anything else through ``torch.load(weights_only=True)``
  (memory-mapped when the file allows), so a pickle that would run code is refused.
- :func:`read_state_dict` unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"teacher": ...}``
  and a ``module.`` prefix, and insists on a non-empty dict of tensors.
- :func:`load_state_dict_strict` loads it into a model: keys of a classification head the model
  lacks are dropped, every other missing or unexpected key or shape mismatch is a
  :class:`~cellcurate.errors.ModelError` naming the file.

torch is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import ModelError

__all__ = ["file_digest", "load_state_dict_strict", "read_state_dict", "safe_torch_load"]

HEAD_PREFIXES: tuple[str, ...] = ("head.", "fc.", "classifier.")
WRAPPERS: tuple[str, ...] = ("state_dict", "model", "teacher")


def file_digest(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """sha256 of a file, hex, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def safe_torch_load(path: str | os.PathLike[str], *, what: str = "weights", mmap: bool = False,
                    map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Raises
    ------
    ModelError
        The file is missing, truncated, or would need unpickling arbitrary objects.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} file not found", path=p)
    try:
        if mmap:
            try:
                return torch.load(p, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refused, truncated zip, ...
        raise ModelError(f"cannot read weights safely ({type(exc).__name__}: {_first_line(exc)})", path=p) from None


def read_state_dict(path: str | os.PathLike[str], *, what: str = "weights", unwrap: bool = True,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """A state dict of tensors from ``.safetensors`` or a ``torch.save`` file, read safely.

    Parameters
    ----------
    path
        The file.
    what
        How errors name the file's role ("encoder weights", "checkpoint weights").
    unwrap
        Unwrap ``state_dict`` / ``model`` / ``teacher`` wrappers and strip ``module.`` prefixes.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{what} file not found", path=p)
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device=str(map_location) if map_location else "cpu")
        except Exception as exc:  # bad header, truncated file
            raise ModelError(f"cannot read weights safely ({type(exc).__name__}: {_first_line(exc)})",
                             path=p) from None
    else:
        obj = safe_torch_load(p, what=what, mmap=True, map_location=map_location)
    if unwrap:
        for wrapper in WRAPPERS:
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{what} file does not hold a state dict of tensors", path=p)
    if unwrap:
        obj = {str(k).removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_state_dict_strict(model: Any, path: str | os.PathLike[str], *, assign: bool = False,
                           what: str = "weights") -> None:
    """Load the state dict in ``path`` into ``model`` (a ``torch.nn.Module``), strictly.

    Keys of a classification head (``head.*``, ``fc.*``, ``classifier.*``) that the (headless)
    model lacks are dropped; any other missing/unexpected key or shape mismatch raises
    :class:`~cellcurate.errors.ModelError`. ``assign=True`` replaces the model's tensors by the
    file's (the model may live on the ``meta`` device: no memory or time spent on a random init).
    """
    p = Path(path)
    state = read_state_dict(p, what=what)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEAD_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise ModelError(f"{what} do not fit the model: {'; '.join(parts)}", path=p)
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ModelError(f"{what} do not fit the model: {len(bad)} shape mismatches "
                         f"(e.g. {k}: file {got}, model {want})", path=p)
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise ModelError(f"{what} do not fit the model ({_first_line(exc)})", path=p) from None
