"""Open zarr v3 arrays of untrusted folders (a release someone sent, a store on shared media).

Before zarr sees an array, its ``zarr.json`` is read and checked: it must be a zarr v3 array whose
codecs (also those nested inside ``sharding_indexed``) are all in :data:`ALLOWED_CODECS`, the
codecs cellcurate writes plus the other lossless built-ins. A codec outside the list is refused
with a one-line error naming the file: an unknown name (zarr would raise a traceback) and above
all a pickle codec (decoding a chunk would run code from the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputFormatError

#: zarr v3 codec names that may be decoded: zarr's built-in lossless codecs.
ALLOWED_CODECS: frozenset[str] = frozenset(
    {"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"}
)
#: dtypes an image, instance map or class map may have.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"}
)


def _codec_names(codecs: Any, meta_path: Path) -> list[str]:
    if not isinstance(codecs, list):
        raise InputFormatError(meta_path, f"'codecs' must be a list, got {type(codecs).__name__}")
    names: list[str] = []
    for c in codecs:
        name = c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str):
            raise InputFormatError(meta_path, f"a codec entry has no name: {c!r:.80}")
        names.append(name)
        conf = c.get("configuration") if isinstance(c, dict) else None
        if isinstance(conf, dict):
            for key in ("codecs", "index_codecs"):
                if key in conf:
                    names.extend(_codec_names(conf[key], meta_path))
    return names


def check_array_metadata(array_dir: str | Path) -> dict[str, Any]:
    """Read and check ``array_dir/zarr.json``; return it. Raises :class:`InputFormatError`."""
    meta_path = Path(array_dir) / "zarr.json"
    try:
        meta = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise InputFormatError(meta_path, "missing (no zarr array here)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFormatError(meta_path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise InputFormatError(meta_path, "not a zarr v3 array (zarr_format 3, node_type 'array')")
    for name in _codec_names(meta.get("codecs", []), meta_path):
        if "pickle" in name.lower():
            raise InputFormatError(meta_path, f"codec {name!r} is refused: decoding it would run code from the file")
        if name not in ALLOWED_CODECS:
            raise InputFormatError(meta_path, f"unknown or unsupported codec {name!r}; expected one of "
                                              f"{', '.join(sorted(ALLOWED_CODECS))}")
    dtype = meta.get("data_type")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise InputFormatError(meta_path, f"data_type {dtype!r:.40} is not a numeric type")
    if meta.get("storage_transformers"):
        raise InputFormatError(meta_path, "storage transformers are not supported")
    return meta


def open_array(array_dir: str | Path) -> Any:
    """``zarr.open_array(array_dir, mode="r")`` after :func:`check_array_metadata`; any zarr error
    opening it becomes a one-line :class:`InputFormatError` naming its ``zarr.json``."""
    import zarr

    check_array_metadata(array_dir)
    try:
        return zarr.open_array(str(array_dir), mode="r")
    except Exception as exc:  # zarr raises many types for bad metadata
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputFormatError(Path(array_dir) / "zarr.json", f"cannot open the array ({type(exc).__name__}: "
                                                             f"{first:.120})") from None
