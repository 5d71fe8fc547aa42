"""Lowering: the graph rewrites between the planned graph and the printed module.py.

Codegen prints the graph these rewrites leave (fiddlerc.compiler.pipeline runs them, in the order of
its `LOWERING` list, on a copy of the captured graph). Calls of the generated code's helpers are
`call_module` nodes on the forward itself (`self.attention(...)`, `self.rms_norm(...)`): the helpers
live in the runtime base class of module.py (fiddlerc.runtime.forward.GeneratedForward), so the
compiler names them without importing the runtime. A rewrite that wants a comment above a node's
line writes it under `node.meta["fiddlerc"]["comment"]`; codegen prints it.

`micro_batched` is the last transformation: a second graph that runs the lowered one once per
micro-batch, each copy cut into stages at its MoE calls, the stages interleaved as the plan's
schedule orders them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from transformers.masking_utils import create_causal_mask

from fiddlerc.compiler.attention import attention_path
from fiddlerc.compiler.capture import META_KEY, moe_sites, source_model
from fiddlerc.errors import PlanError, UnsupportedModelError
from fiddlerc.plan import CPU, GENERATED, Plan


def comment(node: torch.fx.Node, text: str) -> None:
    """Print `text` as a comment above `node`'s line of module.py."""
    node.meta.setdefault(META_KEY, {})["comment"] = text


def _moe_comment(plan: Plan, layer: int) -> str:
    parts = []
    placement = plan.placement(layer)
    for dev in sorted(set(placement), key=lambda d: (d == CPU, d)):
        ids = [i for i, d in enumerate(placement) if d == dev]
        shown = ", ".join(str(i) for i in ids[:16]) + (", ..." if len(ids) > 16 else "")
        where = "CPU worker" if dev == CPU else dev
        parts.append(f"{len(ids)} on {where} [{shown}]")
    return f"layer {layer} MoE: experts {'; '.join(parts)}"


