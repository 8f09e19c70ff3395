"""Export a model to TorchScript and ONNX with its metadata, load it back, and check it.

Dimensions: B tiles, H×W pixels (multiples of 32), K = 8 type channels.

Both formats take one input ``image``: float32 (B, 3, H, W) RGB in [0, 1] (normalisation is
inside the model) and give three outputs ``np`` (B, 2, H, W) logits, ``hv`` (B, 2, H, W) and
``tp`` (B, K, H, W) logits. Batch, height and width are dynamic (checked by :func:`check_onnx`
and :func:`check_torchscript` at two sizes).

Input shape (:func:`shape_guarded`): the PyTorch models refuse sides that are not multiples of
``meta["input_multiple"]`` (32; 64 for MobileViT students). An exported model never runs on such
an input unchecked: a model with dynamic height/width pads the input on the bottom/right (edge
pixels repeated) up to the next multiple inside the graph and crops its outputs back, so any
H×W works and gives PyTorch's outputs on the padded tile; a model whose graph is fixed to the
export size (``meta["input_fixed"]``: a teacher feeding its ViT native windows) is exported
with fixed height/width: onnxruntime rejects other sizes itself ("invalid dimensions"), and the
TorchScript file raises ``RuntimeError`` naming the expected size.

Metadata (:func:`export_metadata`): ``model.meta`` (classes, colours, pixel size, input size,
mean/std, architecture, ...) plus ``format``, ``input``, ``outputs`` and ``cellcurate_version``,
stored as JSON: in TorchScript as the extra file ``meta.json``; in ONNX as the
``metadata_props`` entry ``cellcurate.meta``.

>>> import torch
>>> class Tiny(torch.nn.Module):
...     meta = {"mpp": 0.25, "input_size": 64}
...     def __init__(self):
...         super().__init__(); self.conv = torch.nn.Conv2d(3, 12, 1)
...     def forward(self, x):
...         y = self.conv(x); return {"np": y[:, :2], "hv": torch.tanh(y[:, 2:4]), "tp": y[:, 4:]}
>>> import tempfile, pathlib
>>> tiny = Tiny()
>>> p = export_onnx(tiny, pathlib.Path(tempfile.mkdtemp()) / "tiny.onnx")
>>> check_onnx(tiny, p) < 1e-4, read_onnx_metadata(p)["output_names"]
(True, ['np', 'hv', 'tp'])
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputFormatError, ModelError
from .predict import atomic_path, model_meta

OUTPUT_NAMES: tuple[str, str, str] = ("np", "hv", "tp")
INPUT_NAME = "image"
META_KEY = "cellcurate.meta"
META_FILE = "meta.json"


def export_metadata(model: Any, *, fmt: str) -> dict[str, Any]:
    """JSON-ready metadata written into an exported model."""
    from .. import __version__

    meta = json.loads(json.dumps(model_meta(model), default=_jsonable))
    meta.update(
        {
            "format": fmt,
            "input": {"name": INPUT_NAME, "shape": ["B", 3, "H", "W"], "dtype": "float32", "range": [0.0, 1.0]},
            "output_names": list(OUTPUT_NAMES),
            "cellcurate_version": __version__,
        }
    )
    return meta


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, set)):
        return list(v)
    return str(v)


def _tuple_module(model: Any) -> Any:
    import torch

    class TupleOutputs(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.inner(x)
            return out["np"], out["hv"], out["tp"]

    return TupleOutputs(model).eval()


def input_multiple(model: Any) -> int:
    """The multiple every input side must be (``meta["input_multiple"]``, default 32)."""
    return int(model_meta(model).get("input_multiple") or 32)


def input_fixed(model: Any) -> bool:
    """True when the model's traced graph only holds for its export size (``meta["input_fixed"]``)."""
    return bool(model_meta(model).get("input_fixed", False))


