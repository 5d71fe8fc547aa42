"""Reliability rows not covered elsewhere: artifacts from elsewhere, runtime faults, fuzzed readers."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fiddlerc
from fiddlerc.artifact import read_manifest
from fiddlerc.errors import ArtifactError, FiddlerError, ModelFolderError, OptionError, PlanError
from fiddlerc.plan_file import plan_from_json
from tests.conftest import VOCAB

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def artifact(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "out"
    fiddlerc.compile(model_dirs("mixtral"), out, gpu_memory="1GiB", context=64, fast_experts=4)
    return out


@pytest.fixture
def artifact_copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


# --- model folders ---------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json"):
        fiddlerc.compile(tmp_path / "empty", tmp_path / "out", gpu_memory="1GiB")


def test_tensor_of_wrong_dtype(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(model_dirs("mixtral"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match="model.norm.weight.*expected a float dtype"):
        fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB")


# --- compiled artifacts ----------------------------------------------------------------------


def test_artifact_moved_to_another_directory_still_loads(artifact_copy):
    moved = artifact_copy.parent / "elsewhere" / "moved.fc"
    moved.parent.mkdir()
    artifact_copy.rename(moved)
    with fiddlerc.load(moved, device="cpu") as model:
        assert model(torch.tensor([[5, 6, 7]])).shape == (1, 3, VOCAB)


@pytest.mark.parametrize("package", ["fiddlerc", "torch", "transformers"])
def test_other_versions_ask_for_a_recompile(artifact_copy, package):
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["versions"][package] = "0.0.1"
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"compiled with {package} 0.0.1.*recompile"):
        fiddlerc.load(artifact_copy, device="cpu")


def test_truncated_plan(artifact_copy):
    text = (artifact_copy / "plan.json").read_bytes()
    (artifact_copy / "plan.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="plan.json was changed"):
        fiddlerc.load(artifact_copy, device="cpu")


def test_newer_format_version():
    with pytest.raises(PlanError, match="format_version 2.*recompile"):
        plan_from_json(json.dumps({"format_version": 2}))


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0", "mps"])
def test_unknown_devices(artifact, device):
    with pytest.raises(OptionError, match="device"):
        fiddlerc.load(artifact, device=device)


# --- runtime faults --------------------------------------------------------------------------


def test_prompt_longer_than_the_context(artifact):
    with fiddlerc.load(artifact, device="cpu") as model:
        with pytest.raises(OptionError, match="exceed the context of 64 tokens.*--context 70"):
            model.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)
        with pytest.raises(OptionError, match="exceed the context"):
            model(torch.ones(1, 65, dtype=torch.long))
        with pytest.raises(OptionError, match="integer tensor"):
            model(torch.ones(1, 5))


def test_two_threads_generating_at_once(artifact):
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(artifact, device="cpu") as model:
        want = model.generate(ids, max_new_tokens=12, ignore_eos=True)
        results, errors = [], []

        def work():
            try:
                for _ in range(3):
                    results.append(model.generate(ids, max_new_tokens=12, ignore_eos=True))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) == 6 and all(torch.equal(r, want) for r in results)


def test_ctrl_c_during_run_stops_generating_and_exits_130(model_dirs, tmp_path):
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    cfg = tiny_config("mixtral")
    cfg.vocab_size = 258
    src = write_model(cfg, tmp_path / "model", tokenizer=True)
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=100000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiddlerc", "run", str(tmp_path / "out"), "--prompt", "hi", "--max-new-tokens", "90000", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 60
    while not out and proc.poll() is None and time.time() < deadline:  # wait until it is generating
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    # 90000 tokens take minutes; the bound only proves the run stopped, not how fast Python tears
    # down (torch's own interpreter shutdown takes ~1.5 s here, more on a loaded CI machine).
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # seen once in a full run here, never alone: say where it hung
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints every thread's stack
        proc.wait(timeout=30)
        pytest.fail("the run did not stop within 60 s of Ctrl-C; its threads:\n" + proc.stderr.read()[-6000:])
    assert code == 130
    assert "interrupted" in proc.stderr.read()


# --- fuzzed readers --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_plan_reader_never_crashes(data):
    try:
        plan_from_json(data)
    except FiddlerError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_manifest_reader_never_crashes(data):
    try:
        read_manifest(data)
    except FiddlerError:
        pass


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["model", "target", "memory", "moe_layers", "experts"]), st.text(max_size=30), _JSON)
def test_mutated_plans_fail_cleanly_or_stay_valid(artifact, section, key, value):
    data = json.loads((artifact / "plan.json").read_text())
    target = data[section][0] if isinstance(data[section], list) else data[section]
    target[key] = value
    try:
        plan_from_json(json.dumps(data))
    except FiddlerError:
        pass


_PAYLOAD = "__import__('os').system('echo pwned')"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["reason", "device"]), st.text(max_size=12))
def test_hostile_strings_never_reach_the_module(artifact, model_dirs, field, junk):
    """Codegen fuzz: a plan whose strings carry code either fails verification or leaves no trace in module.py."""
    from fiddlerc.artifact import regenerate_module
    from fiddlerc.model.folder import open_model_folder

    data = json.loads((artifact / "plan.json").read_text())
    data["experts"][0][field] = junk + _PAYLOAD
    try:
        plan = plan_from_json(json.dumps(data))
    except FiddlerError:
        return
    text, _ = regenerate_module(open_model_folder(model_dirs("mixtral")), plan)
    assert "pwned" not in text and "__import__" not in text


def test_no_pickle_reads_in_the_source():
    """No torch.load without weights_only=True and no pickle.load anywhere a user file could be read."""
    offenders = []
    for path in [
        *ROOT.joinpath("fiddlerc").rglob("*.py"),
        *ROOT.joinpath("passes").rglob("*.py"),
        *ROOT.joinpath("examples").rglob("*.py"),
    ]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in m.group("args"):
                offenders.append(f"{path}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"\bcloudpickle\b", r"\bdill\b", r"\bmarshal\.loads?\("):
            offenders += [f"{path}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not offenders
