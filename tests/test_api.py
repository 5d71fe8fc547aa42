"""The Python API: plan() from a config alone, compile() and load(), and the expert shape "auto" calibrates for."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc import api
from fiddlerc.errors import OptionError
from fiddlerc.model.folder import open_model_folder
from fiddlerc.model.meta import meta_model_of
from fiddlerc.plan_file import plan_to_json


def test_plan_from_the_config_alone_is_the_plan_compile_writes(model_dirs, tmp_path):
    src = model_dirs("qwen2_moe")
    kwargs = dict(fast_experts=3, context=64, hardware="rtx4090-ddr5")
    planned = api.plan(src / "config.json", "1GiB", **kwargs)
    compiled = fiddlerc.compile(src, tmp_path / "out", "1GiB", **kwargs).plan
    assert plan_to_json(planned) == plan_to_json(compiled)
    assert (tmp_path / "out" / "plan.json").read_text() == plan_to_json(compiled)


def test_expert_shape_is_read_from_the_first_moe_block(model_dirs):
    model, dtype = meta_model_of(open_model_folder(model_dirs("mixtral")), None)
    assert api.expert_shape(model, dtype) == (32, 48)  # the tiny Mixtral: hidden 32, intermediate 48
    model, dtype = meta_model_of(open_model_folder(model_dirs("qwen2_moe")), None)
    assert api.expert_shape(model, dtype) == (32, 24)  # routed experts, not the shared one (40)


def test_auto_hardware_calibrates_for_the_models_own_expert_shape(model_dirs, monkeypatch):
    from fiddlerc.hardware import load_profile
    from fiddlerc.tools import calibrate

    asked = []

    def fake(hidden, inter, dtype, config=None, expert_format=None):
        asked.append((hidden, inter, dtype, config.model_type, expert_format))
        return load_profile("cpu-2core"), None

    monkeypatch.setattr(calibrate, "calibrate", fake)
    p = api.plan(model_dirs("mixtral"), "1GiB", context=64, hardware="auto")
    assert asked == [(32, 48, torch.float32, "mixtral", None)] and p.target.hardware == "cpu-2core"
    api.plan(model_dirs("mixtral"), "1GiB", context=64, hardware="auto", expert_dtype="int4")
    assert asked[-1] == (32, 48, torch.float32, "mixtral", "int4")  # the CPU tier's format is what is timed


def test_bad_options_are_refused_before_anything_is_written(model_dirs, tmp_path):
    for kwargs, message in [
        (dict(gpu_memory="lots"), "invalid size 'lots'"),
        (dict(gpu_memory="1GiB", context=0), "context"),
        (dict(gpu_memory="1GiB", hardware="no-such-machine"), "no-such-machine"),
    ]:
        with pytest.raises(OptionError, match=message):
            fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()
