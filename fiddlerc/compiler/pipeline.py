"""The compiler's two literal lists: the planning passes, run in order with the plan verifier after
each, and the lowering rewrites codegen prints the result of."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace

import torch
import torch.fx

from fiddlerc.compiler.lowering import (
    call_generated_attention,
    check_no_constants,
    fold_moe_calls,
    fuse_rms_norms,
    logits_rows,
    micro_batched,
    skip_decode_mask,
    unwrap_calls,
)
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import PlanError
from fiddlerc.passes.account_memory import account_memory
from fiddlerc.passes.find_experts import find_experts
from fiddlerc.passes.place_experts import place_experts
from fiddlerc.passes.plan_execution import plan_execution
from fiddlerc.passes.predict_speed import predict_speed
from fiddlerc.passes.schedule_overlap import schedule_overlap
from fiddlerc.passes.select_attention import select_attention
from fiddlerc.plan import ModelInfo, Plan, Target
from fiddlerc.plan_file import verify_plan
from fiddlerc.units import dtype_name
from fiddlerc.version import __version__

log = logging.getLogger(__name__)

# Planning: each pass reads the graph and the plan so far and returns the plan with its part filled in.
PASSES = [
    find_experts,  # MoE blocks, experts, shared experts, bytes per expert
    account_memory,  # dense weights and KV reserve on the target GPU
    place_experts,  # every expert: fast tier or cpu, with a reason
    plan_execution,  # cpu-tier experts: from how many tokens a weight fetch beats the CPU
    schedule_overlap,  # micro-batches and the order of their stages (1: no micro-batching)
    select_attention,  # each layer's attention: fiddlerc's generated code or Hugging Face's module
    predict_speed,  # price the placement on the target's hardware profile, if one is given
]

# Lowering: graph rewrites, in order, on a copy of the captured graph, between the plan and the text of
# module.py (fiddlerc.compiler.lowering); then `micro_batched` where the plan micro-batches.
LOWERING = [
    fold_moe_calls,  # each MoE layer's dispatch/experts/combine back into one call of its block
    fuse_rms_norms,  # each inlined Llama-kind RMSNorm as one self.rms_norm call (bit-identical)
    call_generated_attention,  # the plan's generated attention layers as self.attention(layer, ...)
    skip_decode_mask,  # no mask at decode without padding, where every attention layer is generated
    logits_rows,  # lm_head reads the last position only where the runtime generates
    unwrap_calls,  # no torch.fx.wrap registrations: module.py is executed, never traced
    check_no_constants,  # every tensor read is a model attribute bound at load, none baked in at trace time
]


def config_sha256(config_json: dict) -> str:
    return hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()


def initial_plan(
    model: torch.nn.Module, config_json: dict, dtype: torch.dtype, target: Target, options: CompileOptions
) -> Plan:
    """The plan before the passes: the model's facts and the target (with the popularity it is placed by)."""
    cfg = model.config
    pop = options.popularity
    return Plan(
        fiddlerc_version=__version__,
        model=ModelInfo(
            architecture=type(model).__name__,
            model_type=cfg.model_type,
            dtype=dtype_name(dtype),
            num_layers=cfg.num_hidden_layers,
            config_sha256=config_sha256(config_json),
            hidden_size=cfg.hidden_size,
        ),
        target=replace(
            target,
            popularity=pop.name if pop is not None else None,
            popularity_sha256=pop.sha256 if pop is not None else None,
        ),
    )


def run_passes(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    ran: list[str] = []
    for p in PASSES:
        t0 = time.perf_counter()
        plan = p(gm, plan, options)
        try:
            verify_plan(plan)
        except PlanError as e:
            raise PlanError(f"pass {p.__name__} (after {ran or 'none'}) produced an invalid plan: {e}") from e
        ran.append(p.__name__)
        log.debug("pass %s: %.1f ms", p.__name__, 1e3 * (time.perf_counter() - t0))
    verify_plan(plan, complete=True)
    return plan


def lower(gm: torch.fx.GraphModule, plan: Plan) -> tuple[torch.fx.Graph, torch.fx.Graph | None]:
    """The graph codegen prints: a copy of the captured one, rewritten by LOWERING in order; and its
    micro-batched copy where the plan micro-batches (None otherwise)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for rewrite in LOWERING:
        rewrite(graph, gm, plan)
    graph.lint()
    micro = micro_batched(graph, plan) if plan.target.micro_batches > 1 else None
    return graph, micro
