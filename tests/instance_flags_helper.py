"""Instance flags of the documented shape (docs/GEOMETRY_REVIEW.md, the contract with the detection
side), written straight through the ledger API: the geometry tests never import the detection module."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def square(x0: float, y0: float, side: float) -> list[list[float]]:
    """A square polygon on pixel edges: covers pixels x0..x0+side-1, y0..y0+side-1."""
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]]


def flag_event(image_id: str, issue: str, *, n: int, k: int = 1, run: str = "run-a", score: float = 0.9,
               nucleus_ids: list[int] | None = None, action: str = "add", polygons: list[Any] | None = None,
               label: int = 0, evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    ids = [int(i) for i in (nucleus_ids or [])]
    h8 = hashlib.sha256(image_id.encode()).hexdigest()[:8]
    return {
        "kind": "instance_flag", "round": k, "actor": "cellcurate-instances", "action": issue,
        "nucleus_id": ids[0] if ids else None, "score": float(score), "label": int(label), "ref": None,
        "payload": {"flag_id": f"i{k}-{h8}-{n}", "image_id": image_id, "nucleus_ids": ids,
                    "proposed": {"action": action, "polygons": polygons or []},
                    "evidence": evidence or {"iou": 0.0, "confidence": float(score)}, "run": run},
    }


def write_instance_flags(store, flags: list[dict[str, Any]]) -> list[int]:
    """Append instance_flag events; their seqs."""
    return store.ledger.append(flags)


def nucleus_square(store, image_id: str, index: int = 0) -> tuple[int, list[list[float]], np.ndarray]:
    """(nucleus id, a 4x4 square polygon shifted off it, its bbox) of the index-th nucleus of an image."""
    nuc = store.nuclei()
    nuc = nuc[(nuc["image_id"] == image_id) & (nuc["kind"] == "nucleus")].sort_values("instance_id")
    r = nuc.iloc[index]
    return int(r["nucleus_id"]), square(float(r["bbox_x0"]), float(r["bbox_y0"]), 4), r
