"""The meta model: the Hugging Face model of a config with no weight memory, buffers computed for real."""

import pytest
import torch

from fiddlerc.errors import OptionError, UnsupportedModelError
from fiddlerc.model.folder import open_model_folder
from fiddlerc.model.meta import build_meta_model, meta_model_of


def test_parameters_are_on_meta_with_the_checkpoints_names_and_shapes(model_dirs, hf_model):
    src = model_dirs("qwen2_moe")
    model, dtype = meta_model_of(open_model_folder(src))
    ref = hf_model(src)
    assert dtype == torch.float32  # the checkpoint's own dtype
    params = dict(model.named_parameters())
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in ref.named_parameters()}
    assert all(p.is_meta and not p.requires_grad for p in params.values())
    assert not model.training
    buffers = dict(model.named_buffers())  # rotary tables are computed in __init__: real, and equal
    assert buffers and all(not b.is_meta for b in buffers.values())
    for name, b in ref.named_buffers():
        torch.testing.assert_close(buffers[name], b)


def test_nn_module_is_restored_after_building():
    from transformers import MixtralConfig

    register = torch.nn.Module.register_parameter
    build_meta_model(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_local_experts=4, vocab_size=64), torch.bfloat16)  # fmt: skip
    assert torch.nn.Module.register_parameter is register
    assert not torch.nn.Linear(2, 2).weight.is_meta  # modules built afterwards get real weights


def test_a_dtype_asked_for_replaces_the_checkpoints(model_dirs):
    model, dtype = meta_model_of(open_model_folder(model_dirs("mixtral")), "bfloat16")
    assert dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(OptionError, match="unknown dtype 'int8'"):
        meta_model_of(open_model_folder(model_dirs("mixtral")), "int8")


def test_a_config_that_is_no_causal_lm_is_refused():
    from transformers import CLIPConfig

    with pytest.raises(UnsupportedModelError, match="clip is not a causal language model"):
        build_meta_model(CLIPConfig(), torch.float32)
