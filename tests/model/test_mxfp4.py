"""MXFP4 experts (GPT-OSS's format) are dequantized exactly, per expert, at bind time."""

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
    cfg.hidden_size, cfg.intermediate_size = 64, 32  # rows of 32 values per MXFP4 block
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
    # the reference scaled by 0.05; the checkpoint by 2^-4 = 0.0625: rescale the reference to match exactly
    with torch.no_grad():
        for layer in ref.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                getattr(layer.mlp.experts, name).mul_(0.0625 / 0.05)
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4, dtype="float32")
    assert art.plan.moe_layers[0].bytes_per_expert == (2 * 32 * 64 + 2 * 32 + 64 * 32 + 64) * 4  # dequantized size
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_mxfp4_experts_are_not_requantized(mxfp4_gpt_oss, tmp_path):
    from fiddlerc.errors import UnsupportedModelError

    src, _ = mxfp4_gpt_oss
    with pytest.raises(
        UnsupportedModelError, match="stores its experts in MXFP4 already: compile it without --expert-dtype"
    ):
        fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0, expert_dtype="int8")
    assert not (tmp_path / "out").exists()
