"""The base class of every generated module.py (`class CompiledForward(GeneratedForward)`).

module.py holds what the plan decides: the straight-line forward, the generated attention written
with the model's numbers, the micro-batched forward. This class holds what is the same for every
model: the Hugging Face model and config the generated code reads (`self.m`, `self._cfg`), the
runtime objects the loader sets (`placed`, `dense`), and the helpers the generated code calls as
`self.<name>(...)`.
"""

from __future__ import annotations

import torch
from torch import nn

from fiddlerc.runtime import attention, norms


class GeneratedForward(nn.Module):
    def __init__(self, model: nn.Module, config) -> None:
        super().__init__()
        self.m = model
        self._cfg = config
        self.placed: dict = {}  # MoE layer -> its PlacedExperts (fiddlerc.runtime.experts), set by the loader
        self.dense: dict = {}  # layer -> its generated attention's AttentionWeights, set by the loader

    rms_norm = staticmethod(norms.rms_norm)
    causal_mask = staticmethod(attention.causal_mask)
    attend_one = None  # the loader sets attention.attend_one where the C kernels run (a CPU load)
    logits_last = False  # generation sets it for its calls: `logits_rows` keeps the last position only
    logits_at: torch.Tensor | None = None  # or these positions (a packed prefill's prompts' last tokens)

    def logits_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, T, H] lm_head reads: every position, the last one where generating, or
        those of `logits_at`."""
        if self.logits_at is not None:
            return x[:, self.logits_at]
        return x[:, -1:] if self.logits_last else x

    @staticmethod
    def micro_rows(x: torch.Tensor | None, micro_batch: int, count: int) -> torch.Tensor | None:
        """Micro-batch `micro_batch` of `count` equal parts of a batch's rows; a tensor of one row (position
        ids shared by the batch) or None is the same for every micro-batch."""
        if x is None or x.shape[0] == 1:
            return x
        rows = x.shape[0] // count
        return x[micro_batch * rows : (micro_batch + 1) * rows]

    def flatten_modules(self) -> None:
        """Every submodule of the model also in its parent's instance dictionary, so that module.py's attribute
        chains (`getattr(self.m.model.layers, "0").input_layernorm.weight`) are plain lookups rather than
        nn.Module.__getattr__'s fallback, about half a microsecond each and some 150 a decode step (a narrow
        model's step: ~20 % of it). The loader calls this once everything is bound and installed; assigning a
        module through nn.Module's __setattr__ afterwards replaces the entry as usual, while deleting a child
        or setting it to None would leave it behind (nothing in fiddlerc or transformers' forward does)."""
        for module in self.modules():
            for name, child in module._modules.items():
                if child is not None:
                    module.__dict__[name] = child

    def defer(self, micro_batch: int | None) -> None:
        """From here on MoE calls leave their CPU experts running for `micro_batch` (None: wait as usual)."""
        for placed in self.placed.values():
            placed.deferred = micro_batch

    def wait(self, layer: int, micro_batch: int, out: torch.Tensor) -> torch.Tensor:
        """The block output of a deferred MoE call plus its CPU experts' part."""
        part = self.placed[layer].finish(micro_batch)
        return out if part is None else out + part.view_as(out).to(out.dtype)

    def run_micro(self, input_ids, caches, attention_mask, position_ids) -> torch.Tensor:
        """`forward_micro` (generated where the plan micro-batches), leaving no MoE call deferred if it raises."""
        try:
            return self.forward_micro(input_ids, caches, attention_mask, position_ids)
        finally:
            self.defer(None)
