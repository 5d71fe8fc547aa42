"""Random-weight model folders written the way a user's looks: deterministic, decisive routers, a byte tokenizer."""

import pytest
import torch
from safetensors.torch import load_file

from fiddlerc.model.families import find_layout
from fiddlerc.model.tokenizer import load_tokenizer
from fiddlerc.tools.demo import byte_tokenizer, demo_config, write_model
from tests.conftest import tiny_config


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = write_model(tiny_config("mixtral"), tmp_path / "a", seed=3)
    b = write_model(tiny_config("mixtral"), tmp_path / "b", seed=3)
    c = write_model(tiny_config("mixtral"), tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (c / "config.json").read_text()


def test_router_scale_widens_only_the_routers_and_zeroes_load_balancing_bias(tmp_path):
    config = tiny_config("deepseek_v3")
    plain = load_file(write_model(config, tmp_path / "plain", seed=0) / "model.safetensors")
    scaled = load_file(write_model(config, tmp_path / "scaled", seed=0, router_scale=8.0) / "model.safetensors")
    routers = [k for k in plain if k.endswith("mlp.gate.weight")]
    assert routers and all(scaled[k].std() > 4 * plain[k].std() for k in routers)
    biases = [k for k in scaled if k.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(scaled[k], torch.zeros_like(scaled[k])) for k in biases)
    assert torch.equal(
        plain["model.layers.0.self_attn.o_proj.weight"], scaled["model.layers.0.self_attn.o_proj.weight"]
    )


def test_byte_tokenizer_round_trips_any_text_and_is_saved_with_the_model(tmp_path):
    tok = byte_tokenizer()
    text = "naïve café, 東京 ✓"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    folder = write_model(demo_config(), tmp_path / "demo", tokenizer=True)
    assert load_tokenizer(folder)(text)["input_ids"] == ids


def test_the_demo_model_is_a_small_mixtral_with_eight_experts_top_two():
    from transformers import AutoModelForCausalLM

    config = demo_config()
    model = AutoModelForCausalLM.from_config(config)
    blocks = [m for m in model.modules() if find_layout(m, config.hidden_size) is not None]
    assert len(blocks) == config.num_hidden_layers == 4
    assert {find_layout(b, config.hidden_size).num_experts(b) for b in blocks} == {8}
    mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert 50 < mib < 60  # "about 55 MiB of fp32 weights", as its docstring says


def test_a_dtype_builds_and_saves_the_weights_in_it(tmp_path):
    folder = write_model(tiny_config("qwen2_moe"), tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}


def test_training_lowers_the_loss_and_is_deterministic(tmp_path):
    import transformers as T
    from safetensors.torch import load_file as load

    from fiddlerc.tools.demo import offline_text, train_model

    text = offline_text()
    assert len(text) > 10**6 and b"def " in text
    config = T.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=256)  # fmt: skip
    a = train_model(config, tmp_path / "a", text[:200_000], steps=40, seed=1)
    b = train_model(config, tmp_path / "b", text[:200_000], steps=40, seed=1)
    assert all(torch.equal(x, load(b / "model.safetensors")[k]) for k, x in load(a / "model.safetensors").items())
    model = T.AutoModelForCausalLM.from_pretrained(a).eval()
    fresh = T.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([list(text[300_000:300_256])])
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < fresh(input_ids=ids, labels=ids).loss - 1.0
    with pytest.raises(ValueError, match="vocabulary needs 1[0-9][0-9] ids"):
        train_model(T.MixtralConfig(vocab_size=64), tmp_path / "c", text[:1000], steps=1)  # source text has "y": 121
