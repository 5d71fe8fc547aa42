"""Fused RMSNorm: Hugging Face's RMSNorm arithmetic in one normalisation call instead of eight ops.

The captured graph inlines each RMSNorm of the Llama kind (Mixtral, Qwen-MoE, DeepSeek, ...) as
`h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps); weight * h.to(x.dtype)`.
At decode every op costs about as much as its dispatch (several microseconds here), and a model
has two such norms per layer, so codegen (`fiddlerc.compiler.codegen`) rewrites each match into one call of
`rms_norm` below. `torch.rms_norm` computes the same fp32 expression in one ATen call, and the
weight is applied after the cast back as Hugging Face does, so results are bit-identical (checked
by tests/test_dense_path.py over sizes and dtypes). Norms of other forms (Gemma's `1 + weight`,
norms without a weight) do not match and stay as they were traced.
"""

from __future__ import annotations

import operator

import torch
import torch.fx


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x in fp32, normalised by its root mean square).to(x.dtype)`, as Hugging Face computes it."""
    return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps).to(x.dtype)


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


def fuse(graph: torch.fx.Graph) -> int:
    """Rewrite every inlined RMSNorm of `graph` into one `rms_norm` call; returns how many."""
    count = 0
    for node in list(graph.nodes):
        found = match(node)
        if found is None:
            continue
        x, weight, eps, inner = found
        node.target, node.args, node.kwargs = rms_norm, (x, weight, eps), {}
        for dead in inner:  # in the order given: each one's users are gone before it
            graph.erase_node(dead)
        count += 1
    return count
