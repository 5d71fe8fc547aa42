"""Why each expert sits where it sits: a text table for terminals and JSON for tools."""

from __future__ import annotations

import json

from fiddlerc.options import format_size
from fiddlerc.plan import CPU, Plan, plan_to_dict


def report_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=1) + "\n"


def report_text(plan: Plan) -> str:
    m, t, mem = plan.model, plan.target, plan.memory
    assert mem is not None
    gpu_experts = sum(b for d, b in mem.expert_bytes.items() if d != CPU)
    lines = [
        f"fiddlerc plan for {m.architecture} ({m.model_type}, {m.dtype}, {m.num_layers} layers)",
        f"target {t.device}: budget {format_size(t.budget_bytes)}",
        f"  dense weights     {format_size(mem.dense_bytes):>12}  (embeddings, attention, norms, routers, shared experts, lm_head)",
        f"  KV-cache reserve  {format_size(mem.kv_reserve_bytes):>12}  ({t.context_tokens} tokens x {t.batch_size} sequence(s))",
        f"  experts on {t.device:<7}{format_size(gpu_experts):>12}",
        f"  free              {format_size(mem.free_bytes):>12}",
        f"experts on cpu      {format_size(mem.expert_bytes.get(CPU, 0)):>12}",
        *_host_lines(mem),
        "",
        f"{'layer':>5}  {'experts':>7}  {'top-k':>5}  {'per expert':>12}  {'shared':>12}  {'on ' + t.device:>10}  {'on cpu':>6}  {'expected hit rate':>17}  routing",
    ]
    total_use = fast_use = 0.0
    for ml in plan.moe_layers:
        mine = [e for e in plan.experts if e.layer == ml.layer]
        fast = [e for e in mine if e.device != CPU]
        use = sum(e.expected_use for e in mine)
        hit = sum(e.expected_use for e in fast) / use if use else 0.0
        total_use += use
        fast_use += sum(e.expected_use for e in fast)
        lines.append(
            f"{ml.layer:>5}  {ml.num_experts:>7}  {ml.top_k:>5}  {format_size(ml.bytes_per_expert):>12}  "
            f"{format_size(ml.shared_expert_bytes) if ml.shared_expert_bytes else '-':>12}  "
            f"{len(fast):>10}  {len(mine) - len(fast):>6}  {hit:>16.1%}   {ml.routing}"
        )
    n_fast = sum(1 for e in plan.experts if e.device != CPU)
    lines += [
        "",
        f"{n_fast} of {len(plan.experts)} experts on {t.device}; expected share of routed tokens served there: "
        f"{(fast_use / total_use if total_use else 0):.1%}",
        "per-expert decisions and reasons: fiddlerc report OUT --format json",
    ]
    if plan.prediction is not None:
        pr = plan.prediction
        lines.append(
            f"predicted decode on {t.hardware} (batch 1, position {pr.position}): {1000 / pr.decode_ms_per_token:.2f} tokens/s "
            f"({pr.decode_ms_per_token:.1f} ms/token: dense {pr.dense_ms:.1f} ms, experts busy "
            f"{pr.fast_expert_ms:.1f} ms fast tier / {pr.cpu_expert_ms:.1f} ms CPU)"
        )
    return "\n".join(lines) + "\n"


def _host_lines(mem) -> list[str]:
    if mem.host_bytes is None or mem.host_budget_bytes is None:
        return []
    line = (
        f"host memory         {format_size(mem.host_bytes):>12}  of {format_size(mem.host_budget_bytes)} (--cpu-memory)"
    )
    if mem.paged_fraction > 0:
        return [line, f"  PAGES FROM DISK: {mem.paged_fraction:.0%} of the host-resident weight reads miss memory "
                f"(predictions include it); raise --cpu-memory or --gpu-memory"]  # fmt: skip
    return [line]
