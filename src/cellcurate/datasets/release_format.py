"""The release format's identity, its manifest reader and its split names (no torch, no zarr):
shared by the loader (:mod:`cellcurate.datasets.release`) and the writer/verifier
(:mod:`cellcurate.curation.release`). Schema: docs/RELEASE_FORMAT.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputFormatError, InputNotFoundError

RELEASE_FORMAT = "cellcurate-release"
SUPPORTED_FORMAT_VERSION = 1


def read_release_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a release folder (checked for the format marker)."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise InputNotFoundError(path, "not a cellcurate release (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFormatError(mpath, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RELEASE_FORMAT:
        raise InputFormatError(mpath, f"format is not {RELEASE_FORMAT!r}")
    if int(manifest.get("format_version", 0)) > SUPPORTED_FORMAT_VERSION:
        raise InputFormatError(
            mpath, f"release format {manifest.get('format_version')} is newer than this cellcurate "
            f"reads ({SUPPORTED_FORMAT_VERSION}); upgrade cellcurate"
        )
    return manifest


def resolve_release_split(manifest: dict[str, Any], split: str | Sequence[str]) -> tuple[str, ...]:
    """Release split names that ``split`` stands for, using the manifest's aliases."""
    aliases: dict[str, list[str]] = manifest.get("splits", {}).get("aliases", {})
    known = set(manifest.get("splits", {}).get("n_images", {})) | {s for v in aliases.values() for s in v}
    names = [split] if isinstance(split, str) else list(split)
    out: list[str] = []
    for n in names:
        if n in aliases:
            out.extend(aliases[n])
        elif n in known:
            out.append(n)
        else:
            raise ConfigError(f"unknown split {n!r}; this release has {', '.join(sorted(known | set(aliases)))}")
    return tuple(dict.fromkeys(out))


#: Arrow type of every column of a release's tables (docs/RELEASE_FORMAT.md lists them). Strings
#: are ``string`` (not ``large_string``) in every table, so a pyarrow join on ``image_id`` works;
#: all-null columns keep their type (``probs`` list<double>, ``flag_reason`` string).
_TABLE_TYPES: dict[str, tuple[tuple[str, str], ...]] = {
    "images": (
        ("image_id", "string"), ("split", "string"), ("source_split", "string"), ("source", "string"),
        ("patient_id", "string"), ("tissue", "string"), ("mpp", "double"), ("height", "int32"),
        ("width", "int32"), ("n_nuclei", "int32"), ("n_ignore", "int32"), ("origin_file", "string"),
        ("origin_index", "int32"), ("annotation_file", "string"), ("zarr_group", "string"),
        ("zarr_index", "int32"),
    ),
    "nuclei": (
        ("nucleus_id", "int64"), ("image_id", "string"), ("split", "string"), ("kind", "string"),
        ("instance_id", "int32"), ("bbox_y0", "int32"), ("bbox_x0", "int32"), ("bbox_y1", "int32"),
        ("bbox_x1", "int32"), ("centroid_y", "float"), ("centroid_x", "float"), ("area", "int32"),
        ("label", "int16"), ("class_value", "uint8"), ("class_name", "string"), ("ignore_reason", "string"),
        ("source", "string"), ("source_label", "string"), ("candidates", "string"), ("decided", "string"),
        ("decided_round", "int64"), ("decided_by", "string"), ("decided_seq", "int64"),
        ("probs", "list<double>"), ("probs_round", "int64"), ("issue_score", "double"),
        ("flag_reason", "string"), ("origin_file", "string"), ("origin_index", "int32"),
        ("origin_channel", "int16"), ("origin_instance", "int64"), ("origin_region", "string"),
    ),
}
RELEASE_TABLES: tuple[str, ...] = tuple(_TABLE_TYPES)


def release_table_types(table: str) -> dict[str, str]:
    """Column name -> Arrow type name (``str(pyarrow type)``) of release table ``table``
    ("images" or "nuclei"), in column order."""
    if table not in _TABLE_TYPES:
        raise ConfigError(f"release table must be one of {RELEASE_TABLES}, got {table!r}")
    return dict(_TABLE_TYPES[table])


def release_schema(table: str) -> Any:
    """The ``pyarrow.Schema`` of release table ``table`` (imports pyarrow)."""
    import pyarrow as pa

    simple = {"string": pa.string(), "double": pa.float64(), "float": pa.float32(), "int64": pa.int64(),
              "int32": pa.int32(), "int16": pa.int16(), "uint8": pa.uint8(), "list<double>": pa.list_(pa.float64())}
    return pa.schema([pa.field(name, simple[t]) for name, t in release_table_types(table).items()])
