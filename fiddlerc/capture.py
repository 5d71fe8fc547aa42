"""Capture a Hugging Face causal LM as a torch.fx graph, then expand each experts call.

The recipe (see DESIGN.md): trace a small wrapper with an explicit signature, keep attention
modules and MoE blocks opaque (leaves), wrap the modeling file's mask helpers, and keep the
config object as a `get_attr` node. (Tracing through MoE blocks fails on some families, e.g.
DeepSeek's `view(*shape)`; as leaves they run Hugging Face's own code, so the router, shared
experts and each family's gating arithmetic stay exactly as Hugging Face computes them.)

After tracing, `expand_experts` rewrites every MoE block call into

    route = fiddlerc_dispatch(hidden)                    # the block: router, shared experts
    e_i   = fiddlerc_expert(route, i)                    # one node per routed expert
    out   = fiddlerc_combine(route, e_0, ..., e_{E-1})   # weighted sum, in HF's order

so placement passes can annotate each expert node (under `node.meta["fiddlerc"]`); codegen folds
the trio back into one call of the block, whose experts child is then a placed-experts module.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from fiddlerc.errors import UnsupportedModelError

META_KEY = "fiddlerc"  # the one namespaced node.meta key fiddlerc writes


def is_experts_module(module: nn.Module) -> bool:
    """The transformers 5 experts interface: fused 3-D weights, called as experts(x, top_k_index, top_k_weights)."""
    params = module._parameters  # not getattr: during tracing fx turns parameter reads into proxies
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return (
        isinstance(down, nn.Parameter)
        and isinstance(up, nn.Parameter)
        and down.ndim == 3
        and up.ndim == 3
        and hasattr(module, "num_experts")
    )


def experts_child(module: nn.Module) -> str | None:
    """The name of `module`'s experts child if it is an MoE block, else None."""
    for name, child in module.named_children():
        if is_experts_module(child):
            return name
    return None


_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "cache_params", "layer_past")


@functools.cache
def _takes_cache(cls: type) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in params for name in _CACHE_ARGS)


def is_token_mixer(module: nn.Module) -> bool:
    """Attention, linear attention, state-space mixers: the innermost modules that read the KV cache.

    They stay opaque in the graph (their cache updates and kernels are Hugging Face's own).
    """
    if not _takes_cache(type(module)) or hasattr(module, "config") and hasattr(module, "base_model_prefix"):
        return False
    return not any(_takes_cache(type(m)) for m in module.modules() if m is not module)


def cache_keyword(model: nn.Module) -> str:
    """The name transformers gives the KV cache argument (`cache` in newer 5.x, `past_key_values` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class CaptureRoot(nn.Module):
    """Gives fx an explicit signature; HF forwards take **kwargs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model
        self._cache_kw = cache_keyword(model)

    def forward(self, input_ids, cache, attention_mask, position_ids):
        kwargs = {self._cache_kw: cache}
        out = self.m(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **kwargs,
        )
        return out.logits


class _LeafTracer(torch.fx.Tracer):
    proxy_buffer_attributes = True  # buffers (rotary tables) become get_attr nodes, never baked-in constants
    tensor_attributes: dict[int, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            experts_child(m) is not None
            or is_experts_module(m)
            or is_token_mixer(m)
            or super().is_leaf_module(m, qualname)
        )

    def create_arg(self, a):
        from transformers import PretrainedConfig

        if isinstance(a, torch.Tensor) and id(a) in self.tensor_attributes:
            return self.create_node("get_attr", self.tensor_attributes[id(a)], (), {})
        if isinstance(a, PretrainedConfig):  # keep the object: an inline rebuild loses private fields
            if getattr(self.root, "_cfg", None) is not a:
                if hasattr(self.root, "_cfg"):
                    raise UnsupportedModelError("the model passes two different config objects during forward")
                self.root._cfg = a
            return self.create_node("get_attr", "_cfg", (), {})
        return super().create_arg(a)


def _wrap_mask_helpers(model: nn.Module) -> None:
    """torch.fx.wrap the modeling file's `create_*mask*` helpers so they run eagerly at runtime.

    wrap() must be called from a module-level frame of the module whose globals hold the function
    (Tracer(autowrap_functions=...) misses them: HF's forward decorators hide those globals).
    """
    mod = sys.modules[type(model).__module__]
    for name in sorted(n for n in vars(mod) if n.startswith("create_") and "mask" in n):
        if callable(getattr(mod, name)):
            exec(f"import torch.fx\ntorch.fx.wrap({name!r})", mod.__dict__)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """fx-capture `model` (parameters may be on the meta device) with experts and attention as leaves."""
    _wrap_mask_helpers(model)
    root = CaptureRoot(model)
    tracer = _LeafTracer()
    tracer.tensor_attributes = {  # plain tensor attributes (e.g. PhiMoE's rotary table), by path
        id(v): f"m.{path}.{name}" if path else f"m.{name}"
        for path, mod in model.named_modules()
        for name, v in vars(mod).items()
        if isinstance(v, torch.Tensor) and name not in mod._parameters and name not in mod._buffers
    }
    try:
        graph = tracer.trace(root)
    except Exception as e:  # fx raises many types; all mean the same to the user
        raise UnsupportedModelError(
            f"{type(model).__name__} could not be captured with torch.fx ({type(e).__name__}: {e}); "
            "this architecture is not supported yet"
        ) from e
    gm = torch.fx.GraphModule(root, graph, class_name="FiddlercCapture")
    gm.meta[META_KEY] = {"model": model}
    return gm


