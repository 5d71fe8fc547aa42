"""Capture a Hugging Face causal LM as a torch.fx graph, then expand each experts call.

The recipe: trace a small wrapper with an explicit signature; keep token mixers
(attention, linear attention: the modules that read the cache), rotary embeddings and MoE blocks
(any block `fiddlerc.model.families` recognises) opaque; wrap the modeling files' mask helpers; keep the
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
from fiddlerc.model.families import find_layout

META_KEY = "fiddlerc"  # the one namespaced node.meta key fiddlerc writes

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


def cache_class(model: nn.Module) -> type:
    """The KV-cache class the model's forward asks for (its annotation), DynamicCache if it names none.

    Most families take any `Cache`; some (MiniMax) insist on their own subclass.
    """
    import typing

    from transformers import Cache, DynamicCache

    base = getattr(model, "base_model", model)
    kw = cache_keyword(base)
    try:
        hint = typing.get_type_hints(base.forward).get(kw)
    except Exception:  # unresolvable annotations: fall back to the default cache
        hint = None
    for cls in typing.get_args(hint) or (hint,):
        if isinstance(cls, type) and issubclass(cls, Cache) and cls not in (Cache, DynamicCache):
            return cls
    return DynamicCache


def new_cache(cls: type, config) -> object:
    try:
        return cls(config=config)
    except TypeError:
        return cls()


class _CacheProxy(torch.fx.Proxy):
    """The cache placeholder while tracing: passes the family's `isinstance(cache, TheirCache)` checks."""

    cache_class: type = object

    @property
    def __class__(self):  # noqa: D105 - isinstance() consults __class__ after type()
        return self.cache_class


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
    hidden_size: int | None = None
    cache_proxy: type[torch.fx.Proxy] | None = None

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        if node.op == "placeholder" and node.target == "cache" and self.cache_proxy is not None:
            return self.cache_proxy(node, self)
        return super().proxy(node)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            find_layout(m, self.hidden_size) is not None
            or is_token_mixer(m)
            or type(m).__name__.endswith("RotaryEmbedding")  # some compute their tables from the config in forward
            or super().is_leaf_module(m, qualname)
        )

    def create_arg(self, a):
        from transformers import PretrainedConfig

        if isinstance(a, PretrainedConfig):  # keep the object: an inline rebuild loses private fields
            if getattr(self.root, "_cfg", None) is not a:
                if hasattr(self.root, "_cfg"):
                    raise UnsupportedModelError("the model passes two different config objects during forward")
                self.root._cfg = a
            return self.create_node("get_attr", "_cfg", (), {})
        return super().create_arg(a)


def _wrap_mask_helpers(model: nn.Module) -> None:
    """torch.fx.wrap the `create_*mask*` helpers of every modeling file the model's code comes from,
    so they run eagerly at run time (their Python branches depend on the real cache and mask).

    wrap() must be called from a module-level frame of the module whose globals hold the function
    (Tracer(autowrap_functions=...) misses them: HF's forward decorators hide those globals). A model
    class may inherit its forward from another family's file, so every class in the MRO counts.
    """
    files = {
        c.__module__
        for m in model.modules()
        for c in type(m).__mro__
        if not c.__module__.startswith(("torch", "builtins"))
    }
    for name in sorted(files):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        for fn in sorted(n for n in vars(mod) if n.startswith("create_") and "mask" in n):
            if callable(getattr(mod, fn)):
                exec(f"import torch.fx\ntorch.fx.wrap({fn!r})", mod.__dict__)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """fx-capture `model` (parameters may be on the meta device) with experts and attention as leaves."""
    _wrap_mask_helpers(model)
    root = CaptureRoot(model)
    tracer = _LeafTracer()
    tracer.hidden_size = getattr(model.config, "hidden_size", None)
    tracer.cache_proxy = type("CacheProxy", (_CacheProxy,), {"cache_class": cache_class(model)})
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
    """The decoder layer a module belongs to: the first numeric component of its path (layers.3, blocks.3)."""
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    raise UnsupportedModelError(f"cannot tell which decoder layer {module_path!r} belongs to")


def expand_experts(gm: torch.fx.GraphModule) -> None:
    """Rewrite each MoE block call_module node into dispatch -> E expert nodes -> combine (in place)."""
    graph = gm.graph
    model = source_model(gm)
    hidden = getattr(model.config, "hidden_size", None)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("m.")]
    for node in calls:
        block_path = node.target[2:]  # path inside the HF model
        block = model.get_submodule(block_path)
        layout = find_layout(block, hidden)
        if layout is None:
            continue
        experts_path = f"{block_path}.{layout.experts}" if layout.experts else block_path
        layer = layer_index(block_path)
        facts = {"layer": layer, "module": block_path, "experts_module": experts_path, "layout": layout.name}
        with graph.inserting_before(node):
            route = graph.call_function(fiddlerc_dispatch, node.args, node.kwargs)
            route.name = f"route_{layer}"
            route.meta[META_KEY] = {"kind": "dispatch", **facts}
            outs = []
            for e in range(layout.num_experts(block)):
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
