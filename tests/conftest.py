"""Fixtures: tiny random-weight MoE models written with save_pretrained and loaded from disk."""

from __future__ import annotations

import pytest
import torch

from fiddlerc.demo import write_model

VOCAB = 128


def tiny_config(arch: str):
    """Tiny configs of the three foundation architectures (fp32, decisive routers set at write time)."""
    from transformers import DeepseekV3Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mixtral":
        return MixtralConfig(
            **common,
            intermediate_size=48,
            num_hidden_layers=2,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_hidden_layers=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            **common, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, first_k_dense_replace=1,
            num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    if arch == "llama":  # dense: not MoE
        return LlamaConfig(**common, intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2)
    raise KeyError(arch)


ARCHS = ["mixtral", "qwen2_moe", "deepseek_v3"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> folder, written once per session."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = write_model(tiny_config(arch), root / arch, seed=0, router_scale=8.0)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """arch folder -> the Hugging Face reference model loaded from disk (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get
