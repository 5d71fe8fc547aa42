"""account_memory: bytes of the dense weights and of the KV-cache reserve on the target GPU.

Reads: the graph's modules (every parameter outside the routed experts), `plan.moe_layers`,
the config (attention shapes), `plan.target` (budget; context length and batch for the KV reserve).
Writes: `plan.memory` (budget, dense bytes, KV reserve). Raises BudgetError when the budget
cannot hold the dense weights plus the KV reserve, saying how much is needed; a CPU-only plan
(`target.cpu_only`) keeps them in host memory, which place_experts accounts.
"""

from __future__ import annotations

import torch
import torch.fx

from fiddlerc.compiler.capture import source_model
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.errors import BudgetError
from fiddlerc.plan import Memory, Plan
from fiddlerc.units import format_size, parse_dtype

from .find_experts import param_bytes


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token adds across all layers, as transformers' cache stores them."""
    heads = config.num_attention_heads
    if getattr(config, "qk_nope_head_dim", None) and getattr(config, "v_head_dim", None):
        # Multi-head latent attention (DeepSeek): transformers caches decompressed keys and values.
        per_layer = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_layer = 2 * kv_heads * head_dim
    return per_layer * config.num_hidden_layers * dtype.itemsize


def account_memory(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    dtype = parse_dtype(plan.model.dtype)
    model = source_model(gm)
    experts = sum(ml.num_experts * ml.bytes_per_expert for ml in plan.moe_layers)
    dense = param_bytes(model.parameters(), dtype) - experts
    kv = kv_bytes_per_token(model.config, dtype) * plan.target.context_tokens * plan.target.batch_size
    budget = plan.target.budget_bytes
    if not plan.target.cpu_only and dense + kv > budget:  # a CPU-only plan keeps them in host memory
        given = f"--gpu-memory {format_size(budget)}"
        if plan.target.budget_note is not None:
            given = f"the GPU budget {format_size(budget)} ({plan.target.budget_note})"
        raise BudgetError(
            f"{given} is smaller than the dense weights ({format_size(dense)}) plus the "
            f"KV-cache reserve ({format_size(kv)} for {plan.target.context_tokens} tokens x {plan.target.batch_size} "
            f"sequence(s)): give at least {format_size(dense + kv)} ({dense + kv} bytes) as --gpu-memory, lower --context/--batch, "
            "or compile a CPU-only plan with --gpu-memory 0"
        )
    return plan.with_(
        memory=Memory(budget_bytes=budget, dense_bytes=dense, kv_reserve_bytes=kv, gpu=plan.target.device)
    )
