"""Measured expert popularity in the formats of engines that serve a model over many GPUs.

SGLang (`--init-expert-location FILE`, with `--enable-eplb` and expert parallelism) reads a JSON object
whose `logical_count` is a [layers, experts] array of routed-token counts, from which its EPLB algorithm
places the experts (python/sglang/srt/eplb/expert_location.py, `init_by_eplb`). Its model classes number
those layers as the model's decoder layers, all of them (`get_model_config_for_expert_location`:
`num_layers=config.num_hidden_layers`, experts `num_experts` or `n_routed_experts`), so a dense layer
(DeepSeek's first ones) keeps a row of zeros. KTransformers' frequency-based placement reads the same
array of counts.
"""

from __future__ import annotations

from fiddlerc.errors import OptionError
from fiddlerc.plan import Plan
from fiddlerc.popularity import Popularity

FORMATS = ("sglang",)


def sglang_logical_count(plan: Plan, pop: Popularity) -> dict:
    """{"logical_count": [decoder layer][expert]} of `pop`'s routed-token counts, for `plan`'s model."""
    pop.check_against(plan.moe_layers)
    experts = {ml.num_experts for ml in plan.moe_layers}
    if len(experts) != 1:
        raise OptionError(f"the model's MoE layers have {sorted(experts)} experts: SGLang's array has one width")
    width = experts.pop()
    rows = [[0] * width for _ in range(plan.model.num_layers)]
    for ml, counts in zip(plan.moe_layers, pop.counts, strict=True):
        rows[ml.layer] = list(counts)
    return {"logical_count": rows}
