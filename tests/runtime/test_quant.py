"""The C kernels that read quantized weights, against the same arithmetic in fp32 torch ops."""

import pytest
import torch

from fiddlerc import quant_format as F
from fiddlerc.runtime import quant as Q

SHAPES = [(4, 64), (96, 128), (100, 576), (256, 2048)]
MADE = ("int8", "int4")  # the formats fiddlerc quantizes to; mxfp4 comes from checkpoints (F.from_mxfp4)
needs_kernels = pytest.mark.skipif(not Q.available(), reason="the C kernels were not built")


@needs_kernels
@pytest.mark.parametrize("simd", [True, False])
def test_activations_are_quantized_as_the_reference_does(simd):
    if simd and not Q.library().simd:
        pytest.skip("this CPU has no AVX2")
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1)) * 3
    x[1, :32] = 0  # a zero block: scale 0, values 0
    got = Q.quantize_activations(x, simd=simd)
    want_q, want_d = F.quantize_activations_reference(x)
    assert torch.equal(got.q, want_q) and torch.equal(got.scales, want_d)


@needs_kernels
@pytest.mark.parametrize("fmt", F.FORMATS)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_kernels_equal_the_fp32_arithmetic_of_the_same_quantized_numbers(fmt, rows, cols, tokens):
    g = torch.Generator().manual_seed(cols + tokens)
    if fmt == "mxfp4":  # every code, scales around 2^-4 and the extreme exponent 0 (2^-127, subnormal)
        blocks = torch.randint(0, 256, (rows, cols // F.GROUP, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 126, (rows, cols // F.GROUP), dtype=torch.uint8, generator=g)
        scales[0, 0] = 0
        qw = F.from_mxfp4(blocks, scales)
    else:
        qw = F.quantize(torch.randn(rows, cols, generator=g) * 0.05, fmt)
    x = torch.randn(tokens, cols, generator=g).to(torch.bfloat16)
    want = F.reference_matmul(x, qw)
    tol = 2e-6 * (cols / F.GROUP) * want.abs().max().item()  # float sums in another order only
    for simd in (True, False) if Q.library().simd else (False,):
        for threads in (1, 2):
            got = Q.matmul(x, qw, threads=threads, simd=simd)
            assert got.shape == (tokens, rows) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=tol)
    shared = Q.quantize_activations(x)  # one quantization read by several products gives the same
    assert torch.equal(Q.matmul(shared, qw, threads=1), Q.matmul(x, qw, threads=1))


@needs_kernels
def test_a_product_of_the_wrong_width_is_refused():
    qw = F.quantize(torch.zeros(8, 128), "int8")
    with pytest.raises(ValueError, match="activations of width 64 for a weight of 128 columns"):
        Q.matmul(torch.zeros(1, 64), qw)


@needs_kernels
def test_products_that_read_one_input_quantize_it_once_and_compute_the_same():
    from fiddlerc.runtime import kernels

    g = torch.Generator().manual_seed(2)
    gate, up = (F.quantize(torch.randn(64, 128, generator=g) * 0.05, "int8") for _ in range(2))
    gate, up = (F.QuantizedWeight("int8", w.data, w.scales, torch.bfloat16) for w in (gate, up))  # bf16 products
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    shared = kernels.shared_input(x, (gate, up))
    assert isinstance(shared, F.QuantizedActivations)
    for w in (gate, up):
        assert torch.equal(kernels.linear(shared, w), kernels.linear(x, w))
    plain = torch.randn(64, 128)
    assert kernels.shared_input(x, (gate, plain)) is x and kernels.shared_input(x, (gate,)) is x


def test_rows_of_quantized_matrices_concatenate_as_their_quantization():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(rows, 128, generator=g) for rows in (8, 4, 4)]
    for fmt in MADE:
        fused = F.cat_rows([F.quantize(p, fmt) for p in parts])
        whole = F.quantize(torch.cat(parts), fmt)
        assert (
            fused.shape == (16, 128) and torch.equal(fused.data, whole.data) and torch.equal(fused.scales, whole.scales)
        )


@needs_kernels
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_a_grouped_call_sums_the_picked_experts_as_one_call_each_would(fmt):
    from fiddlerc.runtime import kernels

    g = torch.Generator().manual_seed(5)
    hidden, inter = 128, 192

    def matrix(rows, cols):
        if fmt == "mxfp4":
            blocks = torch.randint(0, 256, (rows, cols // F.GROUP, 16), dtype=torch.uint8, generator=g)
            return F.from_mxfp4(
                blocks, torch.randint(120, 124, (rows, cols // F.GROUP), dtype=torch.uint8, generator=g)
            )
        return F.quantize(torch.randn(rows, cols, generator=g) * 0.05, fmt)

    experts = {e: (matrix(inter, hidden), matrix(inter, hidden), matrix(hidden, inter)) for e in (0, 2, 3, 7)}
    grouped = kernels.GroupedExperts(experts)
    x = torch.randn(1, hidden, generator=g)
    picks, route = [7, 0, 3], torch.tensor([0.5, 0.3, 0.2])
    want = torch.zeros(1, hidden)
    for e, r in zip(picks, route, strict=True):  # the kernels' arithmetic in fp32 torch ops, expert by expert
        gate, up, down = experts[e]
        xa = Q.quantize_activations(x)
        h = torch.nn.functional.silu(F.reference_matmul(xa, gate)) * F.reference_matmul(xa, up)
        want += r * F.reference_matmul(h, down)
    got = grouped(x, picks, route)
    assert got.shape == (1, hidden) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert not kernels.GroupedExperts.accepts((experts[0][0], experts[0][1], experts[0][0]), experts[0])


@needs_kernels
def test_the_build_names_the_library_by_its_bytes():
    import hashlib

    path = Q.importlib.util.find_spec("fiddlerc.runtime._quant").origin
    with open(path, "rb") as f:
        assert Q.build() == hashlib.sha256(f.read()).hexdigest()[:12]