def shape_guarded(model: Any) -> Any:
    """``model`` with tuple outputs behind the input-shape guard of exported models: replicate-pad
    of the bottom/right edges up to ``input_multiple(model)``, outputs cropped back to H×W."""
    import torch
    import torch.nn.functional as F

    class PadToMultiple(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, multiple: int) -> None:
            super().__init__()
            self.inner = inner
            self.multiple = multiple

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h, w = x.shape[-2], x.shape[-1]
            m = self.multiple
            ph, pw = (m - h % m) % m, (m - w % m) % m
            out = self.inner(F.pad(x, [0, pw, 0, ph], mode="replicate"))
            return out["np"][..., :h, :w], out["hv"][..., :h, :w], out["tp"][..., :h, :w]

    return PadToMultiple(model, input_multiple(model)).eval()


def _fixed_size_guard(traced: Any, size: int) -> Any:
    """Script a wrapper around a traced fixed-size module that refuses any other height/width."""
    import torch

    class FixedSize(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, size: int) -> None:
            super().__init__()
            self.inner = inner
            self.size = size

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.size or x.shape[3] != self.size:
                raise RuntimeError(
                    "cellcurate model input must be (B, 3, " + str(self.size) + ", " + str(self.size)
                    + "), got " + str(list(x.shape))
                )
            return self.inner(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(FixedSize(traced, size))


def _example(model: Any, *, batch: int = 1, size: int | None = None, seed: int = 0) -> Any:
    import torch

    m = input_multiple(model)
    s = int(size or model_meta(model).get("input_size") or 256)
    s = max(m, s - s % m)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, s, s, generator=g)


def _device_of(model: Any) -> Any:
    import torch

    params = list(model.parameters())
    return params[0].device if params else torch.device("cpu")


def export_torchscript(model: Any, path: str | os.PathLike[str], *, example_size: int | None = None) -> Path:
    """Trace ``model`` (in eval mode, on CPU) to TorchScript and save it with ``meta.json``.

    The traced module keeps the dict output of the package contract and the input-shape guard of
    the module docstring. Returns ``path``.
    """
    import torch

    path = Path(path)
    model = model.eval().cpu()
    x = _example(model, size=example_size)
    fixed = input_fixed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            if fixed:
                traced = _fixed_size_guard(torch.jit.trace(model, x, strict=False, check_trace=False), int(x.shape[-1]))
            else:
                traced = torch.jit.trace(shape_guarded(model), x, strict=False, check_trace=False)
        except Exception as exc:  # tracing errors come in many types; name the model
            raise ModelError(f"cannot trace {type(model).__name__} to TorchScript ({type(exc).__name__}: {exc})", path=path) from None
    meta = json.dumps(export_metadata(model, fmt="torchscript"), indent=2)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(tmp), _extra_files={META_FILE: meta})
    return path


def export_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    dynamic_hw: bool = True,
    example_size: int | None = None,
) -> Path:
    """Export ``model`` (eval mode, CPU) to ONNX with named outputs, a dynamic batch axis (and
    dynamic height/width with ``dynamic_hw``, unless the model is ``input_fixed``), the input-shape
    guard of the module docstring and the metadata in ``metadata_props``."""
    import onnx
    import torch

    path = Path(path)
    model = model.eval().cpu()
    x = _example(model, size=example_size)
    dynamic_hw = dynamic_hw and not input_fixed(model)
    axes: dict[str, dict[int, str]] = {}
    for name in (INPUT_NAME, *OUTPUT_NAMES):
        axes[name] = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    shape_guarded(model) if dynamic_hw else _tuple_module(model),
                    (x,),
                    str(tmp),
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=axes,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
            except Exception as exc:  # the exporter raises many types; name the model and opset
                raise ModelError(
                    f"cannot export {type(model).__name__} to ONNX opset {opset} ({type(exc).__name__}: {exc})", path=path
                ) from None
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(export_metadata(model, fmt="onnx"))
        proto.producer_name = "cellcurate"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata :func:`export_onnx` stored (``{}`` when there is none)."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise InputFormatError(path, f"not a readable ONNX model ({type(exc).__name__})") from None
    for p in proto.metadata_props:
        if p.key == META_KEY:
            try:
                return dict(json.loads(p.value))
            except json.JSONDecodeError:
                raise InputFormatError(path, f"metadata entry {META_KEY!r} is not valid JSON") from None
    return {}


