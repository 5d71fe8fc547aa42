"""The compiled folder: any edit to module.py, plan.json, sources.json or the model's weights is refused, never run."""

from __future__ import annotations

import json

import pytest

import fiddlerc
from fiddlerc.errors import ArtifactError, ModelFolderError


def test_an_edited_attention_path_is_refused(model_dirs, tmp_path):
    import json

    from fiddlerc.errors import ArtifactError, PlanError

    fiddlerc.compile(model_dirs("qwen3_moe"), tmp_path / "out", gpu_memory="1GiB", context=64)
    plan_file = tmp_path / "out" / "plan.json"
    doc = json.loads(plan_file.read_text())
    doc["attention"][0]["path"] = "generated"  # qwen3-moe normalises q/k: the generated code would be wrong
    plan_file.write_text(json.dumps(doc))
    with pytest.raises((ArtifactError, PlanError)):
        fiddlerc.load(tmp_path / "out", device="cpu")


def test_a_plan_naming_an_attention_the_model_lacks_is_refused(model_dirs, tmp_path):
    import json

    from fiddlerc.errors import ArtifactError, PlanError

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    plan_file = tmp_path / "out" / "plan.json"
    doc = json.loads(plan_file.read_text())
    doc["attention"][0]["module"] = "model.layers.0.mlp"
    plan_file.write_text(json.dumps(doc))
    with pytest.raises((ArtifactError, PlanError), match="recompile"):
        fiddlerc.load(tmp_path / "out", device="cpu")


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
