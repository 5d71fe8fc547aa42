"""Calibration: the roofline fit, its cache, and the narrowed model that measures overheads."""

from pathlib import Path

import pytest


def test_roofline_fit_recovers_a_known_machine():
    from fiddlerc.tools.calibrate import TOKEN_COUNTS, fit_roofline

    expert_bytes, flops = 3 * 1024 * 1024 * 4, 2 * 3 * 1024 * 1024
    bw, tput = 20.0, 0.05  # GB/s, TFLOP/s
    ms = [max(expert_bytes / (bw * 1e6), n * flops / (tput * 1e9)) for n in TOKEN_COUNTS]
    got_bw, got_tput, error = fit_roofline(TOKEN_COUNTS, ms, expert_bytes, flops)
    assert got_bw == pytest.approx(bw, rel=1e-3) and got_tput == pytest.approx(tput, rel=1e-3) and error < 1e-9


def test_calibration_is_cached(tmp_path, monkeypatch):
    from fiddlerc.hardware import load_profile
    from fiddlerc.tools import calibrate as cal

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("fiddlerc.measure.POOL_BYTES", 2**20)
    profile, path = cal.calibrate(64, 32, __import__("torch").float32, threads=1, repeats=2)
    assert path.parent == tmp_path / "fiddlerc" / "calibration" and path.is_file()
    assert profile.cpu_only == (not __import__("torch").cuda.is_available())
    assert profile.cpu.mem_bw_gbps > 0 and profile.cpu.matmul_tflops > 0
    assert load_profile(path) == profile  # a calibrated profile is an ordinary profile file
    calls = []
    monkeypatch.setattr(cal, "_time_expert", lambda *a, **k: calls.append(a) or ([(1, 1.0), (2, 1.0)], 1))
    again, path2 = cal.calibrate(64, 32, __import__("torch").float32, threads=1, repeats=2)
    assert (again, path2) == (profile, path) and not calls  # read from the cache, not measured
    assert profile.cpu.disk_gbps > 0 and "page cache" in profile.sources["cpu.disk_gbps"]


@pytest.mark.skipif(not __import__("fiddlerc.runtime.quant").runtime.quant.available(), reason="no C kernels")
def test_calibration_times_the_cpu_tiers_format_through_the_runtimes_kernels(tmp_path, monkeypatch):
    import torch

    from fiddlerc.runtime import quant
    from fiddlerc.tools import calibrate as cal

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("fiddlerc.measure.POOL_BYTES", 2**20)
    calls = []
    real = quant.matmul
    monkeypatch.setattr(quant, "matmul", lambda *a, **k: calls.append(a[1].fmt) or real(*a, **k))
    curve, read = cal._time_expert(64, 128, torch.bfloat16, torch.device("cpu"), 1, "int4")
    assert read == 3 * 64 * 128 * 4.5 / 8 and [n for n, _ in curve][:4] == [1, 2, 4, 8]  # the stored bytes
    assert set(calls) == {"int4"}  # gate, up and down all ran the int4 kernel
    profile, path = cal.calibrate(64, 128, torch.bfloat16, threads=1, repeats=1, expert_format="int4")
    plain, plain_path = cal.calibrate(64, 128, torch.bfloat16, threads=1, repeats=1)
    assert profile.cpu.expert_curve_format == "int4" and plain.cpu.expert_curve_format == ""
    assert "expert in int4" in profile.description and path != plain_path  # cached apart
    assert profile.cpu.expert_curve_bytes == plain.cpu.expert_curve_bytes == 3 * 64 * 128 * 2  # in bf16


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])
def test_narrowed_configs_keep_the_family_and_fit_in_memory(name):
    """Overhead calibration runs a narrow copy of the user's model: same family, routing and expert
    count, a few layers, every width small, so even DeepSeek-V3's copy is a few MB."""
    import torch
    from transformers import AutoConfig

    from fiddlerc.compiler.capture import capture, moe_sites
    from fiddlerc.model.meta import build_meta_model
    from fiddlerc.tools.calibrate import narrow_config

    full = AutoConfig.from_pretrained(Path(__file__).parents[1] / "data" / f"{name}-config.json")
    small = narrow_config(full, 5)
    assert (small.model_type, small.num_hidden_layers, small.hidden_size) == (full.model_type, 5, 64)
    model = build_meta_model(small, torch.float32)
    assert sum(p.numel() for p in model.parameters()) < 20_000_000
    sites = moe_sites(capture(model).graph)
    assert len(sites) == 5 - getattr(full, "first_k_dense_replace", 0)
    assert {len(s.experts) for s in sites} == {getattr(full, "n_routed_experts", None) or full.num_local_experts}


def test_overheads_are_measured_on_the_runtime_and_fall_back_for_other_families():
    import torch
    from transformers import LlamaConfig

    from fiddlerc.tools.calibrate import measure_overheads
    from tests.conftest import tiny_config

    layer_ms, step_ms, what = measure_overheads(tiny_config("qwen2_moe"), torch.float32, "cpu", 1)
    assert layer_ms > 0 and step_ms >= 0 and what == "a width-reduced qwen2_moe model"
    dense = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    layer_ms, _, what = measure_overheads(dense, torch.float32, "cpu", 1)  # nothing to place: not an MoE
    assert layer_ms > 0 and "Mixtral-shaped" in what
