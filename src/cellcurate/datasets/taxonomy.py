"""The unified 7-class taxonomy and each source's mapping onto it, as data.

Class ids: 0 = background, 1..7 = the classes below, 255 = ignore (in class maps only).
A source label maps to a *set of candidate classes*: one candidate means the label is resolved
at ingest; several (PanNuke ``Inflammatory`` -> {Lymphocyte, Macrophage, Neutrophil}, MoNuSAC
``Epithelial`` -> {Neoplastic, Epithelial}) are resolved later by relabeling; the string
``"ignore"`` makes the region an ignore region (MoNuSAC ``Ambiguous``); ``"*"`` means every class
(instance-only sources label their nuclei ``"unknown nucleus"``). A source the taxonomy does not
map uses the default mapping of its registry entry (``cellcurate.datasets.sources``).

The taxonomy is stored as ``taxonomy.json`` in every store and release and identified by
:attr:`Taxonomy.hash` (sha256 of its canonical JSON). A user can bring another mapping with
``curate ingest ... --taxonomy FILE``.

>>> tax = Taxonomy.default()
>>> tax.candidates("pannuke", "Inflammatory")
(2, 6, 7)
>>> tax.class_name(6)
'Macrophage'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.constants import IGNORE_VALUE
from ..errors import ConfigError, InputFormatError

IGNORE = "ignore"
#: Mapping target meaning "every class of this taxonomy" (instance-only sources: "unknown nucleus").
ALL = "*"


@dataclass(frozen=True)
class TaxonomyClass:
    id: int
    name: str
    color: str  # "#rrggbb"

    @property
    def rgb(self) -> tuple[int, int, int]:
        h = self.color.lstrip("#")
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


class Taxonomy:
    """Unified classes plus per-source mappings. Build with :meth:`default`, :meth:`load` or
    :meth:`from_dict`; the object is read-only."""

    def __init__(self, data: dict[str, Any], *, origin: str = "<dict>") -> None:
        self._data = _validate(data, origin)
        self.classes: tuple[TaxonomyClass, ...] = tuple(
            TaxonomyClass(int(c["id"]), str(c["name"]), str(c["color"])) for c in self._data["classes"]
        )
        self._by_id = {c.id: c for c in self.classes}
        self._by_name = {c.name.lower(): c for c in self.classes}
        self.background: int = int(self._data.get("background", 0))
        self.ignore: int = int(self._data.get("ignore", IGNORE_VALUE))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "Taxonomy":
        text = resources.files(__package__).joinpath("default_taxonomy.json").read_text("utf-8")
        return cls(json.loads(text), origin="default_taxonomy.json")

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise InputFormatError(path, "taxonomy file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputFormatError(path, f"taxonomy is not valid JSON ({exc})") from None
        try:
            return cls(data, origin=str(path))
        except ConfigError as exc:
            raise InputFormatError(path, str(exc)) from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Taxonomy":
        return cls(data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._data))

    def to_json(self) -> str:
        return json.dumps(self._data, indent=2, sort_keys=True) + "\n"

    @property
    def hash(self) -> str:
        canonical = json.dumps(self._data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # -- queries -----------------------------------------------------------------------------
    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def class_name(self, class_id: int) -> str:
        try:
            return self._by_id[int(class_id)].name
        except KeyError:
            raise ConfigError(f"unknown class id {class_id}; expected one of {self.ids}") from None

    def class_id(self, name_or_id: str | int) -> int:
        """Accept a class name (case-insensitive) or an id (int or digit string)."""
        if isinstance(name_or_id, int) or (isinstance(name_or_id, str) and name_or_id.strip().isdigit()):
            cid = int(name_or_id)
            if cid not in self._by_id:
                raise ConfigError(f"unknown class id {cid}; expected one of {self.ids}")
            return cid
        c = self._by_name.get(str(name_or_id).strip().lower())
        if c is None:
            raise ConfigError(f"unknown class {name_or_id!r}; expected one of {', '.join(self.names)}")
        return c.id

    def color(self, class_id: int) -> str:
        return self._by_id[int(class_id)].color

    def sources(self) -> tuple[str, ...]:
        return tuple(self._data["sources"])

    def source_labels(self, source: str) -> tuple[str, ...]:
        return tuple(self._source(source))

    def candidates(self, source: str, label: str) -> tuple[int, ...]:
        """Candidate unified class ids for a source label; ``()`` for an ignore label.

        Raises ``ConfigError`` for a label the mapping does not know.
        """
        mapping = self._source(source)
        if label not in mapping:
            raise ConfigError(
                f"unknown {source} class {label!r}; the taxonomy maps {', '.join(mapping)}"
            )
        target = mapping[label]
        if target == IGNORE:
            return ()
        if target == ALL:
            return self.ids
        missing = [t for t in target if t.lower() not in self._by_name]
        if missing:  # only possible for a registry mapping (a taxonomy file is validated)
            raise ConfigError(
                f"source {source!r} maps {label!r} to {', '.join(map(repr, missing))}, which this taxonomy "
                f"lacks ({', '.join(self.names)}); add a \"sources\": {{\"{source}\": ...}} mapping to it"
            )
        return tuple(sorted(self._by_name[t.lower()].id for t in target))

    def is_ignore(self, source: str, label: str) -> bool:
        return self._source(source).get(label) == IGNORE

    def candidates_name(self, candidates: tuple[int, ...] | list[int]) -> str:
        """Readable name of a candidate set: ``"Lymphocyte"`` or ``"Lymphocyte|Macrophage|Neutrophil"``."""
        if len(candidates) == 0:
            return "ignore"
        return "|".join(self.class_name(c) for c in candidates)

    def _source(self, source: str) -> dict[str, Any]:
        """The taxonomy's own mapping of ``source``, else the default mapping of its registry entry."""
        try:
            return self._data["sources"][source]
        except KeyError:
            pass
        from .sources import find_source

        spec = find_source(source)
        if spec is None:
            raise ConfigError(
                f"the taxonomy has no mapping for source {source!r}; it maps {', '.join(self.sources())}"
            )
        return dict(spec.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Taxonomy) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"Taxonomy({self._data.get('name', '?')!r}, classes={list(self.names)}, hash={self.hash[:12]})"


