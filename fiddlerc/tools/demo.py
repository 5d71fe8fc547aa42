"""Small models written to disk the way a user's model folder looks.

Used by `fiddlerc demo` and by the tests: a transformers config class, random weights (or a few
hundred training steps on text every machine has, `train_model`), `save_pretrained`, and a
byte-level tokenizer, so the whole path runs with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fiddlerc.model.families import find_layout

# A chat template in the usual shape (a header per turn, </s> ends one), so `fiddlerc chat` and the
# server's chat endpoint run on the demo and test models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOS_ID, EOS_ID = 256, 257  # byte_tokenizer's <s> and </s>


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <s> and </s>, which ends a chat turn): any text
    round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.chat_template = CHAT_TEMPLATE
    return out


def write_model(
    config,
    path: str | Path,
    *,
    seed: int = 0,
    router_scale: float = 1.0,
    tokenizer: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Build a random-weight causal LM from `config`, save it with `save_pretrained`, return the folder.

    With `tokenizer`, the folder also gets `byte_tokenizer()`, whose <s> and </s> become the model's BOS and
    EOS (its vocabulary must hold them: 258 tokens at least).
    `router_scale` redraws every MoE router's matrix with `router_scale` times the usual 0.02 std,
    making routing decisive (top-k choices far from ties), so tiny numeric differences cannot flip an
    expert choice in tests. `dtype` builds (and saves) the weights in it directly (default fp32).
    """
    from transformers import AutoModelForCausalLM

    if tokenizer:
        config.bos_token_id, config.eos_token_id = BOS_ID, EOS_ID
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    with torch.no_grad():
        for module in model.modules():
            if router_scale != 1.0 and find_layout(module, config.hidden_size) is not None:
                gate = getattr(module, "gate", None) or getattr(module, "router", None)
                if isinstance(gate, torch.nn.Module):
                    for name, p in [*gate.named_parameters(), *gate.named_buffers()]:
                        if p.ndim == 2 and p.shape[0] > 1:  # the routing matrix, whatever the family calls it
                            p.normal_(0.0, 0.02 * router_scale)  # fresh: some families initialise it to zeros
                        elif name.endswith("e_score_correction_bias"):  # load-balancing bias: start neutral
                            p.zero_()
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer:
        byte_tokenizer().save_pretrained(path)
    return path


def demo_config():
    """A small Mixtral-shaped model: 4 layers, 8 experts top-2, about 55 MiB of fp32 weights."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=258,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        tie_word_embeddings=False,
    )


def offline_text() -> bytes:
    """Real text that every machine has: the Python standard library's sources, in a fixed order."""
    import sysconfig

    return b"".join(f.read_bytes() for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))


def train_model(config, path: str | Path, text: bytes | torch.Tensor, *, steps: int = 300, seed: int = 0) -> Path:
    """Train a small causal LM from `config` on `text`, as bytes (token id = byte, so the vocabulary must
    hold 256) or as token ids, deterministically for a seed, and save it with `save_pretrained`. For
    numerics that random weights cannot show: a trained model's activations and weights have the
    structure quantization meets in real models. A few hundred steps on two cores take under a minute
    at the widths the tests use."""
    from transformers import AutoModelForCausalLM

    if isinstance(text, bytes):
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.long)
    else:
        data = text.to(torch.long)
    if int(data.max()) >= config.vocab_size:
        raise ValueError(
            f"the text has token id {int(data.max())}: the config's vocabulary needs {int(data.max()) + 1} ids"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    seq, batch = 128, 16
    model.train()
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i : i + seq] for i in start.tolist()])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    path = Path(path)
    model.save_pretrained(path)
    return path
