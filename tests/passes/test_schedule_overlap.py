"""Micro-batching: the list scheduler by hand, the cost model's choice, and the micro-batched forward
equal to Hugging Face (logits, greedy tokens, beam search) on every family whose MoE block returns a tensor."""

from pathlib import Path

import pytest
import torch

import fiddlerc
from fiddlerc.errors import OptionError
from fiddlerc.model.families import VERIFIED
from fiddlerc.passes.schedule_overlap import list_schedule
from tests.conftest import VOCAB, hf_greedy, tiny_config

MIXTRAL = Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
TUPLE_BLOCKS = {"gpt_oss", "llama4_text"}  # their MoE blocks return (output, router scores)


def test_list_schedule_pipelines_two_micro_batches():
    # stage = 1 ms of fast-device work (CPU experts handed over after 0.5 ms), 1 ms of CPU work
    order = list_schedule(2, 3, [1.0] * 3, [1.0, 1.0, 0.0], [0.5] * 3)
    assert order == ["c0.0", "c1.0", "w0.0", "c0.1", "w1.0", "c1.1", "w0.1", "c0.2", "w1.1", "c1.2"]
    assert list_schedule(1, 3, [1.0] * 3, [1.0, 1.0, 0.0]) == ["c0.0", "w0.0", "c0.1", "w0.1", "c0.2"]
    # without CPU work a wait is free at once, and ties go to the earlier stage
    assert list_schedule(2, 2, [1.0] * 2, [0.0] * 2) == ["c0.0", "w0.0", "c1.0", "w1.0", "c0.1", "c1.1"]


def test_the_cost_model_picks_micro_batches_only_where_they_pay():
    from fiddlerc.api import plan

    def micro(hw, batch):
        return plan(MIXTRAL, "24GiB", context=512, batch=batch, hardware=hw).target.micro_batches

    assert micro("cpu-2core", 4) == 1  # one CPU runs both tiers: overlap cannot pay
    assert micro("quadro-rtx6000-skylake48", 1) == 1
    assert micro("quadro-rtx6000-skylake48", 4) == 2  # CPU experts of one half under the other's GPU work
    # batch 8: each half already hits every expert, so splitting would read every CPU expert twice
    assert micro("quadro-rtx6000-skylake48", 8) == 1
    p = plan(MIXTRAL, "24GiB", context=512, batch=4, hardware="quadro-rtx6000-skylake48")
    assert len(p.target.schedule) == 2 * 33 + 2 * 32 and p.target.schedule[:3] == ("c0.0", "c1.0", "w0.0")
    with pytest.raises(OptionError, match="between 1 and --batch"):
        plan(MIXTRAL, "24GiB", context=512, batch=2, micro_batches=3)


def compile_micro(arch, tmp_path, batch=4, micro=2):
    from fiddlerc.tools.demo import write_model

    src = write_model(tiny_config(arch), tmp_path / arch, seed=0, router_scale=8.0)
    probe = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64)
    half = len(probe.plan.moe_layers) * (probe.plan.moe_layers[0].num_experts // 2)
    art = fiddlerc.compile(
        src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=half, batch=batch, micro_batches=micro
    )
    return src, art


@pytest.mark.parametrize("arch", sorted(set(VERIFIED) - TUPLE_BLOCKS))
def test_micro_batched_forward_equals_hugging_face(arch, tmp_path, hf_model):
    src, art = compile_micro(arch, tmp_path)
    assert "def forward_micro" in art.module_text and "self.wait(" in art.module_text
    ids = torch.randint(3, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        got = model(ids)
    with torch.no_grad():
        torch.testing.assert_close(got, hf_model(src)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_micro_batched_generation_equals_hugging_face(arch, tmp_path, hf_model):
    src, _ = compile_micro(arch, tmp_path)
    ref = hf_model(src)
    ids = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding in the first micro-batch
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        assert torch.equal(model.generate(ids, mask, max_new_tokens=8, ignore_eos=True), hf_greedy(ref, ids, mask, 8))
        # an odd batch does not split: it runs plainly and still equals the reference
        assert torch.equal(
            model.generate(ids[:3], mask[:3], max_new_tokens=5, ignore_eos=True), hf_greedy(ref, ids[:3], mask[:3], 5)
        )
        # beam search: 2 prompts x 2 beams = 4 rows, one prompt's beams per micro-batch
        beams = model.generate(ids[:2], mask[:2], max_new_tokens=6, num_beams=2, ignore_eos=True)
    config = ref.generation_config
    old, config.num_beams = config.num_beams, 2
    try:
        assert torch.equal(beams, hf_greedy(ref, ids[:2], mask[:2], 6))
    finally:
        config.num_beams = old


def test_micro_batched_trace_overlaps_one_micro_batch_with_the_other(tmp_path):
    _, _ = compile_micro("mixtral", tmp_path)
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    with fiddlerc.load(tmp_path / "out", device="cpu", trace=tmp_path / "t.json") as model:
        model(ids)
    import json

    events = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    names = [e["name"] for e in events]
    assert "L0 combine fast part" in names and "L0 combine CPU part" in names


def test_a_block_that_returns_a_tuple_is_refused(tmp_path):
    with pytest.raises(OptionError, match="returns a tuple: use --micro-batches 1"):
        compile_micro("gpt_oss", tmp_path)
