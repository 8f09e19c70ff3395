"""Constants shared by every layer, derived from the taxonomy where they can be.

Class maps (release ``classes`` arrays, OME-Zarr labels, metrics inputs) hold 0 for background,
1..K for the taxonomy's classes and :data:`IGNORE_VALUE` for pixels that must not be scored.

>>> IGNORE_VALUE
255
>>> class _T:  # anything with a ``classes`` sequence, e.g. a Taxonomy
...     classes = ["Neoplastic", "Epithelial", "Lymphocyte"]
>>> n_classes(_T())
3
"""

from __future__ import annotations

from typing import Any

#: Class-map value of pixels that carry no trusted class (rejected, unresolved, ambiguous).
IGNORE_VALUE: int = 255
#: Class-map value of background pixels.
BACKGROUND_VALUE: int = 0


def n_classes(taxonomy: Any) -> int:
    """Number of foreground classes K of a taxonomy (anything with a ``classes`` sequence)."""
    return len(taxonomy.classes)


def ignore_value(taxonomy: Any) -> int:
    """The taxonomy's ignore value (its ``ignore`` attribute), :data:`IGNORE_VALUE` by default."""
    return int(getattr(taxonomy, "ignore", IGNORE_VALUE))
