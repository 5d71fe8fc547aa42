"""Graph + plan -> module.py: a readable, deterministic, straight-line forward.

The lowered graph (fiddlerc.compiler.pipeline.lower: each MoE layer folded back into one call of
its block, whose experts child the loader replaces by the placed experts; helper calls on `self`)
is printed by torch.fx, once, as `CompiledForward.forward`; where the plan micro-batches, the
micro-batched copy of it (fiddlerc.compiler.lowering.micro_batched) is printed the same way as
`forward_micro`. Comments a rewrite attached to a node are printed above its line through fx's own
code-transformer hook (`Graph.on_generate_code`). The generated attention method comes from
fiddlerc.compiler.attention. Imports are written for exactly the globals the compiled code reads.

Only validated numbers, identifiers and fixed choices from the plan reach the text, and strings
only through `repr`: a plan cannot inject code (the verifier also rejects control characters).
"""

from __future__ import annotations

import builtins
import dis
import importlib
import math
import re
import types

import torch
import torch.fx

from fiddlerc.compiler.attention import attention_method
from fiddlerc.compiler.capture import META_KEY
from fiddlerc.compiler.pipeline import lower
from fiddlerc.errors import UnsupportedModelError
from fiddlerc.plan import Plan
from fiddlerc.plan_file import verify_plan
from fiddlerc.units import format_size
from fiddlerc.version import __version__

_FX_BUILTINS = {  # globals torch.fx binds in every generated function, and how module.py imports them
    "torch": "import torch",
    "device": "from torch import device",
    "inf": "from math import inf",
    "nan": "from math import nan",
    "NoneType": "NoneType = type(None)",
    "fx_pytree": "import torch.fx._pytree as fx_pytree",
    "pytree": "import torch.utils._pytree as pytree",
}
_FX_BUILTIN_VALUES = {"inf": math.inf, "nan": math.nan, "NoneType": type(None), "torch": torch, "device": torch.device}
_ATTENTION_IMPORTS = {  # what the generated attention method calls
    "causal_without_mask": "from fiddlerc.runtime.attention import causal_without_mask",
    "kv_append": "from fiddlerc.runtime.attention import kv_append",
    "one_token_each": "from fiddlerc.runtime.attention import one_token_each",
    "linear": "from fiddlerc.runtime.kernels import linear",
}


def _import_line(name: str, value: object) -> str:
    """An import that binds `name` to `value`, checked to resolve to the very same object."""
    if name in _FX_BUILTINS:
        if name in _FX_BUILTIN_VALUES and _FX_BUILTIN_VALUES[name] is not value:
            raise UnsupportedModelError(f"generated code uses an unexpected global {name}={value!r}")
        return _FX_BUILTINS[name]
    mod, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not (
        isinstance(mod, str) and isinstance(qual, str) and re.fullmatch(r"[A-Za-z_][\w.]*", mod) and qual.isidentifier()
    ):
        raise UnsupportedModelError(f"generated code would need global {name!r} ({value!r}), which cannot be imported")
    if getattr(importlib.import_module(mod), qual, None) is not value:
        raise UnsupportedModelError(f"generated code needs {mod}.{qual}, which does not import as the same object")
    return f"from {mod} import {qual} as {name}" if qual != name else f"from {mod} import {qual}"


class _MethodCodeGen(torch.fx.graph.CodeGen):
    """fx's code generation, as a method of the given name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.method = name

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **kwargs) -> str:
        return f"def {self.method}(self, {', '.join(v for v in free_vars if v != 'self')}){maybe_return_annotation}:"


def _with_comments(nodes: list[torch.fx.Node]):
    """An fx code transformer that puts each node's comment (`node.meta["fiddlerc"]["comment"]`) on the
    line above its statement. fx marks where each node's statement begins with a counter line."""

    def make(previous):
        def transform(body: list[str]) -> list[str]:
            body = previous(body) if previous is not None else body
            out = []
            for line in body:
                counter = re.fullmatch(r"# COUNTER: (\d+)\n", line)
                note = counter and nodes[int(counter.group(1))].meta.get(META_KEY, {}).get("comment")
                if note:
                    out.append(f"# {note}\n")
                out.append(line)
            return out

        return transform

    return make


def _print(graph: torch.fx.Graph, method: str) -> torch.fx.graph.PythonCode:
    """fx's text of `graph` as method `method` of the forward class, with the nodes' comments."""
    graph.set_codegen(_MethodCodeGen(method))
    with graph.on_generate_code(_with_comments(list(graph.nodes))):
        return graph.python_code(root_module="self")


def _globals_read(code: types.CodeType) -> set[str]:
    """The global names the compiled code, and the code nested in it, reads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_read(const)
    return names


def generate_module(gm: torch.fx.GraphModule, plan: Plan) -> str:
    """The text of module.py. A pure function of the captured graph and the plan."""
    verify_plan(plan, complete=True)
    forward, micro = lower(gm, plan)
    printed = [_print(forward, "forward")] + ([_print(micro, "forward_micro")] if micro is not None else [])
    attention_lines, rotary = attention_method(gm, plan)

    body = []
    for code in printed:
        body += [("    " + line).rstrip() for line in code.src.strip("\n").splitlines()] + [""]
    body += [*attention_lines, ""] if attention_lines else []
    candidates = {name: line for name, line in _ATTENTION_IMPORTS.items() if attention_lines}
    if rotary is not None:
        candidates["apply_rotary_pos_emb"] = _import_line("apply_rotary_pos_emb", rotary)
    for code in printed:
        for name, value in code.globals.items():
            if name != "__builtins__" and getattr(builtins, name, None) is not value:
                candidates[name] = _import_line(name, value)
    read = _globals_read(compile("\n".join(["class CompiledForward:", *body]), "module.py", "exec"))
    imports = {line for name, line in candidates.items() if name in read}
    imports.add("from fiddlerc.runtime.forward import GeneratedForward")
    imports = sorted(imports, key=lambda s: (not s.startswith("import"), s))

    m, t = plan.model, plan.target
    lines = [
        f"# Generated by fiddlerc {__version__} from plan.json. Do not edit: fiddlerc.load() regenerates",
        "# this file from the plan and refuses to run it if the two differ. Recompile to change it.",
        f"# Model: {m.architecture} ({m.model_type}), {m.dtype}, {m.num_layers} layers, {len(plan.moe_layers)} MoE layers.",
        f"# Target: {'CPU only' if t.cpu_only else t.device + ' with ' + format_size(t.budget_bytes)}; KV reserve for {t.context_tokens} tokens x {t.batch_size}.",
        *imports,
        "",
        "",
        "class CompiledForward(GeneratedForward):",
        '    """Forward of the whole model: (input_ids, cache, attention_mask, position_ids) -> logits.',
        "",
        "    `self.m` is the Hugging Face model with bound weights; each MoE block's experts child is a",
        "    placed-experts module (fiddlerc.runtime.experts) placed as plan.json says. The helpers called on",
        "    `self` are fiddlerc.runtime.forward.GeneratedForward's.",
        '    """',
        "",
        *body,
    ]
    text = "\n".join(lines).rstrip("\n") + "\n"
    compile(text, "module.py", "exec")  # fail here, not at load, if anything is off
    return text


def load_module(text: str, filename: str) -> types.ModuleType:
    """Execute verified module.py text as a fresh module (never imported by name from disk)."""
    module = types.ModuleType("fiddlerc_compiled")
    module.__file__ = filename
    exec(compile(text, filename, "exec"), module.__dict__)
    return module
