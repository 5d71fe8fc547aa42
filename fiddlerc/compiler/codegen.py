"""Graph + plan -> module.py: a readable, deterministic, straight-line forward.

Each MoE layer's dispatch/expert/combine nodes fold back into one call of the MoE block, whose
experts child the loader replaces by a placed-experts module; the comment above the call says
which experts run where, and the per-layer table `PLACEMENT` lists every expert's device.

Only validated numbers, identifiers and fixed choices from the plan reach the text, and strings
only through `repr`: a plan cannot inject code (the verifier also rejects control characters).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import io
import math
import re
import tokenize
import types

import torch
import torch.fx

from fiddlerc import __version__
from fiddlerc.compiler.capture import META_KEY, moe_sites, source_model
from fiddlerc.errors import PlanError, UnsupportedModelError
from fiddlerc.plan import CPU, Plan, verify_plan
from fiddlerc.runtime import attention as gen_attention
from fiddlerc.runtime import norms
from fiddlerc.units import format_size

_HEADER_GLOBALS = {  # what fx-generated code may reference, and how module.py imports it
    "torch": "import torch",
    "device": "from torch import device",
    "inf": "from math import inf",
    "nan": "from math import nan",
    "NoneType": "NoneType = type(None)",
    "fx_pytree": "import torch.fx._pytree as fx_pytree",
    "pytree": "import torch.utils._pytree as pytree",
}
_FIXED_GLOBALS = {"inf": math.inf, "nan": math.nan, "NoneType": type(None), "torch": torch, "device": torch.device}


def _import_line(name: str, value: object) -> str:
    """An import that binds `name` to `value`, checked to resolve to the very same object."""
    if name in _HEADER_GLOBALS:
        return _HEADER_GLOBALS[name]
    mod, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not (
        isinstance(mod, str) and isinstance(qual, str) and re.fullmatch(r"[A-Za-z_][\w.]*", mod) and qual.isidentifier()
    ):
        raise UnsupportedModelError(f"generated code would need global {name!r} ({value!r}), which cannot be imported")
    if getattr(importlib.import_module(mod), qual, None) is not value:
        raise UnsupportedModelError(f"generated code needs {mod}.{qual}, which does not import as the same object")
    return f"from {mod} import {qual} as {name}" if qual != name else f"from {mod} import {qual}"


def _fold_moe_calls(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """A copy of the graph where each dispatch/experts/combine trio is one call of its MoE block."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for site in moe_sites(graph):
        call = site.combine  # keeps its name, moe_<layer>, and its place in the graph
        call.op, call.target = "call_module", f"m.{site.block_path}"
        call.args, call.kwargs = site.dispatch.args, site.dispatch.kwargs
        call.meta.pop(META_KEY, None)
        for node in site.experts:
            graph.erase_node(node)
        graph.erase_node(site.dispatch)
    graph.lint()
    return graph


def fiddlerc_attention(layer, hidden_states, position_embeddings, attention_mask, cache):
    """Stands for `self.attention(...)` while fx writes the code (module.py calls the generated method)."""
    raise AssertionError("placeholder: never called")


