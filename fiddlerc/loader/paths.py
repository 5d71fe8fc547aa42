"""What each decoder layer of a loaded model runs at one token of one sequence (a decode step), as the
loader bound it on this machine.

The plan fixes each layer's attention path (fiddlerc's generated code or Hugging Face's module, chosen at
compile time: fiddlerc.compiler.attention) and each expert's tier. Which kernels run under them is
decided when the model loads, because it depends on the machine: on a CPU load with fiddlerc's C
kernels (`kernels="auto"` or `"native"`) a decode step's attention, router and experts can each be one C
call (fiddlerc.runtime.attention.attend_one, fiddlerc.runtime.routing.OneTokenMoe, the experts'
GroupedExperts), and elsewhere they run torch ops. `decode_paths` reads the bound model back; the
`fiddlerc -v run` log and `CompiledModel.decode_paths()` show it. A call of several tokens (a prompt, a
batch) runs torch ops throughout, except prompts over small fine-grained experts (token by token
through the grouped call: fiddlerc.runtime.experts)."""

from __future__ import annotations

from fiddlerc.compiler.report import layer_ranges
from fiddlerc.plan import GENERATED, Plan
from fiddlerc.runtime.norms import native_rms_norm
from fiddlerc.runtime.routing import OneTokenMoe

PARTS = ("attention", "norms", "router", "experts")  # in the order a layer runs them


def decode_paths(plan: Plan, model, forward, placed, module_text: str) -> dict[int, dict[str, str]]:
    """Layer -> {"attention", "norms", "router", "experts"} -> what runs there at one token. `model` is the
    bound Hugging Face model, `forward` the generated module's CompiledForward, `placed` layer ->
    PlacedExperts, `module_text` the generated module.py (whose RMSNorms lowering fused, or not)."""
    out: dict[int, dict[str, str]] = {}
    if "self.rms_norm(" not in module_text:
        norms = "Hugging Face's modules"
    else:
        norms = "one C call each" if forward.rms_norm is native_rms_norm else "one torch.rms_norm each"
    for a in plan.attention:
        if a.path != GENERATED:
            what = "Hugging Face's module"
        elif forward.attend_one is not None:
            what = "one C call"
        else:
            what = "generated torch ops"
        out.setdefault(a.layer, {})["attention"] = what
        out[a.layer]["norms"] = norms
    for ml in plan.moe_layers:
        block = model.get_submodule(ml.block)
        p = placed[ml.layer]
        row = out.setdefault(ml.layer, {})
        row["router"] = "one C call" if isinstance(block, OneTokenMoe) else "the block's torch ops"
        if p.one_call_ready():
            row["experts"] = "one grouped C call"
        elif p.spread:
            row["experts"] = "one by one, spread over the main thread and the worker"
        elif p.grouped is not None:
            row["experts"] = "the cpu tier's in one grouped C call on the worker, the fast tier's one by one"
        else:
            row["experts"] = "one by one"
    return dict(sorted(out.items()))


def paths_text(paths: dict[int, dict[str, str]]) -> str:
    """The layers grouped by what they run, one line a group."""
    groups: dict[tuple, list[int]] = {}
    for layer, row in paths.items():
        groups.setdefault(tuple((part, row[part]) for part in PARTS if part in row), []).append(layer)
    lines = []
    for row, layers in groups.items():
        parts = ", ".join(f"{part}: {what}" for part, what in row)
        lines.append(f"decode step, layer{'s' if len(layers) > 1 else ''} {layer_ranges(layers)}: {parts}")
    return "\n".join(lines)
