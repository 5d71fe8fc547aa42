"""The Hugging Face model of a config, built on the meta device: no weight memory at all."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fiddlerc.errors import UnsupportedModelError
from fiddlerc.model.folder import ModelFolder, checkpoint_dtype, load_config
from fiddlerc.units import dtype_name, parse_dtype


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real (rotary tables are computed in __init__)."""
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The Hugging Face causal LM with every parameter on the meta device: no weight memory at all."""
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
            except ValueError as e:
                if "scaled_dot_product_attention" not in str(e):
                    raise
                # as from_pretrained does: eager attention where SDPA is not supported (e.g. GPT-OSS)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    except ValueError as e:
        raise UnsupportedModelError(
            f"{config.model_type} is not a causal language model transformers can build: {e}"
        ) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def meta_model_of(folder: ModelFolder, dtype: str | None = None) -> tuple[nn.Module, torch.dtype]:
    """The meta model of a model folder and its compute dtype: `dtype` if given, else the checkpoint's
    (refused where fiddlerc does not compute in it)."""
    config = load_config(folder)
    compute_dtype = parse_dtype(dtype) if dtype else checkpoint_dtype(folder, config)
    dtype_name(compute_dtype)
    return build_meta_model(config, compute_dtype), compute_dtype
