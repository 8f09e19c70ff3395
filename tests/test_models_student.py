"""Student presets (tiny / default / paper), the timm (MobileViT) backbone and the head switch."""

from __future__ import annotations

import types

import pytest
import torch
from click.testing import CliRunner

from cellcurate.errors import ConfigError
from cellcurate.models.checkpoint import load_model, save_checkpoint
from cellcurate.models.student import (
    PRESET_PARAMETERS,
    STUDENT_PRESETS,
    Student,
    StudentConfig,
    student_preset,
)
from cellcurate.models.teacher import build_teacher, count_parameters


def _meta_student(**kw) -> Student:
    with torch.device("meta"):
        return Student(**kw)


@pytest.mark.parametrize("name", sorted(STUDENT_PRESETS))
def test_preset_parameter_counts_are_the_documented_ones(name):
    assert count_parameters(_meta_student(channels=student_preset(name))) == PRESET_PARAMETERS[name]


@pytest.mark.slow
def test_paper_preset_is_about_48_times_smaller_than_h_optimus():
    teacher = build_teacher("h-optimus-0", meta=True)  # the meta device: no memory, no weights
    ratio = count_parameters(teacher.encoder) / count_parameters(_meta_student(channels=student_preset("paper")))
    assert 40 <= ratio <= 60
    assert 47.5 < ratio < 48.5  # 1,134,774,272 / 23,569,484


def test_unknown_preset_head_or_encoder_is_an_error():
    with pytest.raises(ConfigError, match="unknown student preset 'huge'"):
        student_preset("huge")
    with pytest.raises(ConfigError, match="head"):
        StudentConfig(head="star")
    with pytest.raises(ConfigError, match="not a timm model"):
        StudentConfig(encoder="no-such-net")


def test_distill_help_prints_the_preset_counts():
    from cellcurate.cli.distill import command

    res = CliRunner().invoke(command, ["--help"], terminal_width=400)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for n in PRESET_PARAMETERS.values():
        assert f"{n:,}" in text
    assert "--head" in text and "--student-encoder" in text


@pytest.mark.slow
def test_mobilevit_student_matches_timm_and_keeps_the_contract():
    from timm.models.mobilevit import MobileVitBlock

    torch.manual_seed(0)
    s = Student(channels=(32, 24, 16, 16, 8), encoder="mobilevit_xxs", head="flow").eval()
    assert s.input_multiple == 64 and s.meta["head"] == "flow" and s.meta["input_multiple"] == 64
    x = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        ours = s(x)
        for m in s.backbone.modules():  # timm's own forward, for comparison
            if isinstance(m, MobileVitBlock):
                m.forward = types.MethodType(MobileVitBlock.forward, m)
        theirs = s(x)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {"np": (2, 2, 128, 192), "hv": (2, 2, 128, 192),
                                                              "tp": (2, 8, 128, 192)}
    for k in ours:
        assert torch.equal(ours[k], theirs[k])
    with pytest.raises(ConfigError, match="multiple of 64"):
        s(torch.rand(1, 3, 96, 128))


def test_timm_student_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    s = Student(channels=(32, 24, 16, 16, 8), encoder="mobilevit_xxs", head="flow", tile_size=64).eval()
    save_checkpoint(tmp_path / "s", s, config={"seed": 0}, epoch=1, metrics={})
    back = load_model(tmp_path / "s")
    assert back.config.encoder == "mobilevit_xxs" and back.config.head == "flow" and back.meta["head"] == "flow"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back(x)["hv"], s(x)["hv"])


@pytest.mark.parametrize("args, match", [
    (["--tiny", "--preset", "paper"], "disagree"),
    (["--student-encoder", "mobilevit_xs", "--preset", "paper"], "own size"),
])
def test_distill_refuses_contradictory_size_options(tmp_path, args, match):
    from cellcurate.cli.distill import command

    res = CliRunner().invoke(command, ["--teacher", str(tmp_path), "--release", str(tmp_path), "--out",
                                       str(tmp_path / "s"), *args])
    assert res.exit_code == 2 and match in res.output
    assert not (tmp_path / "s").exists()