def read_torchscript_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata :func:`export_torchscript` stored (``{}`` when there is none)."""
    return load_torchscript(path).meta


def load_torchscript(path: str | os.PathLike[str], *, device: str = "cpu") -> Any:
    """Load an exported TorchScript model as an ``nn.Module`` with ``.meta`` and dict outputs."""
    import torch

    path = Path(path)
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still supported
            scripted = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        raise InputFormatError(path, f"not a TorchScript model ({str(exc).splitlines()[0][:120]})") from None
    try:
        meta = json.loads(extra[META_FILE]) if extra[META_FILE] else {}
    except json.JSONDecodeError:
        raise InputFormatError(path, f"{META_FILE} inside the TorchScript archive is not valid JSON") from None

    class TorchScriptModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scripted = scripted
            self.meta = meta

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            try:
                out = self.scripted(x)
            except torch.jit.Error as exc:  # the shape guard's refusal, among others: its last line
                raise ModelError(_last_line(exc), path=path) from None
            if isinstance(out, (tuple, list)):
                return dict(zip(OUTPUT_NAMES, out))
            return dict(out)

    return TorchScriptModel().eval()


def load_onnx(path: str | os.PathLike[str], *, threads: int | None = None) -> Any:
    """Load an exported ONNX model into an onnxruntime CPU session, wrapped as an ``nn.Module``
    (torch tensors in and out, ``.meta``), so evaluation and prediction treat it like the others."""
    import onnxruntime as ort
    import torch

    path = Path(path)
    meta = read_onnx_metadata(path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputFormatError(path, f"onnxruntime cannot load the model ({type(exc).__name__})") from None
    names = [o.name for o in session.get_outputs()]
    if set(names) != set(OUTPUT_NAMES):
        raise InputFormatError(path, f"ONNX outputs must be {list(OUTPUT_NAMES)}, got {names}")
    input_name = session.get_inputs()[0].name

    class OnnxModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.meta = meta
            self.session = session

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            try:
                res = self.session.run(names, {input_name: x.detach().float().cpu().numpy()})
            except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
                raise ModelError(f"onnxruntime refuses input {tuple(x.shape)}: {_last_line(exc)}", path=path) from None
            return {n: torch.from_numpy(r).to(x.device) for n, r in zip(names, res)}

    return OnnxModel().eval()


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def _max_diff(reference: Any, candidate: Any, inputs: Sequence[Any]) -> float:
    import torch

    worst = 0.0
    with torch.inference_mode():
        for x in inputs:
            ref = reference(x)
            try:
                got = candidate(x)
            except Exception as exc:  # onnxruntime / TorchScript raise their own types
                msg = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
                raise ModelError(
                    f"the exported model fails on input {tuple(x.shape)} (shapes fixed at export?): {msg}"
                ) from None
            for name in OUTPUT_NAMES:
                a = ref[name].float().cpu()
                b = torch.as_tensor(got[name]).float().cpu()
                if a.shape != b.shape:
                    raise ModelError(f"exported output {name!r} has shape {tuple(b.shape)}, PyTorch gives {tuple(a.shape)}")
                worst = max(worst, float((a - b).abs().max()))
    return worst


def _check_inputs(model: Any, *, batch: int, seed: int) -> list[Any]:
    s = _example(model, batch=1).shape[-1]
    if input_fixed(model):  # only the batch may change
        return [_example(model, batch=batch, size=s, seed=seed), _example(model, batch=1, size=s, seed=seed + 1)]
    # the export size with a batch, then a different, non-square size: dynamic axes must hold
    m = input_multiple(model)
    return [_example(model, batch=batch, size=s, seed=seed), _example(model, batch=1, size=s, seed=seed + 1)[..., : max(m, s - m)]]


def _check_shape_guard(model: Any, candidate: Any, *, seed: int) -> float:
    """Exercise the input-shape guard: a dynamic model on a tile whose sides are not multiples must
    equal PyTorch on the padded tile, cropped (returns the largest difference); a fixed-size model
    must refuse another size."""
    import torch
    import torch.nn.functional as F

    s = int(_example(model).shape[-1])
    m = input_multiple(model)
    if input_fixed(model):
        x = _example(model, size=s, seed=seed)[..., : s - m, :]
        try:
            candidate(x)
        except ModelError:  # the loaders turn onnxruntime's / TorchScript's refusal into this
            return 0.0
        raise ModelError(f"the exported model accepts a {tuple(x.shape)} input although it is fixed to {s}×{s}")
    x = _example(model, size=s, seed=seed + 2)[..., : s - 7, : (s - m - 5 if s - m - 5 > 0 else s - 11)]
    h, w = int(x.shape[-2]), int(x.shape[-1])
    with torch.inference_mode():
        ref = model(F.pad(x, [0, (m - w % m) % m, 0, (m - h % m) % m], mode="replicate"))
        try:
            got = candidate(x)
        except Exception as exc:  # onnxruntime / TorchScript raise their own types
            msg = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the exported model fails on input {tuple(x.shape)} (not whole multiples of {m}): {msg}") from None
    worst = 0.0
    for name in OUTPUT_NAMES:
        a = ref[name][..., :h, :w].float()
        b = torch.as_tensor(got[name]).float()
        if a.shape != b.shape:
            raise ModelError(f"exported output {name!r} has shape {tuple(b.shape)} for input {tuple(x.shape)}, expected {tuple(a.shape)}")
        worst = max(worst, float((a - b).abs().max()))
    return worst


def check_onnx(model: Any, path: str | os.PathLike[str], *, atol: float = 1e-4, batch: int = 2, seed: int = 0) -> float:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same random inputs (a batch
    at the export size, then one non-square tile, then one whose sides are not multiples of
    ``input_multiple``, compared with PyTorch on it padded; a fixed-size model must refuse
    another size instead); return the largest absolute difference over all outputs. Raises
    ``ModelError`` when it exceeds ``atol``."""
    return _check_export(model, path, load_onnx, "ONNX", atol=atol, batch=batch, seed=seed)