def _validate(data: Any, origin: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: taxonomy must be a JSON object")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ConfigError(f"{origin}: 'classes' must be a non-empty list")
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for c in classes:
        if not isinstance(c, dict) or not {"id", "name", "color"} <= set(c):
            raise ConfigError(f"{origin}: each class needs id, name and color, got {c!r}")
        cid = c["id"]
        if not isinstance(cid, int) or not 1 <= cid <= 254:
            raise ConfigError(f"{origin}: class id must be an integer in 1..254, got {cid!r}")
        color = str(c["color"])
        if len(color) != 7 or not color.startswith("#"):
            raise ConfigError(f"{origin}: class {c['name']!r} color must be '#rrggbb', got {color!r}")
        try:
            int(color[1:], 16)
        except ValueError:
            raise ConfigError(f"{origin}: class {c['name']!r} color must be '#rrggbb', got {color!r}") from None
        if cid in seen_ids or str(c["name"]).lower() in seen_names:
            raise ConfigError(f"{origin}: duplicate class {c['name']!r} / id {cid}")
        seen_ids.add(cid)
        seen_names.add(str(c["name"]).lower())
    sources = data.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise ConfigError(f"{origin}: 'sources' must map each source to its label mapping")
    for src, mapping in sources.items():
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError(f"{origin}: mapping of source {src!r} must be a non-empty object")
        for label, target in mapping.items():
            if target in (IGNORE, ALL):
                continue
            if not isinstance(target, list) or not target:
                raise ConfigError(
                    f"{origin}: {src}/{label} must map to a list of class names, \"ignore\" or \"*\", got {target!r}"
                )
            for t in target:
                if str(t).lower() not in seen_names:
                    raise ConfigError(f"{origin}: {src}/{label} maps to unknown class {t!r}")
    return data
