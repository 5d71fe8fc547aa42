"""Token generation over a compiled forward: KV cache, greedy or sampling, stop on EOS.

Positions follow Hugging Face `generate`: with an attention mask (left padding), a token's
position is the number of real tokens before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row of logits [B, V]."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), -float("inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(
    forward: Forward,
    new_cache: Callable[[], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prompt + new tokens [B, T + n], as Hugging Face returns them (finished rows padded)."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_token_ids), dtype=input_ids.dtype, device=device)

    cache = new_cache()
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    logits = forward(input_ids, cache, attention_mask, position_ids)[:, -1, :]
    out = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = _pick(logits, do_sample, temperature, top_p, generator)
        if eos.numel():
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        out = torch.cat([out, token[:, None]], dim=-1)
        if on_token is not None:
            on_token(token)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        logits = forward(token[:, None], cache, attention_mask, position_ids)[:, -1, :]
    return out
