"""Lowering: the rewrites codegen prints the result of, and micro-batching as a graph copy."""

from dataclasses import replace

import pytest

import fiddlerc
from fiddlerc.compiler.capture import capture
from fiddlerc.compiler.lowering import micro_batched
from fiddlerc.compiler.options import CompileOptions, parse_target
from fiddlerc.compiler.pipeline import initial_plan, lower, run_passes
from fiddlerc.errors import PlanError
from fiddlerc.model.folder import open_model_folder
from fiddlerc.model.meta import meta_model_of


def _planned(path, **target):
    folder = open_model_folder(path)
    model, dtype = meta_model_of(folder)
    gm = capture(model)
    options = CompileOptions(micro_batches=target.pop("micro_batches", None))
    return gm, run_passes(
        gm, initial_plan(model, folder.config_json, dtype, parse_target("1GiB", context=64, **target), options), options
    )


def test_each_moe_layer_folds_into_one_commented_block_call(model_dirs):
    gm, plan = _planned(model_dirs("mixtral"))
    graph, micro = lower(gm, plan)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.name.startswith("moe_")]
    assert [n.target for n in calls] == [f"m.{ml.block}" for ml in plan.moe_layers] and micro is None
    assert all(
        n.meta["fiddlerc"]["comment"].startswith(f"layer {ml.layer} MoE: experts")
        for n, ml in zip(calls, plan.moe_layers, strict=True)
    )
    assert not [n for n in graph.nodes if n.op == "call_function" and "fiddlerc_expert" in str(n.target)]
    assert {n.target for n in graph.nodes if n.op == "call_module" and not n.target.startswith("m.")} == {
        "attention", "rms_norm", "causal_mask", "logits_rows"}  # fmt: skip


def test_micro_batched_graph_copies_each_stage_once_per_micro_batch_in_schedule_order(model_dirs):
    gm, plan = _planned(model_dirs("mixtral"), batch=4, micro_batches=2)
    graph, micro = lower(gm, plan)
    moe = [n for n in micro.nodes if n.op == "call_module" and n.target.startswith("m.") and ".mlp" in n.target]
    assert len(moe) == 2 * len(plan.moe_layers)
    waits = [n for n in micro.nodes if n.target == "wait"]
    order = [n.args[:2] for n in waits]  # (layer, micro-batch) in the order the schedule joins them
    want = [
        (plan.moe_layers[int(op[1:].split(".")[1])].layer, int(op[1])) for op in plan.target.schedule if op[0] == "w"
    ]
    assert order == want
    bad = plan.with_(target=replace(plan.target, schedule=tuple(reversed(plan.target.schedule))))
    with pytest.raises(PlanError, match="before"):
        micro_batched(graph, bad)


def test_a_plan_for_other_moe_layers_is_refused(model_dirs):
    gm, plan = _planned(model_dirs("mixtral"))
    with pytest.raises(PlanError, match="MoE layers do not match"):
        lower(gm, plan.with_(moe_layers=plan.moe_layers[:1], experts=tuple(e for e in plan.experts if e.layer == 0)))


def test_codegen_fuses_every_rms_norm_it_recognises_and_leaves_others(model_dirs, tmp_path):
    layers = fiddlerc.compile(
        model_dirs("mixtral"), tmp_path / "m", gpu_memory="1GiB", context=64
    ).plan.model.num_layers
    text = (tmp_path / "m" / "module.py").read_text()
    assert text.count("= self.rms_norm(") == 2 * layers + 1 and "rsqrt" not in text  # two per layer and the final one
    fiddlerc.compile(model_dirs("qwen3_next"), tmp_path / "q", gpu_memory="1GiB", context=64)
    text = (tmp_path / "q" / "module.py").read_text()
    assert "= self.rms_norm(" not in text and "rsqrt" in text  # Gemma-style `1 + weight` norms are not this pattern


def test_generation_computes_lm_head_for_the_last_position_only(model_dirs, tmp_path, monkeypatch):
    """Hugging Face generate asks for the last position's logits only (logits_to_keep=1); so does ours, while
    a plain call still returns every position's."""
    import torch

    import fiddlerc

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    assert "= self.logits_rows(" in (tmp_path / "out" / "module.py").read_text()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        rows = []
        real = model.hf_model.lm_head.forward
        monkeypatch.setattr(model.hf_model.lm_head, "forward", lambda x: rows.append(x.shape[1]) or real(x))
        full = model(ids)
        out = model.generate(ids, max_new_tokens=3, ignore_eos=True)
    assert full.shape[1] == 9 and rows == [9, 1, 1, 1]
    assert torch.equal(out[:, 9], full[:, -1].argmax(-1))  # the first new token: the full forward's last row