def _generated_attention(gm: torch.fx.GraphModule, graph: torch.fx.Graph, plan: Plan) -> tuple[list[str], object]:
    """Point the calls of the plan's generated attention layers at `self.attention`; the method's code,
    written with the numbers of those layers (which must agree), and the family's rotary function
    where the method calls it (None where it rotates in its own code: `rotary_is_standard`)."""
    generated = {f"m.{a.module}": a.layer for a in plan.attention if a.path == gen_attention.GENERATED}
    if not generated:
        return [], None
    shapes, rotary, seen = set(), set(), set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in generated:
            continue
        seen.add(node.target)
        module = gm.get_submodule(node.target)
        path, reason = gen_attention.attention_path(module, source_model(gm).config)
        if path != gen_attention.GENERATED:
            raise PlanError(f"the plan generates the attention of {node.target[2:]}, but {reason}: recompile")
        shapes.add(tuple(sorted(gen_attention.shape_of(module).items())))
        rotary.add(gen_attention.rotary_function(module))
        kw = node.kwargs
        cache = kw.get("cache", kw.get("past_key_values"))
        layer = generated[node.target]
        node.op, node.target = "call_function", fiddlerc_attention
        node.args = (layer, kw["hidden_states"], kw["position_embeddings"], kw["attention_mask"], cache)
        node.kwargs = {}
    if seen != set(generated):
        missing = sorted(set(generated) - seen)[0][2:]
        raise PlanError(f"the plan generates the attention of {missing}, which the model does not call: recompile")
    if all(a.path == gen_attention.GENERATED for a in plan.attention):  # no layer needs transformers' mask at decode
        for node in graph.nodes:
            if (
                node.op == "call_function"
                and node.target is gen_attention.create_causal_mask
                and {"attention_mask", "inputs_embeds"} <= set(node.kwargs)
            ):
                node.target = gen_attention.causal_mask
    if len(shapes) != 1 or len(rotary) != 1:
        raise PlanError("the generated attention layers differ in shape or rotary function: recompile")
    sh = dict(next(iter(shapes)))
    h, kvh, d, q, k, v = sh["heads"], sh["kv_heads"], sh["head_dim"], sh["q"], sh["k"], sh["v"]
    gqa = "" if h == kvh else ", enable_gqa=True"
    rotary_fn = next(iter(rotary))
    if gen_attention.rotary_is_standard(rotary_fn, source_model(gm), d):
        rotate = [
            f"        # rotary over queries and keys at once, with {rotary_fn.__module__.rsplit('.', 1)[-1]}.apply_rotary_pos_emb's",
            "        # arithmetic (checked equal to the bit when this was generated), in fewer calls",
            f"        qk = qkv[..., :{q + k}].view(b, t, {h + kvh}, {d})",
            f"        qk = qk * cos[:, :, None] + torch.cat((-qk[..., {d // 2}:], qk[..., :{d // 2}]), dim=-1) * sin[:, :, None]",
            f"        q = qk[:, :, :{h}].transpose(1, 2)",
            f"        k = qk[:, :, {h}:].transpose(1, 2)",
        ]
        rotary_fn = None
    else:
        rotate = [
            f"        q = qkv[..., :{q}].view(b, t, {h}, {d}).transpose(1, 2)",
            f"        k = qkv[..., {q}:{q + k}].view(b, t, {kvh}, {d}).transpose(1, 2)",
            "        q, k = apply_rotary_pos_emb(q, k, cos, sin)",
        ]
    return [
        "    def attention(self, layer, hidden_states, position_embeddings, attention_mask, cache):",
        f'        """Generated attention: {h} query heads over {kvh} KV heads of {d}, rotary embeddings, one fused',
        "        QKV projection, keys and values written in place into the static cache, SDPA over its filled",
        '        prefix. Weights: self.dense[layer] (fiddlerc.runtime.attention.AttentionWeights)."""',
        "        w = self.dense[layer]",
        "        b, t = hidden_states.shape[:2]",
        "        qkv = linear(hidden_states, w.qkv, w.qkv_bias)",
        "        cos, sin = position_embeddings",
        *rotate,
        f"        v = qkv[..., {q + k}:{q + k + v}].view(b, t, {kvh}, {d}).transpose(1, 2)",
        "        k, v = kv_append(cache, layer, k, v)",
        "        if attention_mask is None:",
        "            mask, causal = None, causal_without_mask(t, k.shape[2])",
        "        else:",
        "            mask, causal = attention_mask[..., : k.shape[2]], False",
        "        out = torch.nn.functional.scaled_dot_product_attention(",
        f"            q, k, v, attn_mask=mask, is_causal=causal, scale={sh['scaling']!r}{gqa}",
        "        )",
        f"        return linear(out.transpose(1, 2).reshape(b, t, {q}), w.o, w.o_bias), None",
    ], rotary_fn


