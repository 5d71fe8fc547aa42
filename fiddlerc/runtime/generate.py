"""Token generation over a compiled forward: KV cache, greedy or sampling, stop on EOS.

Positions follow Hugging Face `generate`: with an attention mask (left padding), a token's
position is the number of real tokens before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

Forward = Callable[[torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor]


class MicroBatchCache:
    """One KV cache per micro-batch of a micro-batched model. The first forward decides: a batch that
    splits evenly runs micro-batched (rows [i*R, (i+1)*R) in cache i), any other runs plainly in cache 0."""

    def __init__(self, caches: list) -> None:
        self.caches = caches
        self.split: bool | None = None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: every micro-batch holds whole prompts' beams, so rows move within one."""
        if not self.split:
            self.caches[0].reorder_cache(beam_idx)
            return
        rows = beam_idx.shape[0] // len(self.caches)
        for i, cache in enumerate(self.caches):
            local = beam_idx[i * rows : (i + 1) * rows] - i * rows
            if bool((local < 0).any()) or bool((local >= rows).any()):
                raise RuntimeError("a beam moved across micro-batches: split the batch by whole prompts")
            cache.reorder_cache(local)


def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
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
    on_token: Callable[[torch.Tensor], None] | None = None,
    **sampling,
) -> torch.Tensor:
    """Prompt + new tokens [B, T + n], as Hugging Face returns them (finished rows padded); `on_token`
    sees each step's tokens [B] as they come. `sampling`: the keywords of `steps`."""
    out = input_ids
    for token in steps(forward, new_cache, input_ids, attention_mask, max_new_tokens, **sampling):
        out = torch.cat([out, token[:, None]], dim=-1)
        if on_token is not None:
            on_token(token)
    return out


@torch.no_grad()
def steps(
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
) -> Iterator[torch.Tensor]:
    """Each step's next token per row [B], as it is picked (rows that finished get `pad_token_id`); stops
    after `max_new_tokens` or when every row has produced an EOS."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    padded = not bool(attention_mask.all())  # without padding, decode steps pass no mask (see below)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_token_ids), dtype=input_ids.dtype, device=device)

    cache = new_cache()
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    logits = forward(input_ids, cache, attention_mask, position_ids)[:, -1, :]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = pick(logits, do_sample, temperature, top_p, generator)
        if eos.numel():
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        yield token
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        # No padding: the new token sees every cached one, which is what no mask means (and what spares the
        # generated attention a mask per step: fiddlerc.runtime.attention.causal_mask).
        logits = forward(token[:, None], cache, attention_mask if padded else None, position_ids)[:, -1, :]


@torch.no_grad()
def beam_search(
    forward: Forward,
    new_cache: Callable[[], object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int,
    *,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
) -> torch.Tensor:
    """Beam search with Hugging Face `generate(num_beams=...)`'s rules, so both return the same tokens:
    each step keeps the best `max(2, 1 + n_eos) * num_beams` continuations of all beams by summed log
    probability; those among the first `num_beams` that end (EOS or the length limit) become finished
    hypotheses scored `logprob / generated_length ** length_penalty`; the best `num_beams` unfinished
    ones run on, with the KV cache reordered to follow them; the search stops when no running beam can
    beat the worst finished one (HF's default heuristic), or at the length limit. Returns the best
    finished hypothesis per prompt [B, T + n], shorter ones filled as HF fills them."""
    if max_new_tokens < 1 or num_beams < 1:
        raise ValueError("beam search needs max_new_tokens >= 1 and num_beams >= 1")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    max_length = prompt_len + max_new_tokens
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos_token_ids)) * num_beams
    first_beams = torch.arange(keep, device=device) < num_beams
    fill = (pad_token_id or eos_token_ids[0]) if eos_token_ids else -1

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(device=device, dtype=torch.long).repeat_interleave(num_beams, dim=0)
    ids = input_ids.repeat_interleave(num_beams, dim=0)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = new_cache()
    logits = forward(ids, cache, mask, position_ids)[:, -1, :]

    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = ids.view(batch, num_beams, prompt_len)
    running_scores = torch.zeros((batch, num_beams), device=device)
    running_scores[:, 1:] = -1e9  # the beams start identical: expand only the first
    done_seqs = running.clone()
    done_scores = torch.full((batch, num_beams), -1e9, device=device)
    done_len = torch.zeros((batch, num_beams), dtype=torch.long, device=device)  # generated tokens
    is_done = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
    offsets = torch.arange(batch, device=device)[:, None] * num_beams
    cur = prompt_len
    while True:
        vocab = logits.shape[-1]
        logp = torch.log_softmax(logits.float(), dim=-1).view(batch, num_beams, vocab) + running_scores[:, :, None]
        top_lp, top_idx = torch.topk(logp.view(batch, -1), k=keep)
        origin, token = top_idx // vocab, top_idx % vocab
        cand = torch.take_along_dim(running, origin[:, :, None], dim=1)
        cand[:, :, cur] = token
        ends = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
        ends = ends | (cur + 1 >= max_length)

        # the best unfinished continuations run on
        live_lp = top_lp - 1e9 * ends.float()
        nxt = torch.topk(live_lp, k=num_beams).indices
        running = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        running_scores = torch.take_along_dim(live_lp, nxt, dim=1)
        beam_idx = (torch.take_along_dim(origin, nxt, dim=1) + offsets).view(-1)

        # finished hypotheses: merge the new ones and keep the best num_beams
        just = ends & first_beams[None, :]
        score = top_lp / ((cur + 1 - prompt_len) ** length_penalty)
        score = score - 1e9 * (is_done.all(-1, keepdim=True) & early_stopping).float()
        score = score - 1e9 * (~can_improve).float() - 1e9 * (~just).float()
        merged_scores = torch.cat([done_scores, score], dim=1)
        best = torch.topk(merged_scores, k=num_beams).indices
        done_seqs = torch.take_along_dim(torch.cat([done_seqs, cand], dim=1), best[:, :, None], dim=1)
        done_scores = torch.take_along_dim(merged_scores, best, dim=1)
        new_len = torch.full_like(token, cur + 1 - prompt_len)
        done_len = torch.take_along_dim(torch.cat([done_len, new_len], dim=1), best, dim=1)
        is_done = torch.take_along_dim(torch.cat([is_done, just], dim=1), best, dim=1)

        cur += 1
        best_possible = running_scores[:, :1] / ((cur - prompt_len) ** length_penalty)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, -1e9)
        can_improve = can_improve & (best_possible > worst_done).any(dim=-1, keepdim=True)
        if not bool(can_improve.any()) or (bool(is_done.all()) and early_stopping) or bool(ends.all()):
            break
        cache.reorder_cache(beam_idx)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        logits = forward(running[:, :, cur - 1].reshape(-1, 1), cache, mask, position_ids)[:, -1, :]

    out_len = prompt_len + int(done_len[:, 0].max())
    return done_seqs[:, 0, :out_len]
