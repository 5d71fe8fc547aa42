"""Reading the user's model folder: every broken or unsupported folder is one clear error naming the fix."""

import json
import struct

import pytest
import torch

import fiddlerc
from fiddlerc.errors import ModelFolderError, UnsupportedModelError


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        fiddlerc.compile(tmp_path / "nope", tmp_path / "out", gpu_memory="1GiB")


def test_no_config(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="no config.json"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_config_not_json(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_unknown_model_type(model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "my_secret_moe"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="my_secret_moe"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_no_safetensors(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no \\*.safetensors"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_truncated_safetensors(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFolderError, match="truncated"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_corrupt_header(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xff\xff\xff"
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="corrupt safetensors header"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_header_length_overflow(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(ModelFolderError, match="corrupt safetensors header"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_sharded_index_names_missing_shard(model_copy, tmp_path):
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors.*missing"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_encoder_decoder_is_refused(model_copy, tmp_path):
    from transformers import SwitchTransformersConfig

    cfg = SwitchTransformersConfig(num_layers=2, num_decoder_layers=2, d_model=32, num_experts=4).to_dict()
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="switch_transformers is an encoder-decoder model.*Mixtral"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


@pytest.mark.parametrize("method", ["fp8", "gptq"])
def test_quantized_checkpoint_names_the_scheme(model_copy, tmp_path, method):
    _edit_config(model_copy, quantization_config={"quant_method": method})
    with pytest.raises(UnsupportedModelError, match=f"quant_method={method!r}.*dequantizes only mxfp4.*unquantized"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB")


def test_remote_code_is_never_run(model_copy, tmp_path):
    marker = tmp_path / "remote-code-ran"
    (model_copy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (model_copy / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(
        model_copy,
        auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    )
    art = fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="1GiB", context=64)
    assert art.plan.model.architecture == "MixtralForCausalLM"  # the built-in class for its model_type
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert not marker.exists()