def _check_no_constants(graph: torch.fx.Graph) -> None:
    """Every tensor the forward reads must be a model attribute (bound at load), never a value baked into
    the graph at trace time: module.py could not regenerate it from the plan."""
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(("m.", "_cfg")):
            raise UnsupportedModelError(
                f"the captured graph holds a constant {node.target!r} computed at trace time; "
                "this architecture is not supported yet"
            )


def _placement_table(plan: Plan, devices: tuple[str, ...]) -> list[str]:
    lines = ["PLACEMENT = {"]
    for ml in plan.moe_layers:
        idx = [devices.index(d) for d in plan.placement(ml.layer)]
        counts = ", ".join(f"{sum(1 for d in plan.placement(ml.layer) if d == dev)} on {dev}" for dev in devices)
        body = ", ".join(str(i) for i in idx) + ("," if len(idx) == 1 else "")
        row = f"    {ml.layer}: ({body}),  # {counts}"
        if len(row) <= 110:
            lines.append(row)
            continue
        lines.append(f"    # layer {ml.layer}: {counts}")
        lines.append(f"    {ml.layer}: (")
        for i in range(0, len(idx), 32):
            lines.append("        " + ", ".join(str(x) for x in idx[i : i + 32]) + ",")
        lines.append("    ),")
    lines.append("}")
    return lines


def _moe_comment(plan: Plan, layer: int) -> str:
    parts = []
    placement = plan.placement(layer)
    for dev in sorted(set(placement), key=lambda d: (d == CPU, d)):
        ids = [i for i, d in enumerate(placement) if d == dev]
        shown = ", ".join(str(i) for i in ids[:16]) + (", ..." if len(ids) > 16 else "")
        where = "CPU worker" if dev == CPU else dev
        parts.append(f"{len(ids)} on {where} [{shown}]")
    return f"# layer {layer} MoE: experts {'; '.join(parts)}"


_PARAMS = ("input_ids", "cache", "attention_mask", "position_ids")


