"""Fixtures: tiny random-weight MoE models written with save_pretrained and loaded from disk."""

from __future__ import annotations

import shutil

import pytest
import torch

from fiddlerc.tools.demo import write_model

VOCAB = 128


def _configs():
    import transformers as T

    c = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    return {  # tiny fp32 configs, one per family; MoE in every layer but where a family keeps dense layers first
        "mixtral": lambda: T.MixtralConfig(**c, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**c, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**c, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8),
        "qwen3_next": lambda: T.Qwen3NextConfig(**c, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                                linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
        "olmoe": lambda: T.OlmoeConfig(**c, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        "flex_olmo": lambda: T.FlexOlmoConfig(**c, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        "deepseek_v2": lambda: T.DeepseekV2Config(**{**c, "num_key_value_heads": 4}, **mla, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
                                                  num_experts_per_tok=2, first_k_dense_replace=0, n_group=2, topk_group=1, topk_method="group_limited_greedy"),
        "deepseek_v3": lambda: T.DeepseekV3Config(**{**c, "num_key_value_heads": 4, "num_hidden_layers": 3}, **mla, intermediate_size=48, moe_intermediate_size=24, first_k_dense_replace=1,
                                                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1),
        "glm4_moe": lambda: T.Glm4MoeConfig(**c, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0, head_dim=8, n_group=1, topk_group=1),
        "dots1": lambda: T.Dots1Config(**c, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0, head_dim=8, n_group=1, topk_group=1),
        "gpt_oss": lambda: T.GptOssConfig(**c, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=16),
        "phimoe": lambda: T.PhimoeConfig(**c, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "granitemoe": lambda: T.GraniteMoeConfig(**c, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "granitemoeshared": lambda: T.GraniteMoeSharedConfig(**c, intermediate_size=24, shared_intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "ernie4_5_moe": lambda: T.Ernie4_5_MoeConfig(**c, intermediate_size=48, moe_intermediate_size=24, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0, head_dim=8),
        "minimax": lambda: T.MiniMaxConfig(**c, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["linear_attention", "full_attention"]),
        "minimax_m2": lambda: T.MiniMaxM2Config(**c, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
        "hunyuan_v1_moe": lambda: T.HunYuanMoEV1Config(**c, intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8),
        "jetmoe": lambda: T.JetMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8, intermediate_size=24, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "dbrx": lambda: T.DbrxConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # DBRX needs rope_theta to build, and clip_qkv for its clamp
                                     ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}),
        "llama4_text": lambda: T.Llama4TextConfig(**c, intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=1),
        "llama": lambda: T.LlamaConfig(**c, intermediate_size=48),  # dense: not MoE
    }  # fmt: skip


def tiny_config(model_type: str):
    """A tiny random-weight config of one family (fp32; routers made decisive when written)."""
    return _configs()[model_type]()


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


@pytest.fixture
def model_copy(model_dirs, tmp_path):
    """A private copy of the mixtral test model, for tests that edit or break the folder."""
    dst = tmp_path / "model"
    shutil.copytree(model_dirs("mixtral"), dst)
    return dst


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


def hf_greedy(ref, ids, mask, new_tokens: int):
    """Hugging Face greedy `generate` with EOS disabled: an EOS id no token has (min_new_tokens would instead
    mask EOS out of the logits, and a None eos_token_id falls back to the model's)."""
    import copy

    config = copy.deepcopy(ref.generation_config)
    config.eos_token_id, config.pad_token_id, config.do_sample = 10**9, 0, False
    return ref.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=new_tokens)


def padded_prompts():
    """Two prompts of 10 tokens, the first left-padded by 3 (the mask path of the generated attention)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def decode_logits(model, ids: torch.Tensor, tokens=(5, 9, 2, 7)) -> list[torch.Tensor]:
    """Teacher-forced decode of a compiled model: the last logits of a prefill of `ids` [1, T], then of each of
    `tokens` fed one at a time (the one-token path), from one cache."""
    cache, n = model.new_cache(), ids.shape[1]
    with torch.no_grad():
        out = [model._run(ids, cache, None, torch.arange(n)[None])[:, -1]]
        for i, token in enumerate(tokens):
            out.append(model._run(torch.tensor([[token]]), cache, None, torch.tensor([[n + i]]))[:, -1])
    return out


def mapping_of(ptr: int) -> tuple[str, int]:
    """(file name or "", AnonHugePages kB) of the mapping of this process that holds address `ptr`."""
    found, name, huge = False, "", 0
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if found:
                break
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            found, name = lo <= ptr < hi, head[5] if len(head) > 5 else ""
        elif found and head[0] == "AnonHugePages:":
            huge = int(head[1])
    assert found, f"no mapping holds {ptr:#x}"
    return name, huge
