"""The literal list of passes, run in order, with the plan verifier and a graph check after each."""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch
import torch.fx

from fiddlerc import __version__
from fiddlerc.compiler.capture import META_KEY, moe_sites
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import PlanError
from fiddlerc.passes.account_memory import account_memory
from fiddlerc.passes.find_experts import find_experts
from fiddlerc.passes.place_experts import place_experts
from fiddlerc.passes.plan_execution import plan_execution
from fiddlerc.passes.predict_speed import predict_speed
from fiddlerc.passes.schedule_overlap import schedule_overlap
from fiddlerc.passes.select_attention import select_attention
from fiddlerc.plan import ModelInfo, Plan, Target, verify_plan
from fiddlerc.units import dtype_name

log = logging.getLogger(__name__)

PASSES = [
    find_experts,  # MoE blocks, experts, shared experts, bytes per expert
    account_memory,  # dense weights and KV reserve on the target GPU
    place_experts,  # every expert: fast tier or cpu, with a reason
    plan_execution,  # cpu-tier experts: from how many tokens a weight fetch beats the CPU
    schedule_overlap,  # micro-batches and the order of their stages (1: no micro-batching)
    select_attention,  # each layer's attention: fiddlerc's generated code or Hugging Face's module
    predict_speed,  # price the placement on the target's hardware profile, if one is given
]


def config_sha256(config_json: dict) -> str:
    return hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()


def initial_plan(model: torch.nn.Module, config_json: dict, dtype: torch.dtype, options: CompileOptions) -> Plan:
    cfg = model.config
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
        target=Target(
            device=options.target_device,
            budget_bytes=options.gpu_budget_bytes,
            more_gpus=dict(options.more_gpus),
            context_tokens=options.context_tokens,
            batch_size=options.batch_size,
            fast_experts=options.fast_experts,
            popularity=options.popularity.name if options.popularity else None,
            popularity_sha256=options.popularity.sha256 if options.popularity else None,
        ),
    )


def check_graph_agrees(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """The expert nodes' annotations and the plan say the same thing."""
    placed = {(e.layer, e.expert): e.device for e in plan.experts}
    for site in moe_sites(gm.graph):
        for node in site.experts:
            fact = node.meta[META_KEY]
            key = (fact["layer"], fact["expert"])
            if fact.get("device") != placed.get(key):
                raise PlanError(
                    f"graph node {node.name} says device {fact.get('device')!r}, the plan says {placed.get(key)!r}"
                )


def run_passes(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    ran: list[str] = []
    for p in PASSES:
        t0 = time.perf_counter()
        plan = p(gm, plan, options)
        try:
            verify_plan(plan)
            check_graph_agrees(gm, plan)
        except PlanError as e:
            raise PlanError(f"pass {p.__name__} (after {ran or 'none'}) produced an invalid plan: {e}") from e
        ran.append(p.__name__)
        log.debug("pass %s: %.1f ms", p.__name__, 1e3 * (time.perf_counter() - t0))
    verify_plan(plan, complete=True)
    return plan


def annotate_from_plan(gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Write a stored plan's placement onto a freshly captured graph (what load() does before codegen)."""
    placed = {(e.layer, e.expert): e for e in plan.experts}
    sites = moe_sites(gm.graph)
    if sorted(s.layer for s in sites) != sorted(ml.layer for ml in plan.moe_layers):
        raise PlanError("plan.json's MoE layers do not match the model: recompile")
    for site in sites:
        for node in site.experts:
            fact = node.meta[META_KEY]
            e = placed.get((fact["layer"], fact["expert"]))
            if e is None:
                raise PlanError(
                    f"plan.json has no placement for layer {fact['layer']} expert {fact['expert']}: recompile"
                )
            fact["device"], fact["bytes"] = e.device, e.bytes
    check_graph_agrees(gm, plan)
