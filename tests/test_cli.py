"""The `curate` group: instant --help/--version (no heavy imports), one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from cellcurate.cli.main import COMMANDS, cli

HEAVY = ("torch", "timm", "napari", "pandas", "zarr", "sklearn", "cleanlab", "skimage", "matplotlib", "scipy")


def _modules_loaded_by(args: list[str]) -> set[str]:
    code = (
        "import sys, json\n"
        "from cellcurate.cli.main import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stderr.strip().splitlines()[-1]))


def test_help_and_version_import_no_heavy_library():
    for args in (["--help"], ["--version"], ["ingest", "--help"], ["relabel", "--help"], ["train", "--help"]):
        loaded = _modules_loaded_by(args)
        assert not (loaded & set(HEAVY)), (args, sorted(loaded & set(HEAVY)))


def test_every_registered_command_loads_and_has_help():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for name in COMMANDS:
        assert name in r.output, f"{name} missing from curate --help"
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)


def test_version():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("curate ")


def test_missing_store_is_one_line_error(tmp_path):
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error: ") and "nope" in r.output
    r = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert r.exit_code == 1 and "neither a store" in r.output