def _assigned(line: str) -> set[str]:
    """Names a straight-line statement (with fx's `; a = b = None` clean-ups) assigns."""
    out = set()
    for node in ast.parse(line.strip()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                out |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return out


def _rename(line: str, names: set[str], suffix: str) -> str:
    """`line` with every variable in `names` suffixed: not attribute names, not keyword-argument names."""
    tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
    edits = []
    depth = 0
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if tok.type != tokenize.NAME or tok.string not in names:
            continue
        prev = tokens[i - 1].string if i else ""
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if prev == "." or (nxt == "=" and depth > 0):
            continue
        edits.append(tok.end[1])
    for col in reversed(edits):
        line = line[:col] + suffix + line[col:]
    return line


def _micro_forward(src: str, plan: Plan) -> list[str]:
    """`forward_micro`: the same code once per micro-batch, its stages interleaved as plan.target.schedule
    orders them; MoE calls leave their CPU experts running (`defer`) until the stage's `wait`."""
    t = plan.target
    lines = [line for line in src.splitlines() if line.startswith("    ") and line.strip()]
    ret = lines.pop()
    if not ret.startswith("    return "):
        raise UnsupportedModelError("the traced forward does not end in a return: cannot micro-batch it")
    stages: list[list[str]] = [[]]
    moe_vars: list[tuple[str, int]] = []
    names = set(_PARAMS)
    for line in lines:
        names |= _assigned(line)
        stages[-1].append(line)
        m = re.match(r"    (moe_(\d+)) = ", line)
        if m:
            moe_vars.append((m.group(1), int(m.group(2))))  # moe_<decoder layer>
            stages.append([])
    stages[-1].append("    fiddlerc_result = " + ret.strip()[len("return ") :])
    names.add("fiddlerc_result")
    if len(stages) != len(plan.moe_layers) + 1:
        raise PlanError("the graph's MoE calls and the plan's MoE layers disagree: recompile")
    mbs = t.micro_batches
    out = [
        "    def forward_micro(self, input_ids, caches, attention_mask, position_ids):",
        f'        """The forward in {mbs} micro-batches of rows, stages interleaved as the plan\'s schedule says: each',
        "        MoE call leaves its CPU experts running while other micro-batches' stages run (c = stage,",
        '        w = wait for its CPU experts)."""',
        f"        rows = input_ids.shape[0] // {mbs}",
    ]
    for i in range(mbs):
        a, b = f"{i} * rows", f"{i + 1} * rows"
        out += [
            f"        input_ids_mb{i} = input_ids[{a} : {b}]",
            f"        cache_mb{i} = caches[{i}]",
            f"        attention_mask_mb{i} = None if attention_mask is None else attention_mask[{a} : {b}]",
            f"        position_ids_mb{i} = position_ids if position_ids.shape[0] == 1 else position_ids[{a} : {b}]",
        ]
    out.append("        try:")
    for op in t.schedule:
        i, stage = (int(x) for x in op[1:].split("."))
        if not (0 <= i < mbs and 0 <= stage < len(stages)) or (op[0] == "w" and stage >= len(moe_vars)):
            raise PlanError(f"plan schedule step {op!r} does not fit the graph: recompile")
        if op[0] == "c":
            out.append(f"            # {op}: stage {stage} of micro-batch {i}")
            out.append(f"            self.defer({i})")
            out += ["        " + _rename(line, names, f"_mb{i}") for line in stages[stage]]
        else:
            var, layer = moe_vars[stage]
            out.append(f"            # {op}: the CPU experts of layer {layer}, micro-batch {i}")
            out.append(f"            {var}_mb{i} = self.wait({layer}, {i}, {var}_mb{i})")
    results = ", ".join(f"fiddlerc_result_mb{i}" for i in range(mbs))
    out += [
        f"            return torch.cat([{results}], dim=0)",
        "        finally:",
        "            self.defer(None)",
        "",
        "    def defer(self, micro_batch):",
        '        """From here on MoE calls leave their CPU experts running for `micro_batch` (None: wait as usual)."""',
        "        for placed in self.placed.values():",
        "            placed.deferred = micro_batch",
        "",
        "    def wait(self, layer, micro_batch, out):",
        '        """The block output of a deferred MoE call plus its CPU experts\' part."""',
        "        part = self.placed[layer].finish(micro_batch)",
        "        return out if part is None else out + part.view_as(out).to(out.dtype)",
    ]
    if sorted(t.schedule) != sorted(
        [f"c{i}.{s}" for i in range(mbs) for s in range(len(stages))]
        + [f"w{i}.{s}" for i in range(mbs) for s in range(len(moe_vars))]
    ):
        raise PlanError("plan schedule does not run every stage and wait once: recompile")
    return out


def generate_module(gm: torch.fx.GraphModule, plan: Plan) -> str:
    """The text of module.py. A pure function of the captured graph and the plan."""
    verify_plan(plan, complete=True)
    for site in moe_sites(gm.graph):
        for node in site.experts:
            fact = node.meta[META_KEY]
            if fact.get("device") != plan.placement(site.layer)[fact["expert"]]:
                raise PlanError(f"graph and plan disagree on {node.name}: annotate the graph from the plan first")
    graph = _fold_moe_calls(gm)
    norms.fuse(graph)
    _check_no_constants(graph)
    attention_method, rotary = _generated_attention(gm, graph, plan)
    code = graph.python_code(root_module="self")
    src = code.src
    short = {}  # fx names a global function after its module: fiddlerc's own keep their plain names
    for name, value in code.globals.items():
        if value is fiddlerc_attention:
            src = src.replace(f"= {name}(", "= self.attention(")
        elif getattr(value, "__module__", "").startswith("fiddlerc.runtime.") and name != value.__name__:
            if value.__name__ in code.globals:
                raise UnsupportedModelError(f"generated code would bind {value.__name__!r} twice")
            src = src.replace(f"= {name}(", f"= {value.__name__}(")
            short[name] = value.__name__
    code.globals.update({short[n]: code.globals.pop(n) for n in short})
    imports = []
    if attention_method:
        imports += [
            "from fiddlerc.runtime.attention import causal_without_mask, kv_append",
            "from fiddlerc.runtime.kernels import linear",
        ]
        if rotary is not None:
            imports.append(_import_line("apply_rotary_pos_emb", rotary))
    for name in sorted(code.globals):
        value = code.globals[name]
        if name == "__builtins__" or getattr(builtins, name, None) is value or value is fiddlerc_attention:
            continue
        if name in _FIXED_GLOBALS and _FIXED_GLOBALS[name] is not value:
            raise UnsupportedModelError(f"generated code uses an unexpected global {name}={value!r}")
        imports.append(_import_line(name, value))
    imports = sorted(set(imports), key=lambda s: (not s.startswith("import"), s))

    body = []
    for line in src.splitlines():
        if not line.strip() or line.startswith("torch.fx._symbolic_trace.wrap("):
            continue
        m = re.match(r"    moe_(\d+) = ", line)
        if m:
            body.append("        " + _moe_comment(plan, int(m.group(1))))
        m = re.match(r"    \w+ = self\.attention\((\d+),", line)
        if m:
            body.append(f"        # layer {m.group(1)} attention: generated (grouped-query, rotary, static KV cache)")
        body.append("    " + line)

    devices = plan.devices() or (CPU,)
    m, t = plan.model, plan.target
    lines = [
        f"# Generated by fiddlerc {__version__} from plan.json. Do not edit: fiddlerc.load() regenerates",
        "# this file from the plan and refuses to run it if the two differ. Recompile to change it.",
        f"# Model: {m.architecture} ({m.model_type}), {m.dtype}, {m.num_layers} layers, {len(plan.moe_layers)} MoE layers.",
        f"# Target: {t.device} with {format_size(t.budget_bytes)}; KV reserve for {t.context_tokens} tokens x {t.batch_size}.",
        *imports,
        "",
        f"FIDDLERC_VERSION = {__version__!r}",
        f"DEVICES = {devices!r}",
        "# PLACEMENT[layer][expert] is an index into DEVICES. Experts on 'cpu' run on the CPU worker,",
        "# the others on their GPU; only activations move between them.",
        *_placement_table(plan, devices),
        "",
        "",
        "class CompiledForward(torch.nn.Module):",
        '    """Forward of the whole model: (input_ids, cache, attention_mask, position_ids) -> logits.',
        "",
        "    `self.m` is the Hugging Face model with bound weights; each MoE block's experts child is a",
        "    placed-experts module (fiddlerc.runtime.experts) built from PLACEMENT.",
        '    """',
        "",
        "    def __init__(self, model, config):",
        "        super().__init__()",
        "        self.m = model",
        "        self._cfg = config",
        "        self.placed = {}  # layer -> placed experts, set by the loader",
        "        self.dense = {}  # layer -> weights of its generated attention, set by the loader",
        "",
        *body,
        "",
        *([*attention_method, ""] if attention_method else []),
        *(_micro_forward(src, plan) + [""] if t.micro_batches > 1 else []),
    ]
    text = "\n".join(lines)
    compile(text, "module.py", "exec")  # fail here, not at load, if anything is off
    return text


def load_module(text: str, filename: str) -> types.ModuleType:
    """Execute verified module.py text as a fresh module (never imported by name from disk)."""
    module = types.ModuleType("fiddlerc_compiled")
    module.__file__ = filename
    exec(compile(text, filename, "exec"), module.__dict__)
    return module
