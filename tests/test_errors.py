"""Bad input gives one clear FiddlerError naming the problem and the fix."""

import json
import shutil
import struct

import pytest
import torch

import fiddlerc
from fiddlerc.errors import ArtifactError, BudgetError, ModelFolderError, UnsupportedModelError


@pytest.fixture
def model_copy(model_dirs, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dirs("mixtral"), dst)
    return dst


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


def test_budget_too_small(model_copy, tmp_path):
    with pytest.raises(BudgetError, match="smaller than the dense weights .* give at least"):
        fiddlerc.compile(model_copy, tmp_path / "out", gpu_memory="10KiB")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_sharded_index_names_missing_shard(model_copy, tmp_path):
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors.*missing"):
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


# --- compiled artifacts -------------------------------------------------------------------------


@pytest.fixture
def artifact(model_copy, tmp_path):
    out = tmp_path / "out"
    fiddlerc.compile(model_copy, out, gpu_memory="1GiB", context=64, fast_experts=4)
    return out


def test_edited_module_is_refused(artifact):
    text = (artifact / "module.py").read_text()
    (artifact / "module.py").write_text(
        text.replace("class CompiledForward", "print('pwned')\n\n\nclass CompiledForward")
    )
    with pytest.raises(ArtifactError, match="module.py differs .* it was not run"):
        fiddlerc.load(artifact, device="cpu")


def test_edited_plan_is_refused(artifact):
    plan = json.loads((artifact / "plan.json").read_text())
    plan["experts"][0]["reason"] = "edited"
    (artifact / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ArtifactError, match="plan.json was changed"):
        fiddlerc.load(artifact, device="cpu")


def test_edited_or_wrong_weight_sources_are_refused(artifact):
    from fiddlerc.artifact import MANIFEST_FILE, SOURCES_FILE, sha256_bytes

    path = artifact / SOURCES_FILE
    sources = json.loads(path.read_text())
    a, b = sorted(n for n in sources if n.endswith("norm.weight"))[:2]
    sources[a], sources[b] = sources[b], sources[a]  # two same-shaped weights swapped: a wrong model that runs
    path.write_text(json.dumps(sources))
    with pytest.raises(ArtifactError, match="sources.json was changed"):
        fiddlerc.load(artifact, device="cpu")
    # rehashed in the manifest, an entry naming a tensor the weights do not have is still refused
    sources[a] = {"key": "no.such.tensor"}
    path.write_text(json.dumps(sources))
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["files"][SOURCES_FILE] = sha256_bytes(path.read_bytes())
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sources.json does not match"):
        fiddlerc.load(artifact, device="cpu")
    path.write_text("{not json")
    manifest["files"][SOURCES_FILE] = sha256_bytes(path.read_bytes())
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sources.json is corrupt"):
        fiddlerc.load(artifact, device="cpu")


def test_missing_manifest(artifact):
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        fiddlerc.load(artifact, device="cpu")


def test_swapped_weights_are_refused(artifact, model_copy):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, f, metadata={"format": "pt", "note": "swapped"})
    with pytest.raises(ArtifactError, match="not the ones .* compiled for"):
        fiddlerc.load(artifact, device="cpu")


def test_moved_model_folder_with_model_argument(artifact, model_copy, tmp_path):
    moved = tmp_path / "moved"
    model_copy.rename(moved)
    with pytest.raises(ModelFolderError, match="does not exist"):
        fiddlerc.load(artifact, device="cpu")
    with fiddlerc.load(artifact, device="cpu", model_dir=moved) as model:
        assert model.plan.experts


def test_unavailable_device(artifact):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fiddlerc.errors import OptionError

    with pytest.raises(OptionError, match="not available"):
        fiddlerc.load(artifact, device="cuda:0")


def test_header_length_overflow(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(ModelFolderError, match="corrupt safetensors header"):
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


def test_dense_model_exits_2_from_the_cli(tmp_path, capsys):
    from fiddlerc.cli import main
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    src = write_model(tiny_config("llama"), tmp_path / "llama")
    assert main(["compile", str(src), "-o", str(tmp_path / "out"), "--gpu-memory", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM has no mixture-of-experts block" in err and "DeepSeek-V3" in err
