"""The latency model and the decode simulator, on cases whose answer is computed by hand."""

from pathlib import Path

import pytest

from fiddlerc.compiler.cost import CostModel, predict_decode
from fiddlerc.hardware import CpuSpec, GpuSpec, HardwareProfile
from fiddlerc.plan import ExpertPlacement, Memory, ModelInfo, MoeLayer, Plan, Target

GPU = GpuSpec("g", 10**10, mem_bw_gbps=1000.0, matmul_tflops=1e6, h2d_gbps=10.0, d2h_gbps=10.0, call_overhead_ms=0.5)
CPU_ = CpuSpec("c", 8, mem_bw_gbps=100.0, matmul_tflops=1e6, call_overhead_ms=0.0, memory_bytes=10**11)


def profile(gpu=GPU) -> HardwareProfile:
    return HardwareProfile("test", "hand-made", CPU_, gpu, {})


def plan(devices: list[str], expert_bytes=10**8, dense=10**9, top_k=2) -> Plan:
    n = len(devices)
    experts = tuple(ExpertPlacement(0, e, d, expert_bytes, top_k / n, "r") for e, d in enumerate(devices))
    sums: dict[str, int] = {}
    for e in experts:
        sums[e.device] = sums.get(e.device, 0) + expert_bytes
    return Plan(
        model=ModelInfo("MixtralForCausalLM", "mixtral", "bfloat16", 1, "0" * 64),
        target=Target("cuda:0", 10**12, 100, 1, None),
        moe_layers=(
            MoeLayer(
                0,
                "model.layers.0.mlp",
                "model.layers.0.mlp.experts",
                "experts-interface",
                "softmax top-k",
                n,
                top_k,
                expert_bytes,
                0,
            ),
        ),
        memory=Memory(10**12, dense, 0, sums),
        experts=experts,
    )


def test_expert_times_by_hand():
    m = CostModel(profile())
    # 1e8 bytes at 100 GB/s = 1 ms on the CPU; at 1000 GB/s = 0.1 ms + 0.5 ms overhead on the GPU
    assert m.cpu_expert_ms(1, 10**8, 2) == pytest.approx(1.0, rel=1e-3)
    assert m.fast_expert_ms(1, 10**8, 2) == pytest.approx(0.6, rel=1e-3)
    slow = CostModel(HardwareProfile("t", "", CpuSpec("c", 1, 100.0, 1.0, 0.0, 1), None, {}))
    # roofline: reading 1e8 bytes takes 1 ms; 2 * 5e7 weights * 10 tokens = 1e9 flops at 1 TFLOP/s = 1 ms;
    # at 30 tokens the compute (3 ms) dominates
    assert slow.cpu_expert_ms(10, 10**8, 2) == pytest.approx(1.0, rel=1e-3)
    assert slow.cpu_expert_ms(30, 10**8, 2) == pytest.approx(3.0, rel=1e-3)


def test_quantized_weights_are_priced_by_the_bytes_they_store_where_they_run_quantized():
    bf16 = CostModel(profile(gpu=None))
    q = CostModel(profile(gpu=None), cpu_format="int4", dense_format="int8")
    assert q.cpu_expert_ms(1, 10**8, 2) == pytest.approx(bf16.cpu_expert_ms(1, 10**8, 2) * 4.5 / 16)
    # CPU-only: the fast tier's experts stay in the compute dtype; the dense projections are int8
    assert q.fast_expert_ms(1, 10**8, 2) == pytest.approx(bf16.fast_expert_ms(1, 10**8, 2))
    assert q.dense_ms(10**8, 1, 2) == pytest.approx(bf16.dense_ms(10**8, 1, 2) * 8.5 / 16)
    beside_gpu = CostModel(profile(), cpu_format="int4", dense_format="int8")
    assert beside_gpu.dense_ms(10**8, 1, 2) == pytest.approx(CostModel(profile()).dense_ms(10**8, 1, 2))  # on the GPU


