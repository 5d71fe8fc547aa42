"""The pipeline: the pass list run in order under the plan verifier, and the lowering list."""

from pathlib import Path

import pytest
import torch

from fiddlerc.compiler import pipeline
from fiddlerc.compiler.capture import capture
from fiddlerc.compiler.options import CompileOptions, parse_target
from fiddlerc.compiler.pipeline import LOWERING, PASSES, config_sha256, initial_plan, lower, run_passes
from fiddlerc.errors import PlanError
from fiddlerc.model.folder import load_config, open_model_folder
from fiddlerc.model.meta import build_meta_model
from fiddlerc.popularity import load_popularity

DATA = Path(__file__).parents[1] / "data" / "mixtral-8x7b-popularity"


def _start(path, **target):
    folder = open_model_folder(path)
    model = build_meta_model(load_config(folder), torch.float32)
    options = CompileOptions()
    return (
        capture(model),
        initial_plan(model, folder.config_json, torch.float32, parse_target(2**30, **target), options),
        options,
    )


def test_every_pass_fills_its_part_of_the_plan_in_order(model_dirs):
    gm, plan, options = _start(model_dirs("mixtral"), context=64)
    assert not plan.moe_layers and not plan.experts and plan.memory is None
    filled = []
    for p in PASSES:
        plan = p(gm, plan, options)
        filled.append(
            (p.__name__, bool(plan.moe_layers), bool(plan.experts), plan.memory is not None, bool(plan.attention))
        )
    assert filled == [
        ("find_experts", True, False, False, False),
        ("account_memory", True, False, True, False),
        ("place_experts", True, True, True, False),
        ("plan_execution", True, True, True, False),
        ("schedule_overlap", True, True, True, False),
        ("select_attention", True, True, True, True),
        ("predict_speed", True, True, True, True),
    ]


def test_a_pass_that_breaks_the_plan_is_named_with_the_passes_before_it(model_dirs, monkeypatch):
    gm, plan, options = _start(model_dirs("mixtral"), context=64)

    def drop_experts(gm, plan, options):
        return plan.with_(experts=plan.experts[1:])

    monkeypatch.setattr(pipeline, "PASSES", [*PASSES[:3], drop_experts, *PASSES[3:]])
    with pytest.raises(
        PlanError, match=r"pass drop_experts \(after \['find_experts', 'account_memory', 'place_experts'\]\)"
    ):
        run_passes(gm, plan, options)


def test_the_initial_plan_records_the_model_and_the_popularity_it_is_placed_by(model_dirs):
    folder = open_model_folder(model_dirs("mixtral"))
    model = build_meta_model(load_config(folder), torch.float32)
    pop = load_popularity(DATA / "mixtral_8x7b_original-high_school_us_history.json")  # recorded, not checked, here
    plan = initial_plan(model, folder.config_json, torch.float32, parse_target(2**30), CompileOptions(popularity=pop))
    assert (plan.model.architecture, plan.model.model_type, plan.model.dtype) == (
        "MixtralForCausalLM",
        "mixtral",
        "float32",
    )
    assert (plan.target.popularity, plan.target.popularity_sha256) == (pop.name, pop.sha256)
    reordered = dict(reversed(folder.config_json.items()))
    assert config_sha256(reordered) == plan.model.config_sha256  # a key order is not a new model


def test_lowering_copies_the_graph_and_micro_batches_only_where_the_plan_does(model_dirs):
    gm, plan, options = _start(model_dirs("mixtral"), context=64)
    plan = run_passes(gm, plan, options)
    before = [n.format_node() for n in gm.graph.nodes]
    graph, micro = lower(gm, plan)
    assert [n.format_node() for n in gm.graph.nodes] == before  # the captured graph is left as it was
    assert micro is None and plan.target.micro_batches == 1
    assert [r.__name__ for r in LOWERING][0] == "fold_moe_calls" and LOWERING[-1].__name__ == "check_no_constants"
