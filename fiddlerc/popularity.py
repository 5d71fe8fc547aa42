"""Expert popularity: how many tokens the router sends to each expert, measured on real text.

One JSON format, read and written here. Its core is the format of the Fiddler repository's
measurements (shared/data/mixtral-8x7b-popularity/), so those files load as they are:

    {"total_input_tokens": N, "expert_popularity": [[count per expert] per MoE layer]}

`fiddlerc popularity` writes a superset: the decoder layer of each row (`layers`), `top_k`, the split
by phase (`phases`: prompt tokens vs generated tokens, each also by position bucket,
`position_buckets`), co-selection counts per layer (`coselection`:
how many tokens picked both expert i and expert j), what was run (`source`) and whether the run
was interrupted. Readers need only the core; everything is checked, and a mismatch with the model
names the layer and the sizes.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from fiddlerc.errors import OptionError

FORMAT = "fiddlerc-popularity/1"
POSITION_BOUNDS = (0, 16, 64, 256, 1024, 4096)  # position buckets: [0, 16), [16, 64), ..., [4096, inf)


@dataclass(frozen=True)
class Popularity:
    name: str  # file name, for plans and reports
    sha256: str  # of the file's bytes
    counts: tuple[tuple[int, ...], ...]  # [MoE layer in order][expert]: routed tokens
    layers: tuple[int, ...] | None  # decoder layer of each row, when the file says
    total_input_tokens: int

    def use(self, row: int, top_k: int) -> tuple[float, ...]:
        """Expected share of a token's k picks per expert of one MoE layer (sums to k, as uniform k/E)."""
        c = self.counts[row]
        total = sum(c)
        if total == 0:
            return tuple(top_k / len(c) for _ in c)
        return tuple(top_k * x / total for x in c)

    def check_against(self, moe_layers) -> None:
        """Refuse counts measured on another model: layer count, decoder layers and experts per layer."""
        where = f"popularity {self.name}"
        if len(self.counts) != len(moe_layers):
            raise OptionError(
                f"{where} has {len(self.counts)} MoE layers, the model has {len(moe_layers)}: "
                "it was measured on another model; run `fiddlerc popularity` on this one"
            )
        if self.layers is not None and tuple(self.layers) != tuple(ml.layer for ml in moe_layers):
            raise OptionError(f"{where} covers decoder layers {list(self.layers)}, the model's MoE layers are "
                              f"{[ml.layer for ml in moe_layers]}: run `fiddlerc popularity` on this model")  # fmt: skip
        for row, ml in zip(self.counts, moe_layers, strict=True):
            if len(row) != ml.num_experts:
                raise OptionError(
                    f"{where}: layer {ml.layer} has counts for {len(row)} experts, the model has {ml.num_experts}"
                )


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _matrix(value, what: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) and r for r in value):
        raise OptionError(f"{what} must be a non-empty list of non-empty lists of counts")
    if not all(_is_count(x) for r in value for x in r):
        raise OptionError(f"{what} must hold non-negative integers")
    return tuple(tuple(r) for r in value)


def popularity_from_json(text: str | bytes, name: str = "popularity") -> Popularity:
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise OptionError(f"popularity {name} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or "expert_popularity" not in data:
        raise OptionError(f"popularity {name} must be an object with expert_popularity [layer][expert] counts")
    counts = _matrix(data["expert_popularity"], f"popularity {name}: expert_popularity")
    total = data.get("total_input_tokens", 0)
    if not _is_count(total):
        raise OptionError(f"popularity {name}: total_input_tokens must be a non-negative integer")
    layers = data.get("layers")
    if layers is not None and (
        not isinstance(layers, list) or len(layers) != len(counts) or not all(_is_count(x) for x in layers)
    ):
        raise OptionError(f"popularity {name}: layers must list one decoder layer per row of expert_popularity")
    raw = text.encode() if isinstance(text, str) else text
    return Popularity(name, hashlib.sha256(raw).hexdigest(), counts, tuple(layers) if layers else None, total)


def load_popularity(path: str | Path) -> Popularity:
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"popularity file {p} does not exist: give the JSON that `fiddlerc popularity` wrote")
    return popularity_from_json(p.read_bytes(), p.name)


@dataclass
class RoutingCounter:
    """Counts routing decisions as the placed experts report them (`PlacedExperts.observer`), one
    sequence at a time: per phase (prompt tokens vs generated ones), per position bucket within
    each phase, and co-selection within a token."""

    layers: tuple[int, ...]
    num_experts: tuple[int, ...]
    top_k: int = 0

    def __post_init__(self) -> None:
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.counts = {ph: [[0] * n for n in self.num_experts] for ph in ("prefill", "decode")}
        self.tokens = {"prefill": 0, "decode": 0}
        self.cosel = [[[0] * n for _ in range(n)] for n in self.num_experts]
        buckets = len(POSITION_BOUNDS)
        self.by_position = {
            ph: [[[0] * n for n in self.num_experts] for _ in range(buckets)] for ph in ("prefill", "decode")
        }
        self._next_position: dict[int, int] = {}

    def new_sequence(self) -> None:
        """The next call of each layer is a prompt's prefill at position 0; later ones are decode steps."""
        self._next_position = {}

    def __call__(self, layer: int, picks) -> None:
        """`picks` [tokens, k]: the experts each token was routed to, on the host."""
        phase = "decode" if layer in self._next_position else "prefill"
        start = self._next_position.get(layer, 0)
        self._next_position[layer] = start + picks.shape[0]
        row = self.row[layer]
        self.top_k = picks.shape[1]
        counts, cosel = self.counts[phase][row], self.cosel[row]
        for t, token in enumerate(picks.tolist()):
            bucket = bisect_right(POSITION_BOUNDS, start + t) - 1
            at = self.by_position[phase][bucket][row]
            for i, a in enumerate(token):
                counts[a] += 1
                at[a] += 1
                for b in token[i + 1 :]:
                    cosel[a][b] += 1
                    cosel[b][a] += 1
        if row == 0:
            self.tokens[phase] += picks.shape[0]

    def to_json(self, source: dict, interrupted: bool, model_info: dict) -> str:
        both = [[p + d for p, d in zip(pr, dr, strict=True)] for pr, dr in zip(*self.counts.values(), strict=True)]
        doc = {
            "format": FORMAT,
            **model_info,
            "top_k": self.top_k,
            "total_input_tokens": self.tokens["prefill"],
            "generated_tokens": self.tokens["decode"],
            "layers": list(self.layers),
            "expert_popularity": both,
            "phases": {
                ph: {
                    "tokens": self.tokens[ph],
                    "expert_popularity": self.counts[ph],
                    "by_position": self.by_position[ph],
                }
                for ph in self.counts
            },
            "position_buckets": [[a, b] for a, b in zip(POSITION_BOUNDS, [*POSITION_BOUNDS[1:], None], strict=True)],
            "coselection": self.cosel,
            "source": source,
            "interrupted": interrupted,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=False) + "\n"


def coverage(placement: dict[tuple[int, int], bool], counts, layers) -> float:
    """Share of routed tokens that land on fast-tier experts, each layer normalised by its own total
    and the layers averaged. `placement[(layer, expert)]` is True on the fast tier."""
    shares = []
    for layer, row in zip(layers, counts, strict=True):
        total = sum(row)
        if total:
            shares.append(sum(c for e, c in enumerate(row) if placement[(layer, e)]) / total)
    return sum(shares) / len(shares) if shares else 0.0