def source_model(gm: torch.fx.GraphModule) -> nn.Module:
    """The Hugging Face model a graph was captured from (module paths in the graph start with `m.`)."""
    return gm.meta[META_KEY]["model"]


# ---------------------------------------------------------------------------------------------
# Expanding experts calls into dispatch / expert / combine nodes.


@torch.fx.wrap
def fiddlerc_dispatch(*block_args, **block_kwargs):
    """Marker op: one MoE block's routing and shared experts (the block itself implements it)."""
    raise RuntimeError("fiddlerc_dispatch is a graph marker; run the generated module instead")


@torch.fx.wrap
def fiddlerc_expert(route, expert: int):
    """Marker op: one expert of a layer; its node carries the placement annotation."""
    raise RuntimeError("fiddlerc_expert is a graph marker; run the generated module instead")


@torch.fx.wrap
def fiddlerc_combine(route, *expert_outputs):
    """Marker op: sum the experts' weighted outputs in expert order, as Hugging Face does."""
    raise RuntimeError("fiddlerc_combine is a graph marker; run the generated module instead")


@dataclass(frozen=True)
class MoeSite:
    """One experts call in the captured graph."""

    layer: int  # decoder layer index
    block_path: str  # qualified name of the MoE block, e.g. model.layers.3.mlp
    experts_path: str  # qualified name of its experts module, e.g. model.layers.3.mlp.experts
    dispatch: torch.fx.Node
    experts: tuple[torch.fx.Node, ...]
    combine: torch.fx.Node


def layer_index(module_path: str) -> int:
    parts = module_path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise UnsupportedModelError(f"cannot tell which decoder layer {module_path!r} belongs to")


def expand_experts(gm: torch.fx.GraphModule) -> None:
    """Rewrite each MoE block call_module node into dispatch -> E expert nodes -> combine (in place)."""
    graph = gm.graph
    model = source_model(gm)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("m.")]
    for node in calls:
        block_path = node.target[2:]  # path inside the HF model
        block = model.get_submodule(block_path)
        child = experts_child(block)
        if child is None:
            continue
        experts_path = f"{block_path}.{child}"
        module = block.get_submodule(child)
        layer = layer_index(block_path)
        facts = {"layer": layer, "module": block_path, "experts_module": experts_path}
        with graph.inserting_before(node):
            route = graph.call_function(fiddlerc_dispatch, node.args, node.kwargs)
            route.name = f"route_{layer}"
            route.meta[META_KEY] = {"kind": "dispatch", **facts}
            outs = []
            for e in range(int(module.num_experts)):
                en = graph.call_function(fiddlerc_expert, (route, e))
                en.name = f"expert_{layer}_{e}"
                en.meta[META_KEY] = {"kind": "expert", "layer": layer, "expert": e}
                outs.append(en)
            combine = graph.call_function(fiddlerc_combine, (route, *outs))
            combine.name = f"moe_{layer}"
            combine.meta[META_KEY] = {"kind": "combine", **facts}
        node.replace_all_uses_with(combine)
        graph.erase_node(node)
    graph.lint()


def moe_sites(graph: torch.fx.Graph) -> list[MoeSite]:
    """The expanded MoE layers of a graph, in graph order."""
    sites = []
    for n in graph.nodes:
        fact = n.meta.get(META_KEY)
        if fact and fact["kind"] == "combine":
            route = n.args[0]
            sites.append(MoeSite(fact["layer"], fact["module"], fact["experts_module"], route, tuple(n.args[1:]), n))
    return sites


def capture(model: nn.Module) -> torch.fx.GraphModule:
    """Trace and expand: the graph every pass and codegen work on."""
    gm = trace(model)
    expand_experts(gm)
    return gm


def experts_layout_problem(module: nn.Module) -> str | None:
    """Why the placed-experts runtime cannot run this experts module yet, or None if it can.

    Supported: every layout of transformers' experts interface that its flags describe
    (gate/up concatenated or interleaved, transposed, biases, no gate, any `_apply_gate`), except
    a post-expert norm.
    """
    if getattr(module, "has_post_expert_norm", False):
        return "has_post_expert_norm=True"
    names = set(module._parameters)
    wanted = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    if wanted not in names:
        return f"no {wanted} parameter"
    if (
        getattr(module, "has_gate", True)
        and getattr(module, "act_fn", None) is None
        and getattr(type(module), "_apply_gate", None) is None
    ):
        return "no activation function"
    return None
