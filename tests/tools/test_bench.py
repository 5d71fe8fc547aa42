"""`fiddlerc bench`: its numbers are consistent with each other and with the plan (not timed assertions)."""

import json

import pytest
import torch

import fiddlerc
from fiddlerc.tools.bench import bench, decode_bytes_per_token


def test_bench_reports_both_models_and_their_ratios(model_dirs, tmp_path):
    art = fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    r = bench(tmp_path / "out", prompt_tokens=6, new_tokens=4, rounds=1, threads=1, device="cpu")
    for speed in (r.fiddlerc, r.hf):
        assert speed.decode_tokens_per_s > 0 and speed.prefill_tokens_per_s > 0 and speed.time_to_first_token_s > 0
    assert r.ratios["decode"] == pytest.approx(r.fiddlerc.decode_tokens_per_s / r.hf.decode_tokens_per_s)
    # every ratio is > 1 where fiddlerc is faster: for time to first token, HF's time over fiddlerc's
    assert r.ratios["time_to_first_token"] == pytest.approx(
        r.hf.time_to_first_token_s / r.fiddlerc.time_to_first_token_s
    )
    assert r.read_gbps > 0 and 0 < r.roofline["fiddlerc"]
    # a decode step reads the dense weights, the KV cache so far and top-k experts per MoE layer
    ml = art.plan.moe_layers
    assert r.decode_bytes_per_token == decode_bytes_per_token(art.plan, 6 + 2)
    assert r.decode_bytes_per_token > art.plan.memory.dense_bytes + sum(m.top_k * m.bytes_per_expert for m in ml) - 1
    st, mem = r.startup, art.plan.memory
    assert min(st.read_files_s, st.load_s, st.first_pass_s) > 0
    assert st.experts_touched == 1.0  # the first pass routed to every expert of every layer
    assert st.weight_bytes == mem.dense_bytes + sum(m.num_experts * m.bytes_per_expert for m in ml)
    assert st.ratios["startup_over_read"] == pytest.approx((st.load_s + st.first_pass_s) / st.read_files_s)
    # the expert kernel pass reads every expert once: each one's bytes as the plan counts them
    assert r.experts.bytes_read == sum(m.num_experts * m.bytes_per_expert for m in ml)
    assert r.experts.seconds > 0 and r.experts.top_k == 2
    doc = json.loads(r.to_json())
    assert set(doc) >= {"machine", "workload", "read_gbps", "fiddlerc", "hf", "ratios", "roofline", "startup_ratios"}
    assert doc["expert_kernel_of_read_bandwidth"] == pytest.approx(r.experts.gbps / r.read_gbps)
    assert doc["machine"]["threads"] == 1 and doc["workload"]["new_tokens"] == 4


def test_bench_cli_without_the_baseline_writes_json(model_dirs, tmp_path, capsys):
    from fiddlerc.cli import main

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    args = ["bench", str(tmp_path / "out"), "--prompt-tokens", "4", "--new-tokens", "3", "--rounds", "1", "--no-hf"]
    assert main([*args, "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fiddlerc" in out and "HF " not in out and "roofline" in out and "reading the weight files once" in out
    assert "expert kernel at 1 token" in out
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert doc["hf"] is None and doc["ratios"] == {}


def test_a_baseline_transformers_cannot_load_here_is_refused_with_the_fix(model_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fiddlerc.errors import OptionError

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)

    def missing(*_, **__):  # as transformers does for an MXFP4 checkpoint without accelerate
        raise ImportError("Using mxfp4 requires Accelerate: `pip install accelerate`")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(
        OptionError, match="requires Accelerate.*install what it names, or bench without it \\(--no-hf\\)"
    ):
        bench(tmp_path / "out", prompt_tokens=6, new_tokens=4, rounds=1, threads=1, device="cpu")
    r = bench(tmp_path / "out", prompt_tokens=6, new_tokens=4, rounds=1, threads=1, device="cpu", hf=False)
    assert r.hf is None and r.fiddlerc.decode_tokens_per_s > 0


def test_the_baseline_is_skipped_with_a_note_where_the_whole_model_does_not_fit_the_gpu(
    model_dirs, tmp_path, monkeypatch
):
    from fiddlerc.tools.bench import hf_fits

    plan = fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64).plan
    assert hf_fits(plan, torch.device("cpu")) is None  # host memory: loaded as it is
    whole = plan.memory.dense_bytes + sum(ml.num_experts * ml.bytes_per_expert for ml in plan.moe_layers)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (whole // 2, 4 * whole))
    note = hf_fits(plan, torch.device("cuda:0"))
    assert note.startswith("Hugging Face baseline skipped") and "cuda:0" in note
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (4 * whole, 4 * whole))
    assert hf_fits(plan, torch.device("cuda:0")) is None
