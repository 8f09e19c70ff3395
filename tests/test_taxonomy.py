import json

import pytest

from cellcurate.datasets.taxonomy import Taxonomy
from cellcurate.errors import ConfigError, InputFormatError


def test_default_classes_and_ids():
    tax = Taxonomy.default()
    assert tax.names == ("Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil")
    assert tax.ids == (1, 2, 3, 4, 5, 6, 7)
    assert tax.background == 0 and tax.ignore == 255


@pytest.mark.parametrize(
    "source,label,expected",
    [
        ("pannuke", "Neoplastic", (1,)),
        ("pannuke", "Inflammatory", (2, 6, 7)),
        ("pannuke", "Connective", (3,)),
        ("pannuke", "Dead", (4,)),
        ("pannuke", "Epithelial", (5,)),
        ("monusac", "Epithelial", (1, 5)),
        ("monusac", "Lymphocyte", (2,)),
        ("monusac", "Macrophage", (6,)),
        ("monusac", "Neutrophil", (7,)),
        ("monusac", "Ambiguous", ()),
    ],
)
def test_source_mappings(source, label, expected):
    assert Taxonomy.default().candidates(source, label) == expected


def test_ignore_and_names():
    tax = Taxonomy.default()
    assert tax.is_ignore("monusac", "Ambiguous")
    assert tax.candidates_name((2, 6, 7)) == "Lymphocyte|Macrophage|Neutrophil"
    assert tax.class_id("macrophage") == 6 and tax.class_id("6") == 6 and tax.class_id(3) == 3


def test_unknown_label_and_class_are_clear_errors():
    tax = Taxonomy.default()
    with pytest.raises(ConfigError, match="unknown monusac class 'Mitosis'"):
        tax.candidates("monusac", "Mitosis")
    with pytest.raises(ConfigError, match="no mapping for source 'nosuch'"):
        tax.candidates("nosuch", "Epithelial")
    # a registered source the taxonomy file does not map uses its registry entry's mapping
    with pytest.raises(ConfigError, match="unknown consep class 'Epithelial'"):
        tax.candidates("consep", "Epithelial")
    with pytest.raises(ConfigError, match="unknown class 'Plasma'"):
        tax.class_id("Plasma")


def test_hash_is_stable_and_content_sensitive(tmp_path):
    tax = Taxonomy.default()
    assert tax.hash == Taxonomy.default().hash and len(tax.hash) == 64
    data = tax.to_dict()
    data["sources"]["monusac"]["Epithelial"] = ["Neoplastic"]
    other = Taxonomy.from_dict(data)
    assert other.hash != tax.hash
    p = tmp_path / "tax.json"
    p.write_text(json.dumps(data))
    assert Taxonomy.load(p) == other
    assert Taxonomy.load(p).candidates("monusac", "Epithelial") == (1,)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["classes"].append({"id": 1, "name": "Dup", "color": "#000000"}), "duplicate class"),
        (lambda d: d["classes"][0].update(color="red"), "color must be"),
        (lambda d: d["sources"]["pannuke"].update(Inflammatory=["Plasma"]), "unknown class 'Plasma'"),
        (lambda d: d.pop("sources"), "'sources' must map"),
    ],
)
def test_bad_taxonomy_files(tmp_path, mutate, message):
    data = Taxonomy.default().to_dict()
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(InputFormatError, match=message) as info:
        Taxonomy.load(p)
    assert str(p) in str(info.value)


def test_invalid_json(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{not json")
    with pytest.raises(InputFormatError, match="not valid JSON"):
        Taxonomy.load(p)