def check_torchscript(model: Any, path: str | os.PathLike[str], *, atol: float = 1e-4, batch: int = 2, seed: int = 0) -> float:
    """As :func:`check_onnx`, for a TorchScript file."""
    return _check_export(model, path, load_torchscript, "TorchScript", atol=atol, batch=batch, seed=seed)


def _check_export(model: Any, path: str | os.PathLike[str], load: Any, kind: str, *, atol: float, batch: int,
                  seed: int) -> float:
    path = Path(path)
    model = model.eval().cpu()
    try:
        loaded = load(path)
        diff = _max_diff(model, loaded, _check_inputs(model, batch=batch, seed=seed))
        diff = max(diff, _check_shape_guard(model, loaded, seed=seed))
    except ModelError as exc:
        raise ModelError(str(exc), path=path) from None
    if not diff <= atol:
        raise ModelError(f"{kind} outputs differ from PyTorch by {diff:.3g} > atol {atol:g}", path=path)
    return diff


# -- bioimage.io model description ----------------------------------------------------------------
#: bioimage.io model description format written by :func:`write_bioimageio_rdf`.
BIOIMAGEIO_FORMAT_VERSION = "0.5.4"
#: SPDX id of the licence of models trained on the curated data (PanNuke, MoNuSAC: CC BY-NC-SA 4.0).
MODEL_LICENSE = "CC-BY-NC-SA-4.0"
_WEIGHT_KEYS = {"onnx": "onnx", "torchscript": "torchscript"}


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_bioimageio_rdf(
    folder: str | os.PathLike[str],
    model: Any,
    *,
    weights: dict[str, str | os.PathLike[str]],
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] = ("cellcurate",),
    cite: Sequence[dict[str, str]] | None = None,
    documentation: str | os.PathLike[str] | None = None,
    license: str = MODEL_LICENSE,
    test_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Write ``<folder>/rdf.yaml``, a bioimage.io model description (format 0.5), for exported
    weights of ``model``, with its test tensors; returns the path of ``rdf.yaml``.

    Parameters
    ----------
    folder
        The folder holding the weights; the description, ``test_input.npy``,
        ``test_output_{np,hv,tp}.npy`` and (unless given) ``README.md`` are written there, and
        every file is referenced relative to it.
    model
        The PyTorch model the weights were exported from (a package-contract model with
        ``.meta``: classes, ``mpp``, ``input_size``, ``mean``/``std``); it computes the test
        outputs.
    weights
        Format -> file: ``{"onnx": ".../model.onnx", "torchscript": ".../model.torchscript.pt"}``
        (at least one; files inside ``folder``).
    name, description, authors, cite, documentation, license
        The description's fields (defaults from the model's metadata; ``documentation`` a
        Markdown file inside ``folder``, default a generated ``README.md``).
    test_size
        Side of the square test tile (default: the model's ``input_size``, a multiple of 32).

    The input ``image`` is float32 (batch, channel [R, G, B], y, x) in [0, 1] with the pixel size
    as the ``scale`` of y and x (micrometre); the normalisation with ``mean``/``std`` is inside
    the graph, so no preprocessing is declared. Outputs ``np`` (2 channels), ``hv`` (2) and
    ``tp`` (K) have the input's y/x size. Check the result with
    ``bioimageio.spec.load_description(path)``.
    """
    import torch

    from .. import __version__

    folder = Path(folder)
    if not weights:
        raise ModelError("write_bioimageio_rdf needs at least one weights file", path=folder)
    meta = model_meta(model)
    entries: dict[str, dict[str, Any]] = {}
    for fmt, wpath in weights.items():
        if fmt not in _WEIGHT_KEYS:
            raise ModelError(f"weights format must be one of {tuple(_WEIGHT_KEYS)}, got {fmt!r}", path=folder)
        wp = Path(wpath)
        if not wp.is_file() or wp.resolve().parent != folder.resolve():
            raise ModelError(f"{fmt} weights {wp} must be a file inside {folder}", path=folder)
        entry: dict[str, Any] = {"source": wp.name, "sha256": _sha256(wp)}
        if fmt == "onnx":
            import onnx

            opsets = [o.version for o in onnx.load(str(wp), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")]
            entry["opset_version"] = int(opsets[0]) if opsets else 17
        else:
            entry["pytorch_version"] = torch.__version__.split("+")[0]
        entries[_WEIGHT_KEYS[fmt]] = entry
    if "onnx" in entries and "torchscript" in entries:
        # both are exported from the same PyTorch model; one entry must be the "original"
        entries["onnx"]["parent"] = "torchscript"

    # test tensors: a seeded random tile and the PyTorch model's outputs on it
    model = model.eval().cpu()
    x = _example(model, batch=1, size=test_size, seed=seed)
    with torch.inference_mode():
        out = model(x)
    tests = {"image": x.numpy().astype(np.float32)}
    tests.update({k: out[k].float().numpy() for k in OUTPUT_NAMES})
    files = {}
    for key, arr in tests.items():
        fname = "test_input.npy" if key == "image" else f"test_output_{key}.npy"
        with atomic_path(folder / fname) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        files[key] = {"source": fname, "sha256": _sha256(folder / fname)}

    classes = [str(c) for c in meta.get("classes", [])] or [f"class{k}" for k in range(tests["tp"].shape[1])]
    mpp = float(meta.get("mpp") or 0.25)
    if documentation is None:
        doc = folder / "README.md"
        with atomic_path(doc) as tmp:
            tmp.write_text(_bioimageio_readme(meta, classes, mpp), encoding="utf-8")
    else:
        doc = Path(documentation)
        if not doc.is_file() or doc.resolve().parent != folder.resolve():
            raise ModelError(f"documentation {doc} must be a file inside {folder}", path=folder)
    min_side = 32

    def space(axis: str) -> dict[str, Any]:
        return {"type": "space", "id": axis, "size": {"min": min_side, "step": 32}, "unit": "micrometer",
                "scale": mpp}

    def out_axes(n: int, names: list[str]) -> list[dict[str, Any]]:
        return [{"type": "batch"}, {"type": "channel", "channel_names": names},
                *({"type": "space", "id": a, "size": {"tensor_id": "image", "axis_id": a}, "unit": "micrometer",
                   "scale": mpp} for a in ("y", "x"))]

    def ident(s: str) -> str:
        return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in s) or "c"

    arch = str(meta.get("architecture") or meta.get("kind") or type(model).__name__)
    rdf: dict[str, Any] = {
        "type": "model",
        "format_version": BIOIMAGEIO_FORMAT_VERSION,
        "name": name or f"cellcurate {arch} nucleus segmentation and classification",
        "description": description or (
            f"HoVer-Net-style nucleus instance segmentation and {len(classes) - 1}-class classification "
            f"({', '.join(classes[1:])}) for H&E at {mpp:g} um/pixel, exported by cellcurate {__version__}."),
        "authors": [{"name": a} for a in authors],
        "cite": list(cite) if cite else [
            {"text": "Graham et al., HoVer-Net: simultaneous segmentation and classification of nuclei in "
                     "multi-tissue histology images, Medical Image Analysis 58, 2019",
             "doi": "10.1016/j.media.2019.101563"}],
        "license": license,
        "documentation": doc.name,
        "tags": ["nuclei", "instance-segmentation", "classification", "histopathology", "h&e", "2d", "cellcurate"],
        "inputs": [{
            "id": INPUT_NAME,
            "description": "RGB tile in [0, 1]; normalisation (mean/std) is inside the model",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["R", "G", "B"]},
                     space("y"), space("x")],
            "test_tensor": files["image"],
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "outputs": [
            {"id": "np", "description": "nucleus / background logits", "axes": out_axes(2, ["background", "nucleus"]),
             "test_tensor": files["np"], "data": {"type": "float32"}},
            {"id": "hv", "description": "horizontal and vertical distance maps in [-1, 1]",
             "axes": out_axes(2, ["horizontal", "vertical"]), "test_tensor": files["hv"],
             "data": {"type": "float32", "range": [-1.0, 1.0]}},
            {"id": "tp", "description": "class logits (channel 0 background)",
             "axes": out_axes(len(classes), [ident(c) for c in classes]), "test_tensor": files["tp"],
             "data": {"type": "float32"}},
        ],
        "weights": entries,
        "config": {"cellcurate": {"version": __version__, "meta": json.loads(json.dumps(meta, default=_jsonable))}},
    }
    import yaml

    path = folder / "rdf.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _bioimageio_readme(meta: dict[str, Any], classes: list[str], mpp: float) -> str:
    return "\n".join([
        "# cellcurate nucleus model", "",
        (f"Input `image`: float32 (batch, 3, y, x) RGB in [0, 1] at {mpp:g} um/pixel; y and x multiples of 32. "
         "The mean/std normalisation is inside the model."), "",
        ("Outputs: `np` (2 channels: background / nucleus logits), `hv` (2: horizontal / vertical distance "
         f"maps), `tp` ({len(classes)}: class logits: {', '.join(classes)}). Instances come from the HoVer-Net "
         "post-processing of np + hv (cellcurate.models.postprocess)."), "",
        "Trained on data derived from PanNuke and MoNuSAC (CC BY-NC-SA 4.0).", "",
        "# Validation", "",
        ("`curate export-model` runs each exported file (ONNX through onnxruntime on CPU, TorchScript) on a "
         "batch at the export size and on a non-square tile and checks the outputs against PyTorch; "
         "`curate evaluate` reports PQ, mPQ, bPQ, AJI and F1 per class on a release's test split."), "",
    ])
