from dataclasses import replace

import pytest
import torch

import fiddlerc
from fiddlerc.compiler.capture import capture
from fiddlerc.compiler.options import CompileOptions, parse_target
from fiddlerc.compiler.pipeline import initial_plan
from fiddlerc.errors import BudgetError
from fiddlerc.model.folder import load_config, open_model_folder
from fiddlerc.model.meta import build_meta_model
from fiddlerc.passes.account_memory import account_memory, kv_bytes_per_token
from fiddlerc.passes.find_experts import find_experts


def _captured(path):
    folder = open_model_folder(path)
    model = build_meta_model(load_config(folder), torch.float32)
    return folder, model, capture(model)


def test_dense_bytes_and_kv_reserve(model_dirs):
    folder, model, gm = _captured(model_dirs("mixtral"))
    options, target = CompileOptions(), parse_target(2**30, context=100, batch=3)
    plan = find_experts(gm, initial_plan(model, folder.config_json, torch.float32, target, options), options)
    plan = account_memory(gm, plan, options)
    total = sum(p.numel() * 4 for p in model.parameters())
    experts = sum(ml.num_experts * ml.bytes_per_expert for ml in plan.moe_layers)
    assert plan.memory.dense_bytes == total - experts
    cfg = model.config  # 2 layers x (K and V) x 2 kv heads x head_dim 8 x fp32, per token
    assert kv_bytes_per_token(cfg, torch.float32) == 2 * 2 * 2 * 8 * 4
    assert plan.memory.kv_reserve_bytes == 2 * 2 * 2 * 8 * 4 * 100 * 3


def test_mla_kv_bytes(model_dirs):
    _, model, _ = _captured(model_dirs("deepseek_v3"))
    cfg = model.config  # decompressed keys (nope 8 + rope 8) and values (8) for 4 heads, 3 layers
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 4 * (8 + 8 + 8) * 3 * 2


def test_budget_below_dense_weights_says_what_is_needed(model_dirs):
    folder, model, gm = _captured(model_dirs("qwen2_moe"))
    options, target = CompileOptions(), parse_target(1000, context=10)
    plan = find_experts(gm, initial_plan(model, folder.config_json, torch.float32, target, options), options)
    with pytest.raises(BudgetError, match=r"give at least .* \((\d+) bytes\)") as info:
        account_memory(gm, plan, options)
    import re

    need = int(re.search(r"\((\d+) bytes\)", str(info.value)).group(1))
    ok = plan.with_(target=replace(plan.target, budget_bytes=need))
    assert account_memory(gm, ok, options).memory.free_bytes == 0


def test_budget_too_small(model_copy, tmp_path):
    with pytest.raises(BudgetError, match="smaller than the dense weights .* give at least"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="10KiB")
    assert not (tmp_path / "out").exists()  # nothing half-written
