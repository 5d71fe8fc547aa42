"""The block formats: quantization error, stored bits, determinism, refused shapes; MXFP4 kept bit for bit."""

import pytest
import torch

from fiddlerc import quant_format as Q

SHAPES = [(4, 64), (96, 128), (100, 576), (256, 2048)]
MADE = ("int8", "int4")  # the formats fiddlerc quantizes to


@pytest.mark.parametrize("fmt", MADE)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_quantization_is_within_half_a_step_and_stores_the_stated_bits(fmt, rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 0.05
    qw = Q.quantize(w, fmt)
    assert qw.shape == (rows, cols)
    assert qw.nbytes * 8 / (rows * cols) == Q.bits_per_weight(fmt) == {"int8": 8.5, "int4": 4.5}[fmt]
    step = Q._row_scales(qw).abs().repeat_interleave(Q.GROUP, dim=1)
    err = (Q.dequantize(qw) - w).abs()
    # round to nearest: half a step; int4's range [-8, 7] clips the far side of its largest weight by up to one
    assert torch.all(err <= step * (0.5 if fmt == "int8" else 1.0) * (1 + 2**-6))  # fp16 scales: a hair more
    assert err.mean() < step.mean() * 0.3
    again = Q.quantize(w.clone(), fmt)
    assert torch.equal(again.data, qw.data) and torch.equal(again.scales, qw.scales)  # deterministic


def test_int4_keeps_each_blocks_largest_weight_exact_and_an_all_zero_block_is_zero():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    w[1, :32] = 0
    back = Q.dequantize(Q.quantize(w, "int4"))
    blocks, got = w.view(4, 2, 32), back.view(4, 2, 32)
    idx = blocks.abs().argmax(-1, keepdim=True)
    want = blocks.gather(-1, idx).to(torch.float16).float()  # exact up to its fp16 scale
    torch.testing.assert_close(got.gather(-1, idx), want, rtol=0, atol=0)
    assert torch.equal(back[1, :32], torch.zeros(32)) and torch.isfinite(back).all()


def test_mxfp4_is_the_checkpoints_numbers_bit_for_bit_at_the_stated_bits():
    from fiddlerc.model.mxfp4 import dequantize_mxfp4

    g = torch.Generator().manual_seed(4)
    blocks = torch.randint(0, 256, (8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (8, 4), dtype=torch.uint8, generator=g)
    scales[0, :2] = torch.tensor([0, 255])  # 2^-127 (subnormal) and the top exponent
    qw = Q.from_mxfp4(blocks, scales)
    assert qw.shape == (8, 128) and qw.nbytes * 8 / qw.numel() == Q.bits_per_weight("mxfp4") == 4.25
    got, want = Q.dequantize(qw), dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    with pytest.raises(ValueError, match="kept from an MXFP4 checkpoint"):
        Q.quantize(torch.zeros(4, 64), "mxfp4")


@pytest.mark.parametrize("fmt", MADE)
def test_shapes_the_blocks_do_not_divide_are_refused_with_the_fix(fmt):
    for shape in ((96, 96), (6, 128)):
        with pytest.raises(
            ValueError, match=f"cannot be quantized to {fmt}.*keep this model's experts in the compute dtype"
        ):
            Q.quantize(torch.zeros(shape), fmt)
    with pytest.raises(ValueError, match="unknown quantized format 'int3'"):
        Q.check_shape((4, 64), "int3")
