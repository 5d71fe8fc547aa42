"""A KV cache of several sequences that start and end at different times: the server's running batch.

`SlotCache` holds one preallocated key and value tensor per attention layer, [slots, kv_heads, context,
head_dim], and each slot is one sequence. `view(slot)` is that sequence alone, shaped like the
transformers StaticCache that generated attention (fiddlerc.runtime.attention) writes into: a prompt's
prefill and a lone sequence's decode (one C call a layer) run on it unchanged. A decode step of several
sequences runs on the SlotCache itself over slots [0, n): each sequence's new key and value go to its own
position, and `mask` lets each query see its own sequence's filled prefix only. Running sequences keep
the first slots (`move` fills a freed one with the last), so a step's keys are one view, no gather.
Several prompts prefill in one forward as one packed sequence (`prefill`, a PackedPrefill): the weights
are read once for all their tokens, each prompt's keys go to its own empty slot, and a block-diagonal
causal mask keeps each prompt's queries to its own keys.

Only generated attention reads it (the server batches steps only where every attention layer is generated).
"""

from __future__ import annotations

import torch


class SlotLayer:
    """One attention layer of one slot, with the attributes generated attention reads of a StaticCache layer."""

    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values  # [1, kv_heads, context, head_dim] views of the SlotCache's rows
        self.max_cache_len = keys.shape[2]
        self.fiddlerc_length = 0  # tokens filled
        # transformers' token counter, which the one-sequence writers (kv_append, attend_one) advance; nothing
        # reads it for a slot (SlotView.get_seq_length reads fiddlerc_length), so a batched step leaves it
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, k: torch.Tensor, v: torch.Tensor) -> None:
        raise AssertionError("a slot's tensors are allocated with its SlotCache")


class SlotView:
    """One slot as a batch-1 cache (the `layers` generated attention indexes)."""

    def __init__(self, layers: list[SlotLayer]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].fiddlerc_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].fiddlerc_length

    def clear(self) -> None:
        for lay in self.layers:
            lay.fiddlerc_length = 0

    def chunk_mask(self, t: int) -> torch.Tensor:
        """[1, 1, t, length + t] bool: which keys each of `t` new tokens appended to the filled prefix sees (the
        prefix, and the new ones up to itself): the next chunk of a prompt prefilled in chunks."""
        n = self.length
        visible = torch.arange(n + t)[None, :] <= n + torch.arange(t)[:, None]
        return visible[None, None].to(self.layers[0].keys.device)


