"""Routing counts gathered by running the model on text (`fiddlerc popularity`), and placement from them."""

import json
from pathlib import Path

import pytest
import torch

FAVOURITE = {1: 5, 2: 3}  # decoder layer -> the expert its router is biased towards


DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models send each token to a few experts.",
    "fiddlerc compiles them for a GPU that is too small.",
]


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """A tiny DeepSeek-V3 (layer 0 dense, layers 1-2 MoE, 8 experts top-2) whose load-balancing bias
    makes one expert per MoE layer win every token, with a byte tokenizer; and a data file."""
    from transformers import AutoModelForCausalLM

    from fiddlerc.tools.demo import byte_tokenizer
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("biased")
    config = tiny_config("deepseek_v3")
    config.vocab_size = 258
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer, expert in FAVOURITE.items():
            bias = model.model.layers[layer].mlp.gate.e_score_correction_bias
            bias.zero_()
            bias[expert] = 5.0  # sigmoid scores are in (0, 1): +5 wins the group and the top-k
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    data = root / "docs.txt"
    data.write_text("\n".join(DOCS) + "\n")
    return root / "model", data


def hand_count(model_dir, data):
    """Hugging Face's own routing: the top-k indices its experts modules are called with."""
    from transformers import AutoModelForCausalLM

    from fiddlerc.model.tokenizer import load_tokenizer

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    counts = {layer: [0] * 8 for layer in FAVOURITE}

    def hook(layer):
        def pre(module, args):
            for e in args[1].reshape(-1).tolist():
                counts[layer][e] += 1

        return pre

    for layer in FAVOURITE:
        ref.model.layers[layer].mlp.experts.register_forward_pre_hook(hook(layer))
    tok = load_tokenizer(model_dir)
    with torch.no_grad():
        for line in Path(data).read_text().splitlines():
            ref(input_ids=torch.tensor([tok.encode(line)]))
    return [counts[layer] for layer in sorted(FAVOURITE)]


def test_routing_counts_equal_a_hand_count(biased, tmp_path):
    from fiddlerc.tools.count_routing import count_routing

    model_dir, data = biased
    run = count_routing(model_dir, data, tmp_path / "p.json", progress=False)
    doc = json.loads(run.path.read_text())
    assert (run.documents, run.interrupted, doc["interrupted"]) == (3, False, False)
    assert doc["layers"] == [1, 2] and doc["top_k"] == 2
    assert doc["expert_popularity"] == hand_count(model_dir, data)
    tokens = doc["total_input_tokens"]
    for row, layer in enumerate(doc["layers"]):
        counts = doc["expert_popularity"][row]
        assert sum(counts) == 2 * tokens and counts[FAVOURITE[layer]] == tokens  # every token picks it
        co = doc["coselection"][row]
        assert all(co[i][i] == 0 and co[i] == [co[j][i] for j in range(8)] for i in range(8))  # symmetric
        assert [sum(r) for r in co] == counts  # top-2: each pick co-occurs with exactly one other
    assert doc["phases"]["decode"]["tokens"] == 0 and doc["phases"]["decode"]["expert_popularity"] == [[0] * 8] * 2
    # by position: the prompts are 44-59 tokens long, so only the buckets [0, 16) and [16, 64) fill
    by_pos = doc["phases"]["prefill"]["by_position"]
    assert doc["position_buckets"][:3] == [[0, 16], [16, 64], [64, 256]]
    assert sum(by_pos[0][0]) == 2 * 16 * 3 and sum(by_pos[1][0]) == 2 * (tokens - 48)
    assert all(sum(by_pos[b][0]) == 0 for b in range(2, len(by_pos)))
    summed = [[sum(col) for col in zip(*(by_pos[b][r] for b in range(len(by_pos))), strict=True)] for r in range(2)]
    assert summed == doc["expert_popularity"]


def test_decode_tokens_are_counted_apart_and_max_tokens_stops(biased, tmp_path):
    from fiddlerc.tools.count_routing import count_routing

    model_dir, data = biased
    doc = json.loads(count_routing(model_dir, data, tmp_path / "p.json", decode_tokens=3).path.read_text())
    assert doc["generated_tokens"] == 3 * 2  # generating 3 tokens takes 2 decode steps after the prefill
    prefill, decode = doc["phases"]["prefill"], doc["phases"]["decode"]
    assert prefill["tokens"] == doc["total_input_tokens"] and decode["tokens"] == 6
    assert decode["expert_popularity"][0][FAVOURITE[1]] == 6
    lengths = [len(d.encode()) for d in DOCS]  # the byte tokenizer: a token per byte
    in_bucket = [sum(16 <= n + i < 64 for i in range(2)) for n in lengths]  # generated tokens at n, n + 1
    assert sum(decode["by_position"][1][0]) == 2 * sum(in_bucket)
    both = zip(prefill["expert_popularity"], decode["expert_popularity"], strict=True)
    assert [[p + d for p, d in zip(a, b, strict=True)] for a, b in both] == doc["expert_popularity"]
    short = count_routing(model_dir, data, tmp_path / "q.json", max_tokens=10)
    assert (short.tokens, json.loads(short.path.read_text())["total_input_tokens"]) == (10, 10)


def test_ctrl_c_keeps_what_was_counted(biased, tmp_path, monkeypatch):
    from fiddlerc.cli import main
    from fiddlerc.loader import model as loader

    model_dir, data = biased
    calls = []
    real = loader.CompiledModel.__call__

    def interrupted_on_the_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(loader.CompiledModel, "__call__", interrupted_on_the_second)
    assert main(["popularity", str(model_dir), "--data", str(data), "-o", str(tmp_path / "p.json")]) == 130
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["interrupted"] is True and doc["source"]["documents"] == 1
    assert sum(doc["expert_popularity"][0]) == 2 * doc["total_input_tokens"] > 0


def test_placement_moves_the_popular_experts_to_the_gpu(biased, tmp_path):
    import fiddlerc
    from fiddlerc.tools.count_routing import count_routing

    model_dir, data = biased
    pop = count_routing(model_dir, data, tmp_path / "p.json").path
    uniform = fiddlerc.compile(model_dir, tmp_path / "u", gpu_memory="1GiB", context=64, fast_experts=2)
    placed = fiddlerc.compile(model_dir, tmp_path / "o", gpu_memory="1GiB", context=64, fast_experts=2, popularity=pop)
    fast = {(e.layer, e.expert) for e in placed.plan.experts if e.device != "cpu"}
    assert fast == set(FAVOURITE.items())
    assert fast != {(e.layer, e.expert) for e in uniform.plan.experts if e.device != "cpu"}
    assert placed.plan.target.popularity == "p.json" and len(placed.plan.target.popularity_sha256) == 64
    assert all("(measured)" in e.reason for e in placed.plan.experts)
    with fiddlerc.load(tmp_path / "o", device="cpu") as model:  # and it runs
        model(torch.tensor([[5, 6, 7]]))
        assert model.routing_stats()["hit_rate"] >= 0.5  # the favourite is one of each token's two picks
