"""plan.json: a Plan (fiddlerc.plan) written as deterministic JSON, read back, and verified: types,
ranges, and that the parts agree. `verify_plan` runs after every compile pass and on every read, so a
plan that was edited by hand or truncated is refused with what to do."""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, fields, replace

from fiddlerc.errors import PlanError
from fiddlerc.plan import (
    CPU,
    DENSE_QUANTIZED,
    DTYPE_NAMES,
    FORMAT_VERSION,
    GENERATED,
    HF,
    QUANTIZED,
    AttentionLayer,
    ExpertPlacement,
    Memory,
    ModelInfo,
    MoeLayer,
    Plan,
    Prediction,
    Target,
    is_gpu_name,
)

_PATH = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*"  # a module path: model.layers.3.mlp
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SHA256 = r"[0-9a-f]{64}"

# ---------------------------------------------------------------------------------------------
# JSON


def plan_to_dict(plan: Plan) -> dict:
    d = asdict(plan)
    out = {"format_version": d.pop("format_version"), "fiddlerc_version": d.pop("fiddlerc_version")}
    out.update(d)
    if plan.memory is not None:
        out["memory"]["free_bytes"] = plan.memory.free_bytes  # derived; written for readers, checked on read
    return out


def plan_to_json(plan: Plan) -> str:
    """Deterministic text: dataclass field order, ASCII only, no NaN/inf, trailing newline."""
    return json.dumps(plan_to_dict(plan), indent=1, sort_keys=False, ensure_ascii=True, allow_nan=False) + "\n"


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise PlanError(f"plan.json: {where} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    extra = set(data) - names - ({"free_bytes"} if cls is Memory else set())
    if extra:
        raise PlanError(
            f"plan.json: unknown key(s) {sorted(extra)} in {where}: the file was edited or is from another fiddlerc"
        )
    required = [
        f.name for f in fields(cls) if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if required:
        raise PlanError(f"plan.json: {where} lacks {required}: the file is truncated or was edited")
    kwargs = {k: v for k, v in data.items() if k in names}
    return cls(**kwargs)


def plan_from_dict(data: object) -> Plan:
    if not isinstance(data, dict):
        raise PlanError("plan.json must hold a JSON object: the file is corrupt; recompile")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PlanError(
            f"plan.json has format_version {version!r}, this fiddlerc reads {FORMAT_VERSION}: "
            "recompile the model with this fiddlerc"
        )
    d = dict(data)
    try:
        d["model"] = _build(ModelInfo, d.get("model"), "model")
        d["target"] = _build(Target, d.get("target"), "target")
        if isinstance(d["target"].schedule, list):
            d["target"] = replace(d["target"], schedule=tuple(d["target"].schedule))
        layers = d.get("moe_layers", [])
        experts = d.get("experts", [])
        if not isinstance(layers, list) or not isinstance(experts, list):
            raise PlanError("plan.json: moe_layers and experts must be lists")
        d["moe_layers"] = tuple(_build(MoeLayer, x, f"moe_layers[{i}]") for i, x in enumerate(layers))
        d["experts"] = tuple(_build(ExpertPlacement, x, f"experts[{i}]") for i, x in enumerate(experts))
        attention = d.get("attention", [])
        if not isinstance(attention, list):
            raise PlanError("plan.json: attention must be a list")
        d["attention"] = tuple(_build(AttentionLayer, x, f"attention[{i}]") for i, x in enumerate(attention))
        if d.get("prediction") is not None:
            d["prediction"] = _build(Prediction, d["prediction"], "prediction")
        mem = d.get("memory")
        if mem is not None:
            free = mem.get("free_bytes") if isinstance(mem, dict) else None
            d["memory"] = _build(Memory, mem, "memory")
            if free is not None and free != d["memory"].free_bytes:
                raise PlanError("plan.json: memory.free_bytes does not add up: the file was edited; recompile")
        plan = _build(Plan, d, "the plan")
    except TypeError as e:
        raise PlanError(f"plan.json is malformed ({e}): recompile") from None
    verify_plan(plan)
    return plan


def plan_from_json(text: str | bytes) -> Plan:
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PlanError(
            f"plan.json is not valid JSON ({type(e).__name__}): the file is truncated or corrupt; recompile"
        ) from None
    return plan_from_dict(data)


# ---------------------------------------------------------------------------------------------
# Verification: types, ranges, and that the parts agree.


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise PlanError(f"invalid plan: {msg}")


def _is_int(x: object, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _is_text(x: object) -> bool:
    return isinstance(x, str) and not any(ord(c) < 32 or ord(c) == 127 for c in x)


def _matches(x: object, pattern: str) -> bool:
    return isinstance(x, str) and re.fullmatch(pattern, x) is not None


def _is_number(x: object, hi: float = math.inf) -> bool:
    """A finite real in [0, hi] (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= hi


def _check_model_and_target(plan: Plan) -> None:
    m, t = plan.model, plan.target
    _check(plan.format_version == FORMAT_VERSION, f"format_version must be {FORMAT_VERSION}")
    _check(_is_text(plan.fiddlerc_version), "fiddlerc_version must be text")
    _check(_matches(m.architecture, _NAME), "model.architecture must be an identifier")
    _check(_matches(m.model_type, _NAME), "model.model_type must be an identifier")
    _check(m.dtype in DTYPE_NAMES, f"model.dtype must be one of {DTYPE_NAMES}")
    _check(_is_int(m.num_layers, 1), "model.num_layers must be a positive integer")
    _check(_is_int(m.hidden_size), "model.hidden_size must be a non-negative integer")
    _check(_matches(m.config_sha256, _SHA256), "model.config_sha256 must be a sha256")
    _check(is_gpu_name(t.device) or t.device == CPU, "target.device must be cuda:N, or cpu for a CPU-only plan")
    _check(_is_int(t.budget_bytes), "target.budget_bytes must be a non-negative integer")
    _check(
        not t.cpu_only or (t.budget_bytes == 0 and not t.more_gpus and not t.fast_experts),
        "a CPU-only target (device cpu) has no GPU budget, further GPUs or fast experts",
    )
    _check(
        t.budget_note is None or (_is_text(t.budget_note) and 0 < len(t.budget_note) <= 400),
        "target.budget_note must be null or short text",
    )
    _check(
        isinstance(t.more_gpus, dict)
        and all(is_gpu_name(d) and d != t.device and _is_int(b) for d, b in t.more_gpus.items()),
        "target.more_gpus must map further cuda:N devices to non-negative budgets",
    )
    _check(
        _is_int(t.context_tokens, 1) and _is_int(t.batch_size, 1),
        "target.context_tokens and batch_size must be positive",
    )
    _check(
        t.fast_experts is None or _is_int(t.fast_experts), "target.fast_experts must be null or a non-negative integer"
    )
    _check(
        (t.hardware is None) == (t.hardware_sha256 is None)
        and (t.hardware is None or _matches(t.hardware, r"[A-Za-z0-9_-]{1,60}"))
        and (t.hardware_sha256 is None or _matches(t.hardware_sha256, _SHA256)),
        "target.hardware must be a profile name with its sha256, or both null",
    )
    _check(
        (t.popularity is None) == (t.popularity_sha256 is None)
        and (t.popularity is None or (_is_text(t.popularity) and 0 < len(t.popularity) <= 200))
        and (t.popularity_sha256 is None or _matches(t.popularity_sha256, _SHA256)),
        "target.popularity must be a file name with its sha256, or both null",
    )
    _check(
        _is_int(t.micro_batches, 1) and t.micro_batches <= t.batch_size,
        "target.micro_batches must be between 1 and target.batch_size",
    )
    _check(
        isinstance(t.schedule, (tuple, list))
        and all(_matches(op, r"[cw][0-9]{1,3}\.[0-9]{1,4}") for op in t.schedule)
        and len(set(t.schedule)) == len(t.schedule)
        and (t.micro_batches > 1 or not t.schedule),
        "target.schedule must list distinct c<mb>.<stage> / w<mb>.<stage> steps, only with micro-batches",
    )
    for name, allowed in (("expert_dtype", QUANTIZED), ("dense_dtype", DENSE_QUANTIZED)):
        value = getattr(t, name)
        _check(value is None or value in allowed, f"target.{name} must be null or one of {allowed}")


def _check_prediction(plan: Plan) -> None:
    t = plan.target
    if plan.prediction is None:
        return
    pr = plan.prediction
    _check(t.hardware is not None, "a prediction needs target.hardware")
    _check(
        isinstance(pr.busy_ms, dict) and set(pr.busy_ms) <= {"gpu", "cpu", "h2d", "d2h"},
        "prediction.busy_ms must map gpu, cpu, h2d, d2h to milliseconds",
    )
    numbers = (
        pr.decode_ms_per_token,
        pr.dense_ms,
        pr.fast_expert_ms,
        pr.cpu_expert_ms,
        pr.simulated_ms_per_token,
        *pr.busy_ms.values(),
    )
    _check(
        all(_is_number(x) for x in numbers) and _is_int(pr.position),
        "prediction numbers must be finite and non-negative",
    )


def _check_moe_layers(plan: Plan) -> dict[int, MoeLayer]:
    m = plan.model
    layers: dict[int, MoeLayer] = {}
    for ml in plan.moe_layers:
        _check(_is_int(ml.layer) and ml.layer < m.num_layers, f"moe layer {ml.layer!r} out of range")
        _check(ml.layer not in layers, f"moe layer {ml.layer} listed twice")
        for name in ("block", "experts_module"):
            _check(_matches(getattr(ml, name), _PATH), f"moe layer {ml.layer}: {name} must be a module path")
        _check(
            ml.experts_module == ml.block or ml.experts_module.startswith(ml.block + "."),
            f"moe layer {ml.layer}: experts_module must be inside block",
        )
        _check(_matches(ml.layout, r"[a-z0-9-]{1,40}"), f"moe layer {ml.layer}: bad layout")
        _check(_is_text(ml.routing) and len(ml.routing) <= 200, f"moe layer {ml.layer}: routing must be short text")
        _check(
            _is_int(ml.num_experts, 1) and _is_int(ml.top_k, 1) and ml.top_k <= ml.num_experts,
            f"moe layer {ml.layer}: bad expert counts",
        )
        _check(
            _is_int(ml.bytes_per_expert, 1) and _is_int(ml.shared_expert_bytes),
            f"moe layer {ml.layer}: bad byte counts",
        )
        layers[ml.layer] = ml

    return layers


def _check_experts(plan: Plan, layers: dict[int, MoeLayer]) -> set[tuple[int, int]]:
    t = plan.target
    seen: set[tuple[int, int]] = set()
    for e in plan.experts:
        where = f"expert ({e.layer!r}, {e.expert!r})"
        _check(_is_int(e.layer) and e.layer in layers, f"{where}: layer has no MoE block")
        _check(_is_int(e.expert) and e.expert < layers[e.layer].num_experts, f"{where}: expert index out of range")
        _check((e.layer, e.expert) not in seen, f"{where} placed twice")
        seen.add((e.layer, e.expert))
        _check(e.device == CPU or e.device in t.gpus(), f"{where}: device must be 'cpu' or one of {list(t.gpus())}")
        _check(
            _is_int(e.bytes) and e.bytes == layers[e.layer].bytes_per_expert,
            f"{where}: bytes must equal the layer's bytes_per_expert",
        )
        _check(_is_number(e.expected_use, 1), f"{where}: expected_use must be a fraction in [0, 1]")
        _check(_is_text(e.reason) and len(e.reason) <= 500, f"{where}: reason must be text without control characters")
        _check(
            e.fetch_min_tokens is None or (_is_int(e.fetch_min_tokens, 1) and e.device == CPU),
            f"{where}: fetch_min_tokens must be null or a positive integer on a cpu-tier expert",
        )

    return seen


def _check_attention(plan: Plan) -> None:
    m = plan.model
    attn_layers: set[int] = set()
    for a in plan.attention:
        _check(_is_int(a.layer) and a.layer < m.num_layers, f"attention layer {a.layer!r} out of range")
        _check(a.layer not in attn_layers, f"attention layer {a.layer} listed twice")
        attn_layers.add(a.layer)
        _check(_matches(a.module, _PATH), f"attention layer {a.layer}: bad module path")
        _check(a.path in (GENERATED, HF), f"attention layer {a.layer}: path must be {GENERATED!r} or {HF!r}")
        _check(_is_text(a.reason) and len(a.reason) <= 300, f"attention layer {a.layer}: reason must be short text")


def _check_memory(plan: Plan) -> None:
    t = plan.target
    if plan.memory is None:
        return
    mem = plan.memory
    _check(
        all(_is_int(x) for x in (mem.budget_bytes, mem.dense_bytes, mem.kv_reserve_bytes)),
        "memory byte counts must be non-negative integers",
    )
    _check(
        mem.budget_bytes == t.budget_bytes and mem.gpu == t.device,
        "memory.budget_bytes and memory.gpu must be target.budget_bytes and target.device",
    )
    _check(
        all(x is None or _is_int(x) for x in (mem.host_bytes, mem.host_budget_bytes)),
        "memory.host_bytes and host_budget_bytes must be null or non-negative integers",
    )
    _check(isinstance(mem.host_budget_given, bool), "memory.host_budget_given must be true or false")
    _check(isinstance(mem.expert_bytes, dict), "memory.expert_bytes must be an object")
    for dev, b in mem.expert_bytes.items():
        _check(
            isinstance(dev, str) and (dev == CPU or dev in t.gpus()) and _is_int(b),
            f"memory.expert_bytes[{dev!r}] is invalid",
        )
    if plan.experts:
        sums: dict[str, int] = {}
        for e in plan.experts:
            sums[e.device] = sums.get(e.device, 0) + e.bytes
        _check(
            sums == {d: b for d, b in mem.expert_bytes.items() if b},
            "memory.expert_bytes does not match the experts' placement",
        )
        _check(mem.free_bytes >= 0, "experts on the GPU exceed the budget")
        for dev, budget in t.more_gpus.items():
            _check(mem.expert_bytes.get(dev, 0) <= budget, f"experts on {dev} exceed its budget")


def verify_plan(plan: Plan, *, complete: bool = False) -> None:
    """Raise PlanError unless every field is well-typed and the parts agree.

    `complete` also requires what the last pass produces (memory and a placement per expert).
    """
    _check_model_and_target(plan)
    _check_prediction(plan)
    layers = _check_moe_layers(plan)
    seen = _check_experts(plan, layers)
    _check_attention(plan)
    _check_memory(plan)
    if complete:
        _check(plan.memory is not None, "memory accounting is missing")
        _check(bool(plan.moe_layers), "the plan has no MoE layers")
        want = {(ml.layer, i) for ml in plan.moe_layers for i in range(ml.num_experts)}
        _check(seen == want, f"{len(want - seen)} expert(s) have no placement")