class SlotCache:
    """`slots` sequences of up to `context` tokens each, for the attention layers of `config`."""

    def __init__(self, config, slots: int, context: int, dtype: torch.dtype, device: torch.device) -> None:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (slots, kv_heads, context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.slots, self.context = slots, context
        self.views = [
            SlotView([SlotLayer(k[s : s + 1], v[s : s + 1]) for k, v in zip(self.keys, self.values, strict=True)])
            for s in range(slots)
        ]
        self.rows = 0  # a batched step runs slots [0, rows) (begin_step)
        self.positions = torch.zeros(0, dtype=torch.long)  # where each of them appends this step

    def view(self, slot: int) -> SlotView:
        return self.views[slot]

    def prefill(self, slots: list[int], lengths: list[int]) -> PackedPrefill:
        """The cache of one forward that prefills prompts of `lengths` tokens into the empty `slots`."""
        return PackedPrefill(self, slots, lengths)

    def lengths(self, rows: int) -> torch.Tensor:
        """Tokens filled in each of slots [0, rows)."""
        return torch.tensor([self.views[s].length for s in range(rows)], dtype=torch.long)

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s sequence into slot `dst` (which it overwrites); `src` is free afterwards."""
        n = self.views[src].length
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :n].copy_(k[src, :, :n])
            v[dst, :, :n].copy_(v[src, :, :n])
        for a, b in zip(self.views[dst].layers, self.views[src].layers, strict=True):
            a.fiddlerc_length = b.fiddlerc_length
        self.views[src].clear()

    def begin_step(self, rows: int) -> torch.Tensor:
        """Start a batched step of slots [0, rows): their positions (tokens filled), which are also the
        position ids of the tokens they append."""
        self.rows, self.positions = rows, self.lengths(rows)
        if int(self.positions.max()) + 1 > self.context:
            raise RuntimeError(f"the KV cache holds {self.context} tokens: the context this model was compiled for")
        return self.positions

    def mask(self) -> torch.Tensor:
        """[rows, 1, 1, keys] bool: which keys each sequence's query sees in this step (its own filled prefix
        and the token it appends)."""
        keys = int(self.positions.max()) + 1
        visible = torch.arange(keys)[None, :] <= self.positions[:, None]
        return visible[:, None, None, :].to(self.keys[0].device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new key and value per sequence of a batched step (k, v [rows, kv_heads, 1, head_dim]) written at
        each one's position; every sequence's keys and values [rows, kv_heads, keys, head_dim], as views."""
        if k.shape[0] != self.rows or k.shape[2] != 1:
            raise RuntimeError(f"a batched step appends one token to each of {self.rows} slots, got {tuple(k.shape)}")
        positions = self.positions
        rows = torch.arange(self.rows, device=k.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[rows, :, positions.to(k.device)] = k[:, :, 0]
        values[rows, :, positions.to(k.device)] = v[:, :, 0]
        self.advance(layer)
        n = int(positions.max()) + 1
        return keys[: self.rows, :, :n], values[: self.rows, :, :n]

    def advance(self, layer: int) -> None:
        """Count the token this step appended to each of its slots in `layer` (append, or the C attention
        that writes it in place: fiddlerc.runtime.attention.attend_rows)."""
        for s in range(self.rows):
            self.views[s].layers[layer].fiddlerc_length += 1


class PackedPrefill:
    """Prompts that start in empty slots, prefilled together as one sequence of all their tokens (input ids and
    position ids [1, sum of lengths], the prompts one after the other, each prompt's positions from 0): the
    cache a forward of them takes. `ends` are the positions of each prompt's last token, whose logits are
    the prompts' next-token logits."""

    def __init__(self, cache: SlotCache, slots: list[int], lengths: list[int]) -> None:
        if len(slots) != len(lengths) or not slots or min(lengths) < 1:
            raise ValueError("a packed prefill takes one or more prompts of one token or more, a slot each")
        if max(lengths) > cache.context:
            raise RuntimeError(f"the KV cache holds {cache.context} tokens: the context this model was compiled for")
        for s in slots:
            if cache.views[s].length:
                raise RuntimeError(f"slot {s} holds a sequence already: a packed prefill fills empty slots")
        self.cache, self.slots, self.lengths = cache, list(slots), list(lengths)
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        self.starts, self.ends = bounds[:-1], bounds[1:] - 1
        self.tokens = int(bounds[-1])

    def position_ids(self) -> torch.Tensor:
        """[1, tokens]: each prompt's positions from 0."""
        return torch.cat([torch.arange(n) for n in self.lengths])[None]

    def mask(self) -> torch.Tensor:
        """[1, 1, tokens, tokens] bool: each query sees the keys of its own prompt up to itself."""
        seq = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        at = torch.arange(self.tokens)
        visible = (seq[:, None] == seq[None, :]) & (at[None, :] <= at[:, None])
        return visible[None, None].to(self.cache.keys[0].device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed keys and values (k, v [1, kv_heads, tokens, head_dim]) written into each prompt's slot;
        themselves returned, since each query reads only its own prompt's keys (the mask)."""
        if k.shape[0] != 1 or k.shape[2] != self.tokens:
            raise RuntimeError(f"a packed prefill appends {self.tokens} tokens in one row, got {tuple(k.shape)}")
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        for s, start, n in zip(self.slots, self.starts.tolist(), self.lengths, strict=True):
            keys[s, :, :n].copy_(k[0, :, start : start + n])
            values[s, :, :n].copy_(v[0, :, start : start + n])
            self.cache.views[s].layers[layer].fiddlerc_length = n
        return k, v
