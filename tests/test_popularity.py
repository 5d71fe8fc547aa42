"""Expert popularity files: the shared Mixtral measurements, coverage, and malformed files refused."""

import json
from pathlib import Path

import pytest

from fiddlerc.errors import OptionError
from fiddlerc.popularity import coverage, load_popularity, popularity_from_json

SHARED = Path(__file__).parent / "data" / "mixtral-8x7b-popularity"
MIXTRAL = Path(__file__).parent / "data" / "mixtral-8x7b-config.json"


@pytest.mark.parametrize("name", sorted(p.name for p in SHARED.glob("*.json")))
def test_the_shared_mixtral_measurements_load(name):
    pop = load_popularity(SHARED / name)
    assert len(pop.counts) == 32 and {len(r) for r in pop.counts} == {8}
    assert len({sum(r) for r in pop.counts}) == 1  # every layer routes the same tokens, two picks each
    assert abs(sum(pop.use(0, 2)) - 2) < 1e-9


@pytest.mark.parametrize("variant", ["original", "instruct"])
def test_a_profile_of_one_subject_covers_more_of_another_than_uniform_placement(variant):
    """Mixtral-8x7B from its config, 24 GiB, the best 56 experts (what the paper fits beside the dense
    weights): placed from the US-history profile, it serves more of the computer-science prompts'
    routed tokens than uniform placement, each layer normalised by its own total."""
    from fiddlerc.api import plan

    history = SHARED / f"mixtral_8x7b_{variant}-high_school_us_history.json"
    cs = load_popularity(SHARED / f"mixtral_8x7b_{variant}-college_computer_science.json")
    layers = list(range(32))

    def fast(p):
        return {(e.layer, e.expert): e.device != "cpu" for e in p.experts}

    uniform = plan(MIXTRAL, "24GiB", context=512, fast_experts=56)
    profiled = plan(MIXTRAL, "24GiB", context=512, fast_experts=56, popularity=history)
    got, base = coverage(fast(profiled), cs.counts, layers), coverage(fast(uniform), cs.counts, layers)
    assert got > base and got > 56 / 256
    own = coverage(fast(profiled), load_popularity(history).counts, layers)
    assert 0.25 < own < 0.29  # the shared data's README: the best 56 take about 26-28 % of their own tokens


def test_popularity_from_another_model_or_malformed_is_a_clear_error(tmp_path):
    from fiddlerc.api import plan

    two_layers = tmp_path / "two.json"
    two_layers.write_text(json.dumps({"total_input_tokens": 4, "expert_popularity": [[1] * 8, [1] * 8]}))
    with pytest.raises(OptionError, match="has 2 MoE layers, the model has 32"):
        plan(MIXTRAL, "24GiB", context=512, popularity=two_layers)
    four = tmp_path / "four.json"
    four.write_text(json.dumps({"expert_popularity": [[1] * 4] * 32}))
    with pytest.raises(OptionError, match="layer 0 has counts for 4 experts, the model has 8"):
        plan(MIXTRAL, "24GiB", context=512, popularity=four)
    with pytest.raises(OptionError, match="does not exist"):
        load_popularity(tmp_path / "missing.json")
    for text, message in [
        ("{", "not valid JSON"),
        ("[]", "must be an object"),
        ('{"expert_popularity": [[1, -2]]}', "non-negative integers"),
        ('{"expert_popularity": [[1, 2]], "layers": [0, 1]}', "one decoder layer per row"),
        ('{"expert_popularity": [[1, 2]], "total_input_tokens": "many"}', "total_input_tokens"),
    ]:
        with pytest.raises(OptionError, match=message):
            popularity_from_json(text, "x.json")
