"""MXFP4 experts (GPT-OSS's format): kept 4-bit on the CPU tier with their own kernel by default, or
dequantized exactly, per expert, at bind time (--expert-dtype compute, and always on the GPU tier)."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import fiddlerc
from fiddlerc.model.mxfp4 import dequantize_mxfp4
from tests.conftest import VOCAB, tiny_config


def _random_mxfp4(shape_rows_cols, generator):
    e, rows, cols = shape_rows_cols
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(120, 128, (e, rows, cols // 32), dtype=torch.uint8, generator=generator)
    return blocks, scales


def test_dequantize_matches_transformers_own_conversion():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4((3, 8, 64), g)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, cols, rows]
    for e in range(3):
        got = dequantize_mxfp4(blocks[e], scales[e], torch.float32)  # [rows, cols]
        assert torch.equal(got, want[e].t())
    # every value is a signed E2M1 number times a power of two
    assert set(dequantize_mxfp4(blocks[0], torch.full_like(scales[0], 127), torch.float32).abs().unique().tolist()) <= {
        0,
        0.5,
        1,
        1.5,
        2,
        3,
        4,
        6,
    }


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory):
    """A tiny GPT-OSS checkpoint with MXFP4 experts, and the HF model holding the same weights dequantized."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from fiddlerc.tools.demo import write_model

    root = tmp_path_factory.mktemp("mxfp4")
    cfg = tiny_config("gpt_oss")
    cfg.hidden_size, cfg.intermediate_size = 64, 64  # rows of two MXFP4 blocks, as the CPU kernel reads them
    src = write_model(cfg, root / "plain", router_scale=8.0)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    with torch.no_grad():
        for layer in ref.model.layers:
            experts = layer.mlp.experts
            prefix = [k for k, v in ref.named_modules() if v is experts][0]
            for name, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
                blocks, scales = _random_mxfp4((e, rows, cols), g)
                getattr(experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32) * 0.05)
                del state[f"{prefix}.{name}"]
                state[f"{prefix}.{name}_blocks"], state[f"{prefix}.{name}_scales"] = blocks, scales - 4  # x 2^-4
    quant = root / "mxfp4"
    quant.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (quant / "config.json").write_text(json.dumps(config))
    save_file(state, quant / "model.safetensors", metadata={"format": "pt"})
    return quant, ref


def test_mxfp4_experts_equal_dequantized_reference(mxfp4_gpt_oss, tmp_path):
    src, ref = mxfp4_gpt_oss
    ref = _rescaled(ref)
    art = fiddlerc.compile(
        src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4, dtype="float32", expert_dtype="compute"
    )
    assert art.plan.target.expert_dtype is None and not (tmp_path / "out" / "quantized.safetensors").exists()
    assert art.plan.moe_layers[0].bytes_per_expert == (2 * 64 * 64 + 2 * 64 + 64 * 64 + 64) * 4  # dequantized size
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _rescaled(ref):
    """The reference model with the checkpoint's scale (2^-4) instead of the fixture's 0.05 (to rounding)."""
    ref = copy.deepcopy(ref)
    with torch.no_grad():
        for layer in ref.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                getattr(layer.mlp.experts, name).mul_(0.0625 / 0.05)
    return ref


def test_mxfp4_cpu_experts_stay_4_bit_by_default(mxfp4_gpt_oss, tmp_path):
    from safetensors.torch import load_file

    from fiddlerc.quant_format import QuantizedWeight, bits_per_weight, dequantize

    src, ref = mxfp4_gpt_oss
    ref = _rescaled(ref)
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4, dtype="float32")
    assert art.plan.target.expert_dtype == "mxfp4" and bits_per_weight("mxfp4") == 4.25
    cpu_tier = sum(d == "cpu" for layer in range(len(ref.model.layers)) for d in art.plan.placement(layer))
    weights_per_expert = 3 * 64 * 64
    assert cpu_tier > 0
    stored = (tmp_path / "out" / "quantized.safetensors").stat().st_size
    assert 0 < stored - cpu_tier * weights_per_expert * 4.25 / 8 < 4096  # the blocks and scales, plus the header
    assert "stored and run as mxfp4 (4.25 bits per weight)" in (tmp_path / "out" / "report.txt").read_text()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        stored = load_file(src / "model.safetensors")
        checked = 0
        for experts in model.placed_experts:
            prefix = f"model.layers.{experts.layer}.mlp.experts.down_proj"
            for e, on_cpu in enumerate(experts.on_cpu):
                if on_cpu:  # the checkpoint's weights bit for bit, in the kernel's layout
                    w = experts.weights[e]
                    assert type(w.w_out) is QuantizedWeight and w.w_out.fmt == "mxfp4"
                    want = dequantize_mxfp4(stored[f"{prefix}_blocks"][e], stored[f"{prefix}_scales"][e], torch.float32)
                    assert torch.equal(dequantize(w.w_out), want)
                    checked += 1
        assert checked == cpu_tier
        got, want = model(ids), ref(input_ids=ids).logits
    # The kernel quantizes the experts' activations to int8 per block of 32: close, not exact, and where a
    # router's top-k is a near tie (random weights) a position may take another expert and differ more.
    close = (got - want).abs().amax(-1) < 0.03 * want.abs().max()
    assert close.float().mean() >= 0.85
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


def test_mxfp4_experts_are_not_requantized(mxfp4_gpt_oss, tmp_path):
    from fiddlerc.errors import OptionError

    src, _ = mxfp4_gpt_oss
    with pytest.raises(OptionError, match="MXFP4 already.*Leave --expert-dtype out, or give --expert-dtype compute"):
        fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0, expert_dtype="int8")
    assert not (tmp_path / "out").exists()


def test_mxfp4_is_refused_for_other_checkpoints(mxfp4_gpt_oss, tmp_path):
    from fiddlerc.api import plan
    from fiddlerc.errors import OptionError

    src, _ = mxfp4_gpt_oss
    plain = src.parent / "plain"
    with pytest.raises(OptionError, match="are not MXFP4: choose int8 or int4"):
        plan(plain, "1GiB", context=64, expert_dtype="mxfp4")


def test_gpt_oss_120b_plans_its_cpu_tier_at_the_checkpoints_size():
    """From the published config alone: the cpu tier held in MXFP4 takes the host memory the checkpoint's
    experts take, where dequantized to bf16 it took 3.8x that (and on a 64 GiB host, paged from disk)."""
    from fiddlerc.api import plan

    config = "tests/data/gpt-oss-120b-config.json"
    kept = plan(config, "24GiB", context=4096, hardware="rtx4090-ddr5")
    wide = plan(config, "24GiB", context=4096, hardware="rtx4090-ddr5", expert_dtype="compute")
    assert kept.target.expert_dtype == "mxfp4" and wide.target.expert_dtype is None
    assert kept.placement(0) == wide.placement(0)  # GPU-tier experts count at bf16 either way
    cpu = kept.memory.expert_bytes["cpu"]
    assert wide.memory.host_bytes == cpu
    assert abs(kept.memory.host_bytes - cpu * 4.25 / 16) < 0.01 * cpu / 16
    assert kept.prediction.cpu_expert_ms < wide.prediction.cpu_expert_ms / 3.7
