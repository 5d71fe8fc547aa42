"""predict_speed: price the finished placement on the target's hardware profile.

Reads: the whole plan and `options.hardware` (a profile, or None to skip).
Writes: `plan.target.hardware`/`hardware_sha256` and `plan.prediction` (decode, batch 1, at half
the reserved context): the closed form, and a short simulated decode there whose per-resource busy
times the report shows. No graph annotation.
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx

from fiddlerc.compiler.cost import predict_decode
from fiddlerc.compiler.options import CompileOptions
from fiddlerc.compiler.simulate import Workload, simulate
from fiddlerc.plan import Plan, Prediction

SIM_STEPS = 32  # decode steps simulated for the plan's time split


def predict_speed(gm: torch.fx.GraphModule, plan: Plan, options: CompileOptions) -> Plan:
    profile = options.hardware
    if profile is None:
        return plan
    position = plan.target.context_tokens // 2
    pred = predict_decode(plan, profile, position)
    run = simulate(plan, profile, Workload(max(1, position - SIM_STEPS // 2), SIM_STEPS + 1))
    prefill = simulate(plan, profile, Workload(max(1, position - SIM_STEPS // 2), 1))
    per_token = {k: round((v - prefill.busy_ms[k]) / SIM_STEPS, 4) for k, v in run.busy_ms.items()}
    return plan.with_(
        target=replace(plan.target, hardware=profile.name, hardware_sha256=profile.sha256()),
        prediction=Prediction(
            decode_ms_per_token=round(pred.ms_per_token, 4),
            dense_ms=round(pred.dense_ms, 4),
            fast_expert_ms=round(pred.fast_expert_ms, 4),
            cpu_expert_ms=round(pred.cpu_expert_ms, 4),
            position=position,
            simulated_ms_per_token=round(run.decode_ms / SIM_STEPS, 4),
            busy_ms=per_token,
        ),
    )
