"""A compiled tiny model for the server's tests: byte-level tokenizer with a chat template, fp32,
decisive routing, a KV cache reserved for 4 sequences of 1024 tokens."""

import pytest
import torch

import fiddlerc
from fiddlerc.model.tokenizer import prompt_ids


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_config("mixtral")
    cfg.vocab_size = 258
    src = write_model(cfg, root / "model", router_scale=8.0, tokenizer=True)
    fiddlerc.compile(src, root / "out", gpu_memory=0, context=1024, batch=4)
    return root / "out"


@pytest.fixture(scope="session")
def model(served):
    m = fiddlerc.load(served, device="cpu")
    yield m
    m.close()


def safe_tokens(model, prompt: str, new_tokens: int, gap: float = 1e-4) -> int:
    """How many greedy tokens of `prompt` stay the same under any kernel's rounding: the first `n` whose
    top-1 logit leads the top-2 by more than `gap` at each position (teacher-forced; batched and one-token
    kernels differ by about 1e-6 in these fp32 logits)."""
    ids = torch.tensor([prompt_ids(model.tokenizer, prompt)])
    out = model.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
    logits = model(out)[0, ids.shape[1] - 1 : -1]
    top = logits.topk(2, dim=-1).values
    close = ((top[:, 0] - top[:, 1]) <= gap).nonzero()
    return int(close[0]) if len(close) else new_tokens