def test_all_on_gpu_and_all_on_cpu():
    # dense: 1e9 bytes at 1000 GB/s = 1 ms; two experts per token
    assert predict_decode(plan(["cuda:0"] * 4), profile()).ms_per_token == pytest.approx(1.0 + 2 * 0.6, rel=1e-3)
    assert predict_decode(plan(["cpu"] * 4), profile()).ms_per_token == pytest.approx(1.0 + 2 * 1.0, rel=1e-3)


def test_split_takes_the_expected_longer_tier():
    # 2 of 4 experts on each tier, k=2: P(both cpu)=1/6, P(one each)=4/6, P(both gpu)=1/6
    # layer = 1/6*2.0 + 4/6*max(0.6, 1.0) + 1/6*1.2 = 1.2
    p = predict_decode(plan(["cuda:0", "cuda:0", "cpu", "cpu"]), profile())
    assert p.ms_per_token == pytest.approx(1.0 + (2.0 + 4 * 1.0 + 1.2) / 6, rel=1e-3)
    assert p.cpu_expert_ms == pytest.approx(1.0, rel=1e-3)  # expected one CPU call of 1 ms per token


def test_cpu_only_never_predicts_parallel_speedup():
    cpu_only = HardwareProfile("c", "", CPU_, None, {})
    split = predict_decode(plan(["cuda:0", "cuda:0", "cpu", "cpu"]), cpu_only)
    everything_on_one = predict_decode(plan(["cpu"] * 4), cpu_only)
    assert split.ms_per_token == pytest.approx(everything_on_one.ms_per_token, rel=1e-9)


def test_mixtral_8x7b_on_the_papers_machine_from_config_alone():
    """Plan Mixtral-8x7B from its config (no weights) for the paper's E1 machine at 24 GiB."""
    from fiddlerc.api import plan as plan_model
    from fiddlerc.hardware import load_profile

    config = Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
    p = plan_model(config, "24GiB", context=512)
    n_fast = sum(e.device != "cpu" for e in p.experts)
    assert 50 <= n_fast <= 70  # the paper: about 56 of 256 experts fit beside the dense weights
    assert p.moe_layers[0].bytes_per_expert == 3 * 4096 * 14336 * 2  # 352 MB per expert in bf16
    pred = predict_decode(p, load_profile("quadro-rtx6000-skylake48"))
    assert 2.5 < pred.tokens_per_s < 4.0  # the paper measured about 3.2 tokens/s at long outputs


def test_deepseek_v3_from_config_alone_pages_on_a_1_tib_host():
    """DeepSeek-V3 (61 layers, 3 dense, 256 routed experts top-8; config.json from deepseek-ai's model
    card, fp8 quantization left out, so planned in bf16: 1.3 TB) on the H100 server profile."""
    from fiddlerc.api import plan as plan_model
    from fiddlerc.hardware import load_profile

    config = Path(__file__).parents[1] / "data" / "deepseek-v3-config.json"
    p = plan_model(config, "80GiB", hardware="h100-server")
    assert len(p.moe_layers) == 58 and len(p.experts) == 58 * 256
    assert p.moe_layers[0].bytes_per_expert == 3 * 7168 * 2048 * 2
    mem = p.memory
    assert mem.host_budget_bytes == load_profile("h100-server").cpu.memory_bytes  # the profile's memory
    assert mem.host_bytes == mem.expert_bytes["cpu"] > mem.host_budget_bytes and 0.1 < mem.paged_fraction < 0.2
    roomy = plan_model(config, "80GiB", hardware="h100-server", cpu_memory="2TiB")
    assert roomy.memory.paged_fraction == 0 and roomy.prediction.decode_ms_per_token < p.prediction.decode_ms_per_token


def test_verifier_checks_the_prediction():
    from dataclasses import replace

    from fiddlerc.errors import PlanError
    from fiddlerc.plan import Prediction
    from fiddlerc.plan_file import verify_plan

    p = plan(["cpu"] * 4)
    with pytest.raises(PlanError, match="prediction needs target.hardware"):
        verify_plan(p.with_(prediction=Prediction(1.0, 0.5, 0.2, 0.3, 10)))
    with pytest.raises(PlanError, match="profile name with its sha256"):
        verify_plan(p.with_(target=replace(p.target, hardware="x; import os", hardware_sha256="0" * 64)))
    priced = p.with_(target=replace(p.target, hardware="h", hardware_sha256="0" * 64))
    with pytest.raises(PlanError, match="finite and non-negative"):
        verify_plan(priced.with_(prediction=Prediction(float("inf"), 0.5, 0.2, 0.3, 10)))


