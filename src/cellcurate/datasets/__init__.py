"""Source readers and converters, the store, the taxonomy, the synthetic sample, release loaders."""

from __future__ import annotations

from typing import Any

__all__ = ["Store", "Taxonomy", "load_release"]


def __getattr__(name: str) -> Any:  # lazy: keep `import cellcurate.datasets` cheap
    if name == "Store":
        from .store import Store

        return Store
    if name == "Taxonomy":
        from .taxonomy import Taxonomy

        return Taxonomy
    if name == "load_release":
        from .release import load_release

        return load_release
    raise AttributeError(name)
