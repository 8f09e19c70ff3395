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
