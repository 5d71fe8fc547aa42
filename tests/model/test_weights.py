"""Weight sources: checkpoints whose tensors are missing, misshapen or sharded, and pages released back to the file."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.errors import ModelFolderError
from fiddlerc.model.folder import open_model_folder
from fiddlerc.model.weights import WeightReader


def test_released_pages_read_back_the_same_values(model_dirs):
    folder = open_model_folder(model_dirs("mixtral"))
    reader = WeightReader(folder)
    key = max(
        folder.tensors, key=lambda k: len(folder.tensors[k].shape) and torch.Size(folder.tensors[k].shape).numel()
    )
    t = reader.get(key)
    before = t.clone()
    reader.release(t)
    assert torch.equal(t, before)
    reader.close()


def _rewrite_safetensors(path, drop=None, reshape=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(model_copy, tmp_path):
    _rewrite_safetensors(model_copy / "model.safetensors", drop="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(ModelFolderError, match="lacks tensor 'model.layers.1.self_attn.q_proj.weight'"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_missing_expert(model_copy, tmp_path):
    _rewrite_safetensors(model_copy / "model.safetensors", drop="model.layers.0.block_sparse_moe.experts.3.w2.weight")
    with pytest.raises(ModelFolderError, match="incomplete set of experts"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_wrong_shape(model_copy, tmp_path):
    _rewrite_safetensors(model_copy / "model.safetensors", reshape="model.norm.weight")
    with pytest.raises(ModelFolderError, match="do not belong together"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_sharded_checkpoint_loads(model_dirs, tmp_path):
    """A sharded folder (index + several files) compiles and gives the same logits as one file."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dirs("qwen2_moe"))
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    fiddlerc.compile(tmp_path / "sharded", tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=3)
    ids = torch.randint(3, 100, (1, 8))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)