def test_layer_policy_minimises_the_makespan_by_hand():
    from fiddlerc.compiler.cost import choose_layer

    m = CostModel(profile())
    # three identical non-resident experts: CPU 10 ms each, fetch + GPU 4 ms each
    span, fetched = choose_layer(m, 0.0, [(10.0, 4.0)] * 3)
    assert (span, fetched) == (10.0, [True, True, False])  # GPU 8 ms while the CPU does 10 ms
    # the expert that saves the most CPU time per GPU millisecond goes first
    span, fetched = choose_layer(m, 5.0, [(2.0, 4.0), (9.0, 3.0)])
    assert fetched == [False, True] and span == pytest.approx(8.0)
    # nothing is fetched on a CPU-only machine
    cpu_only = CostModel(HardwareProfile("c", "", CPU_, None, {}))
    assert choose_layer(cpu_only, 1.0, [(2.0, float("inf"))]) == (3.0, [False])


def test_a_measured_curve_replaces_the_roofline_for_its_expert_size():
    from dataclasses import replace

    curve = ((1, 1.0), (4, 2.5), (8, 3.0), (16, 5.0))
    cpu = replace(CPU_, expert_curve=curve, expert_curve_bytes=10**8)
    m = CostModel(HardwareProfile("t", "", cpu, GPU, {}))
    assert m.cpu_expert_ms(1, 10**8, 2) == pytest.approx(1.0)
    assert m.cpu_expert_ms(2, 10**8, 2) == pytest.approx(1.5)  # between the measured points
    assert m.cpu_expert_ms(6, 10**8, 2) == pytest.approx(2.75)
    assert m.cpu_expert_ms(32, 10**8, 2) == pytest.approx(9.0)  # beyond: the last slope
    assert m.cpu_expert_ms(1, 2 * 10**8, 2) == pytest.approx(2.0)  # another size: the roofline
    int4 = CostModel(HardwareProfile("t", "", cpu, GPU, {}), cpu_format="int4")
    assert int4.cpu_expert_ms(1, 10**8, 2) != pytest.approx(1.0)  # measured in bf16, read in int4: the roofline
    measured = CostModel(HardwareProfile("t", "", replace(cpu, expert_curve_format="int4"), GPU, {}), cpu_format="int4")
    assert measured.cpu_expert_ms(2, 10**8, 2) == pytest.approx(1.5)  # measured in int4
    from fiddlerc.hardware import profile_from_json

    p = HardwareProfile("t", "", cpu, GPU, {})
    assert profile_from_json(p.to_json()) == p
    bad = p.to_json().replace("[\n    8,", "[\n    0,")
    with pytest.raises(Exception, match="expert_curve"):
        profile_from_json(bad)


def test_closed_form_and_simulator_price_a_layer_alike():
    """The closed form's dense time is the per-step overhead plus every layer's `layer_dense_ms`, the cost
    the simulator and the micro-batch scheduler charge for a layer too."""
    from fiddlerc.api import plan
    from fiddlerc.compiler.cost import CostModel, layer_dense_ms, predict_decode
    from fiddlerc.hardware import load_profile

    hw = load_profile("rtx4090-ddr5")
    p = plan(Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json", "24GiB", context=512, hardware=hw.name)
    model, t = CostModel.for_plan(p, hw), p.target
    kv = p.memory.kv_reserve_bytes // (t.context_tokens * t.batch_size * p.model.num_layers)
    want = model.step_overhead_ms + p.model.num_layers * layer_dense_ms(model, p, 1, kv * 100)
    assert predict_decode(p, hw, position=100).dense_ms == pytest.approx(want)
    assert layer_dense_ms(model, p, 1, 10**9) > layer_dense_ms(model, p, 1, 0)  # the cache read counts
