"""Quantized cpu-tier experts (`--expert-dtype`): written once at compile time, memory-mapped at load, computed
by the C kernels with the arithmetic of the same quantized numbers in fp32."""

import json

import pytest
import torch

import fiddlerc
from fiddlerc import quant_format
from fiddlerc.errors import ArtifactError, OptionError, UnsupportedModelError
from fiddlerc.model.quantize import QUANTIZED_FILE
from fiddlerc.runtime import kernels, quant
from fiddlerc.tools.demo import write_model
from tests.conftest import VOCAB, decode_logits, mapping_of

needs_kernels = pytest.mark.skipif(not quant.available(), reason="the C kernels were not built")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny Mixtral whose widths the blocks divide (hidden 64, experts of 128), and its HF logits."""
    import transformers as T

    config = T.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    src = write_model(config, tmp_path_factory.mktemp("wide") / "m", seed=0, router_scale=8.0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = T.AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    return src, ids, want


def _compile(src, out, fmt, fast_experts=1, dense=None):
    return fiddlerc.compile(
        src, out, gpu_memory="1GiB", context=64, fast_experts=fast_experts, expert_dtype=fmt, dense_dtype=dense
    )


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_cpu_experts_compute_the_reference_arithmetic(fmt, wide, tmp_path, monkeypatch):
    src, ids, want = wide
    art = _compile(src, tmp_path / "out", fmt)
    assert art.plan.target.expert_dtype == fmt
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        for p in model.placed_experts:
            for w, cpu in zip(p.weights, p.on_cpu, strict=True):
                assert all(
                    isinstance(m, quant_format.QuantizedWeight) == cpu for m in w.matrices
                )  # GPU tier: bf16/fp32
        assert all(type(p.worker).__name__ == "InlineWorker" for p in model.placed_experts)  # CPU-only: no hand-off
        q = model.placed_experts[0].weights[model.placed_experts[0].on_cpu.index(True)].w_out
        assert mapping_of(q.data.data_ptr())[0].endswith(QUANTIZED_FILE)  # mapped from the compiled folder, not copied
        got = model(ids)

        monkeypatch.setattr(quant, "matmul", lambda x, qw, **_: quant_format.reference_matmul(x, qw))
        by_reference = model(ids)
    torch.testing.assert_close(got, by_reference, rtol=1e-5, atol=1e-5)  # float sums in another order only
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9 and (got - want).abs().max() < (0.01 if fmt == "int8" else 0.1)  # against the unquantized


@needs_kernels
def test_the_experts_file_holds_the_cpu_tier_at_the_stated_bits_and_is_deterministic(wide, tmp_path):
    src = wide[0]
    art = _compile(src, tmp_path / "a", "int4")
    _compile(src, tmp_path / "b", "int4")
    for name in ("quantized.safetensors", "plan.json", "module.py", "manifest.json"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b or name == "manifest.json" and json.loads(a)["quantized"] == json.loads(b)["quantized"]
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / QUANTIZED_FILE, "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"experts": "int4", "dense": "None", "group": "32", "panel": "4"}
    cpu = [(e.layer, e.expert) for e in art.plan.experts if e.device == "cpu"]
    assert len(keys) == len(cpu) * 3 * 2  # gate, up, down; data and scales
    assert {tuple(int(k.split(".")[i]) for i in (1, 3)) for k in keys} == set(cpu)
    params = 3 * 64 * 128 * len(cpu)
    stored = sum(
        t.numel() * t.element_size()
        for t in (safe_open(tmp_path / "a" / QUANTIZED_FILE, "pt").get_tensor(k) for k in keys)
    )
    assert stored * 8 / params == quant_format.bits_per_weight("int4") == 4.5


def test_a_quantized_folder_where_the_kernels_were_not_built_is_refused_with_the_fix(wide, tmp_path, monkeypatch):
    _compile(wide[0], tmp_path / "out", "int4")
    monkeypatch.setattr(quant, "library", lambda: None)  # as an install without a C compiler has it
    with pytest.raises(ArtifactError, match="CPU weights are int4.*kernels were not built: reinstall fiddlerc"):
        fiddlerc.load(tmp_path / "out", device="cpu")


@needs_kernels
def test_an_edited_or_missing_experts_file_is_refused(wide, tmp_path):
    _compile(wide[0], tmp_path / "out", "int8")
    f = tmp_path / "out" / QUANTIZED_FILE
    data = f.read_bytes()
    f.write_bytes(data + b"\0" * 8)
    with pytest.raises(ArtifactError, match="quantized.safetensors was changed after compiling"):
        fiddlerc.load(tmp_path / "out", device="cpu")
    f.unlink()
    with pytest.raises(ArtifactError, match="quantized.safetensors is missing"):
        fiddlerc.load(tmp_path / "out", device="cpu")


def test_widths_the_blocks_do_not_divide_and_unknown_formats_are_refused(model_dirs, tmp_path):
    with pytest.raises(
        UnsupportedModelError, match="cannot be quantized to int8.*keep this model's experts in the compute dtype"
    ):
        _compile(model_dirs("mixtral"), tmp_path / "out", "int8")  # hidden 32: not two blocks of 32
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(OptionError, match="--expert-dtype 'int3' is not one of int8, int4"):
        _compile(model_dirs("mixtral"), tmp_path / "out2", "int3")


@needs_kernels
def test_the_command_line_compiles_quantized_and_the_report_says_what_each_tier_runs(wide, tmp_path, capsys):
    from fiddlerc.cli import main

    src = wide[0]
    argv = ["compile", str(src), "-o", str(tmp_path / "out"), "--gpu-memory", "1GiB", "--context", "64",
            "--fast-experts", "2", "--expert-dtype", "int4"]  # fmt: skip
    assert main(argv) == 0
    assert main(["report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "stored and run as int4 (4.5 bits per weight)" in out and "GPU-tier experts run in float32" in out


@needs_kernels
@pytest.mark.parametrize("experts", [None, "int4"])
def test_dense_projections_quantized_where_they_run_on_the_cpu(experts, wide, tmp_path, monkeypatch):
    from fiddlerc.runtime.kernels import KernelLinear

    src, ids, want = wide
    _compile(src, tmp_path / "out", experts, dense="int8")
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        hf = model.hf_model
        assert isinstance(hf.lm_head, KernelLinear) and isinstance(
            hf.lm_head.kernel_weight, quant_format.QuantizedWeight
        )
        attention = model._forward.dense.values()
        assert attention and all(isinstance(a.qkv, quant_format.QuantizedWeight) and a.qkv.shape == (64 + 2 * 32, 64)
                                 for a in attention)  # fmt: skip
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / QUANTIZED_FILE, "pt") as f:
        dense = {k.rsplit(".", 1)[0] for k in f.keys() if k.startswith("dense.")}
    projections = {f"dense.model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert dense == projections | {"dense.lm_head"}  # no router, embedding or norm
    assert (
        "dense projections   also stored as int8 (8.5 bits per weight" in (tmp_path / "out" / "report.txt").read_text()
    )
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        got = model(ids)
        monkeypatch.setattr(quant, "matmul", lambda x, qw, **_: quant_format.reference_matmul(x, qw))
        by_reference = model(ids)
    torch.testing.assert_close(got, by_reference, rtol=1e-5, atol=1e-5)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@needs_kernels
def test_verify_reads_every_byte_that_loading_checks_only_by_size_and_header(wide, tmp_path, capsys):
    from fiddlerc.cli import main

    _compile(wide[0], tmp_path / "out", "int8")
    assert main(["verify", str(tmp_path / "out")]) == 0
    assert "every byte of its quantized weights verified" in capsys.readouterr().out
    f = tmp_path / "out" / QUANTIZED_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one weight byte: same size, same header
    f.write_bytes(bytes(data))
    fiddlerc.load(tmp_path / "out", device="cpu").close()  # the cheap check cannot see it
    assert main(["verify", str(tmp_path / "out")]) == 2
    assert "quantized.safetensors differs from what was compiled (sha256 of its bytes)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small Mixtral trained on the first part of the standard library's sources, and held-out text."""
    import transformers as T

    from fiddlerc.tools.demo import offline_text, train_model

    text = offline_text()
    config = T.MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=512)  # fmt: skip
    src = train_model(config, tmp_path_factory.mktemp("trained") / "m", text[: len(text) // 2], steps=300)
    held = text[-4096:]
    return src, torch.tensor(list(held), dtype=torch.long).view(8, 512)


def _logits(out, ids, **load):
    with fiddlerc.load(out, device="cpu", **load) as model:
        return torch.cat([model(ids[i : i + 1]) for i in range(ids.shape[0])]).float()


@needs_kernels
def test_on_a_trained_model_int8_barely_moves_the_next_token_distribution_and_int4_moves_it_a_little(trained, tmp_path):
    import torch.nn.functional as F

    src, ids = trained
    fiddlerc.compile(src, tmp_path / "ref", gpu_memory="1GiB", context=512, fast_experts=0)
    ref = F.log_softmax(_logits(tmp_path / "ref", ids, kernels="reference"), -1)
    errors = {}
    for fmt in ("int8", "int4"):
        fiddlerc.compile(src, tmp_path / fmt, gpu_memory="1GiB", context=512, fast_experts=0,
                         expert_dtype=fmt, dense_dtype=fmt)  # fmt: skip
        got = F.log_softmax(_logits(tmp_path / fmt, ids), -1)
        kl = (ref.exp() * (ref - got)).sum(-1).mean().item()  # teacher-forced, held-out text
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        errors[fmt] = (kl, top1)
    # measured here (torch 2.13): int8 KL 0.00008, top-1 0.992; int4 KL 0.0038, top-1 0.954; thresholds leave
    # room for other torch versions' training arithmetic
    assert errors["int8"][0] < 0.002 and errors["int8"][1] > 0.97, errors
    assert errors["int4"][0] < 0.04 and errors["int4"][1] > 0.85, errors
    assert errors["int8"][0] < errors["int4"][0] / 4, errors  # four more bits: a much smaller error


def test_planning_prices_a_quantized_cpu_tier_by_the_bytes_it_reads():
    from pathlib import Path

    from fiddlerc.api import plan

    config = Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
    runs = {fmt: plan(config, "24GiB", context=4096, hardware="rtx4090-ddr5", cpu_memory="256GiB", expert_dtype=fmt)
            for fmt in (None, "int8", "int4")}  # fmt: skip
    placed = {fmt: [e.device for e in p.experts] for fmt, p in runs.items()}
    assert placed[None] == placed["int8"] == placed["int4"]  # GPU-tier experts keep the compute dtype's size
    cpu_bytes = runs[None].memory.expert_bytes["cpu"]
    for fmt in ("int8", "int4"):
        want = cpu_bytes // 2 * quant_format.bits_per_weight(fmt) / 8  # bf16 parameters x bits / 8
        assert runs[fmt].memory.host_bytes == pytest.approx(want, rel=1e-6)
    ms = {fmt: p.prediction.decode_ms_per_token for fmt, p in runs.items()}
    assert ms["int4"] < ms["int8"] < ms[None]  # the CPU experts stream fewer bytes


@needs_kernels
def test_the_benchmark_measures_a_quantized_model_in_the_bytes_it_stores(wide, tmp_path):
    from fiddlerc.tools.bench import decode_bytes_per_token, expert_kernel, stored_weight_bytes

    art = _compile(wide[0], tmp_path / "out", "int4", fast_experts=0)
    plan = art.plan
    cpu_params = sum(e.bytes for e in plan.experts) // 4  # fp32 checkpoint: every expert on the CPU tier
    want = plan.memory.dense_bytes + (tmp_path / "out" / QUANTIZED_FILE).stat().st_size
    assert stored_weight_bytes(plan, tmp_path / "out") == want  # all experts quantized, dense as compiled
    assert stored_weight_bytes(plan, tmp_path / "out") < plan.memory.dense_bytes + cpu_params * 4
    full = plan.memory.dense_bytes + sum(ml.top_k * ml.bytes_per_expert for ml in plan.moe_layers)
    assert decode_bytes_per_token(plan, 0) == plan.memory.dense_bytes + round(
        (full - plan.memory.dense_bytes) * 4.5 / 32
    )
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        kernel = expert_kernel(model, rounds=1)
    assert kernel.bytes_read == sum(m.nbytes for p in model.placed_experts for w in p.weights for m in w.matrices)


@needs_kernels
def test_one_token_decode_runs_a_layers_cpu_experts_in_one_grouped_call(wide, tmp_path, monkeypatch):
    src, ids, _ = wide
    _compile(src, tmp_path / "out", "int4", fast_experts=0)
    calls = []
    real = kernels.GroupedExperts.__call__
    monkeypatch.setattr(
        kernels.GroupedExperts,
        "__call__",
        lambda self, *a: calls.append(torch.as_tensor(a[1]).numel()) or real(self, *a),
    )

    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu") as model:
        assert all(p.grouped is not None for p in model.placed_experts)
        got = decode_logits(model, ids[:1])
        assert calls == [2] * 2 * 4  # each decode step: one call per layer for its top-2
        stats = model.routing_stats()["layers"]  # the picks the C call counted are in the stats too
        assert all(s["cpu"] == (ids.shape[1] + 4) * 2 and sum(s["per_expert"]) == s["cpu"] for s in stats.values())
        for p in model.placed_experts:
            p.grouped = None  # expert by expert, as a batch runs them
        want = decode_logits(model, ids[:1])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