def fold_moe_calls(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Each dispatch/experts/combine trio back into one call of its MoE block (whose experts child the
    loader replaces by the placed experts), with a comment saying which experts run where."""
    sites = moe_sites(graph)
    layers = {ml.layer: ml for ml in plan.moe_layers}
    if sorted(s.layer for s in sites) != sorted(layers):
        raise PlanError("plan.json's MoE layers do not match the model: recompile")
    for site in sites:
        if len(site.experts) != layers[site.layer].num_experts or site.block_path != layers[site.layer].block:
            raise PlanError(f"plan.json's MoE layer {site.layer} does not match the model's block: recompile")
        call = site.combine  # keeps its name, moe_<layer>, and its place in the graph
        call.op, call.target = "call_module", f"m.{site.block_path}"
        call.args, call.kwargs = site.dispatch.args, site.dispatch.kwargs
        call.meta.pop(META_KEY, None)
        comment(call, _moe_comment(plan, site.layer))
        for node in site.experts:
            graph.erase_node(node)
        graph.erase_node(site.dispatch)


def _is(node: object, op: str, target: object, nargs: int | None = None) -> bool:
    return (
        isinstance(node, torch.fx.Node)
        and node.op == op
        and node.target == target
        and (nargs is None or len(node.args) == nargs)
    )


def match(out: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, float, list[torch.fx.Node]] | None:
    """If `out` ends an inlined RMSNorm: (x, weight, eps, the pattern's nodes other than `out` and its
    inputs, which only the pattern uses). Else None."""
    if not _is(out, "call_function", operator.mul, 2):
        return None
    weight, cast = out.args
    if not _is(cast, "call_method", "to", 2) or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    scaled, dtype = cast.args
    if not _is(scaled, "call_function", operator.mul, 2):
        return None
    h, rsqrt = scaled.args
    if not _is(rsqrt, "call_function", torch.rsqrt, 1) or not _is(h, "call_method", "to", 2):
        return None
    x, fp32 = h.args
    add = rsqrt.args[0]
    if fp32 is not torch.float32 or not _is(add, "call_function", operator.add, 2):
        return None
    mean, eps = add.args
    if not isinstance(eps, float) or not _is(mean, "call_method", "mean", 2) or mean.kwargs != {"keepdim": True}:
        return None
    power = mean.args[0]
    if mean.args[1] != -1 or not _is(power, "call_method", "pow") or power.args != (h, 2) or power.kwargs:
        return None
    if not (_is(dtype, "call_function", getattr, 2) and dtype.args == (x, "dtype")):
        return None
    inner = [cast, scaled, rsqrt, add, mean, power, h, dtype]
    allowed = {out, *inner}
    if any(user not in allowed for node in inner for user in node.users):
        return None  # an intermediate value is used elsewhere: keep the ops
    return x, weight, eps, inner


def fuse_rms_norms(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Every inlined RMSNorm of the Llama kind as one `self.rms_norm(x, weight, eps)` call
    (fiddlerc.runtime.norms: bit-identical, one ATen call instead of eight)."""
    for node in list(graph.nodes):
        found = match(node)
        if found is None:
            continue
        x, weight, eps, inner = found
        node.op, node.target, node.args, node.kwargs = "call_module", "rms_norm", (x, weight, eps), {}
        for dead in inner:  # in the order given: each one's users are gone before it
            graph.erase_node(dead)


def call_generated_attention(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """The calls of the plan's generated attention layers as `self.attention(layer, hidden_states,
    position_embeddings, attention_mask, cache)` (the method codegen writes: fiddlerc.compiler.attention)."""
    generated = {f"m.{a.module}": a.layer for a in plan.attention if a.path == GENERATED}
    seen = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in generated:
            continue
        seen.add(node.target)
        path, reason = attention_path(gm.get_submodule(node.target), source_model(gm).config)
        if path != GENERATED:
            raise PlanError(f"the plan generates the attention of {node.target[2:]}, but {reason}: recompile")
        kw = node.kwargs
        cache = kw.get("cache", kw.get("past_key_values"))
        layer = generated[node.target]
        node.target = "attention"
        node.args = (layer, kw["hidden_states"], kw["position_embeddings"], kw["attention_mask"], cache)
        node.kwargs = {}
        comment(node, f"layer {layer} attention: generated (grouped-query, rotary, static KV cache)")
    if seen != set(generated):
        missing = sorted(set(generated) - seen)[0][2:]
        raise PlanError(f"the plan generates the attention of {missing}, which the model does not call: recompile")


def skip_decode_mask(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Where every attention layer is generated, no layer needs transformers' mask at a decode step
    without padding: the mask builder becomes `self.causal_mask` (fiddlerc.runtime.attention), which
    returns None there."""
    if not plan.attention or any(a.path != GENERATED for a in plan.attention):
        return
    for node in graph.nodes:
        if (
            node.op == "call_function"
            and node.target is create_causal_mask
            and {"attention_mask", "inputs_embeds"} <= set(node.kwargs)
        ):
            node.op, node.target = "call_module", "causal_mask"


def logits_rows(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """The slice of the final hidden states before lm_head (Hugging Face's `logits_to_keep`, traced as 0:
    every position) as `self.logits_rows(x)`, which keeps the last position only where the runtime
    generates (fiddlerc.runtime.forward.GeneratedForward)."""
    every = (slice(None), slice(0, None), slice(None))
    for node in graph.nodes:
        if node.op == "call_module" and node.target.endswith("lm_head") and node.args:
            arg = node.args[0]
            if _is(arg, "call_function", operator.getitem, 2) and arg.args[1] == every:
                arg.op, arg.target, arg.args = "call_module", "logits_rows", (arg.args[0],)


def unwrap_calls(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Forget which calls fx traced through `torch.fx.wrap`: module.py is executed, never traced again, so
    it needs no wrap registrations."""
    for node in graph.nodes:
        node.meta.pop("is_wrapped", None)


def check_no_constants(graph: torch.fx.Graph, gm: torch.fx.GraphModule, plan: Plan) -> None:
    """Every tensor the forward reads must be a model attribute (bound at load), never a value baked into
    the graph at trace time: module.py could not regenerate it from the plan."""
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(("m.", "_cfg")):
            raise UnsupportedModelError(
                f"the captured graph holds a constant {node.target!r} computed at trace time; "
                "this architecture is not supported yet"
            )


# ---------------------------------------------------------------------------------------------
# Micro-batching


INPUTS = ("input_ids", "cache", "attention_mask", "position_ids")  # the forward's placeholders, in order


def _stages(graph: torch.fx.Graph) -> tuple[list[list[torch.fx.Node]], list[torch.fx.Node]]:
    """The forward's computing nodes cut after each MoE call (stage s ends with MoE call s), and those calls."""
    stages: list[list[torch.fx.Node]] = [[]]
    moe_calls = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        stages[-1].append(node)
        if node.op == "call_module" and node.name.startswith("moe_"):
            moe_calls.append(node)
            stages.append([])
    return stages, moe_calls


def micro_batched(graph: torch.fx.Graph, plan: Plan) -> torch.fx.Graph:
    """`forward_micro(input_ids, caches, attention_mask, position_ids)`: the lowered forward copied once
    per micro-batch of rows, stages interleaved as `plan.target.schedule` orders them. `c<mb>.<stage>`
    copies a stage after `self.defer(mb)`, so that its MoE call leaves its CPU experts running;
    `w<mb>.<stage>` joins them (`self.wait`) before that micro-batch's next stage reads the result."""
    t = plan.target
    stages, moe_calls = _stages(graph)
    if len(moe_calls) != len(plan.moe_layers):
        raise PlanError("the graph's MoE calls and the plan's MoE layers disagree: recompile")
    expected = [f"c{i}.{s}" for i in range(t.micro_batches) for s in range(len(stages))]
    expected += [f"w{i}.{s}" for i in range(t.micro_batches) for s in range(len(moe_calls))]
    if sorted(t.schedule) != sorted(expected):
        raise PlanError("plan schedule does not run every stage and wait once: recompile")
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    (output,) = (n for n in graph.nodes if n.op == "output")
    if set(placeholders) != set(INPUTS) or not isinstance(output.args[0], torch.fx.Node):
        raise UnsupportedModelError("the traced forward does not return one tensor: cannot micro-batch it")

    out = torch.fx.Graph()
    inputs = {name: out.placeholder(name if name != "cache" else "caches") for name in INPUTS}
    envs: list[dict[torch.fx.Node, torch.fx.Node]] = []
    for i in range(t.micro_batches):
        env = {placeholders["cache"]: out.call_function(operator.getitem, (inputs["cache"], i))}
        env[placeholders["cache"]].name = f"cache_mb{i}"
        for name in ("input_ids", "attention_mask", "position_ids"):
            env[placeholders[name]] = out.call_module("micro_rows", (inputs[name], i, t.micro_batches))
            env[placeholders[name]].name = f"{name}_mb{i}"
        envs.append(env)
    done: set[str] = set()
    for op in t.schedule:
        i, stage = (int(x) for x in op[1:].split("."))
        needs = f"c{i}.{stage}" if op[0] == "w" else f"w{i}.{stage - 1}" if stage else None
        if needs is not None and needs not in done:
            raise PlanError(f"plan schedule runs {op} before {needs}: recompile")
        done.add(op)
        env = envs[i]
        if op[0] == "c":
            comment(out.call_module("defer", (i,)), f"{op}: stage {stage} of micro-batch {i}")
            for node in stages[stage]:
                env[node] = out.node_copy(node, lambda n, env=env: env[n])
                env[node].name = f"{node.name}_mb{i}"
        else:
            call = moe_calls[stage]
            layer = plan.moe_layers[stage].layer
            joined = out.call_module("wait", (layer, i, env[call]))
            joined.name = f"{call.name}_mb{i}_joined"
            comment(joined, f"{op}: the CPU experts of layer {layer}, micro-batch {i}")
            env[call] = joined
    results = [env[output.args[0]] for env in envs]
    out.output(out.call_function(torch.cat, (results,), {"dim": 0}))
    out.lint()
    return out
