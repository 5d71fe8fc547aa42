"""Measured popularity in SGLang's logical_count format."""

import json
from pathlib import Path

import pytest

import fiddlerc
from fiddlerc.api import plan as make_plan
from fiddlerc.cli import main
from fiddlerc.errors import OptionError
from fiddlerc.popularity import load_popularity, popularity_from_json
from fiddlerc.tools.export import sglang_logical_count

DATA = Path(__file__).parents[1] / "data"


def test_mixtrals_measured_counts_are_its_32_layers_by_8_experts():
    pop_file = sorted((DATA / "mixtral-8x7b-popularity").glob("*.json"))[0]
    plan = make_plan(DATA / "mixtral-8x7b-config.json", "24GiB", context=512)
    pop = load_popularity(pop_file)
    doc = sglang_logical_count(plan, pop)
    assert set(doc) == {"logical_count"}
    counts = doc["logical_count"]
    assert len(counts) == 32 and {len(r) for r in counts} == {8}  # [num_hidden_layers, num_local_experts]
    assert counts == [list(r) for r in pop.counts] and all(isinstance(x, int) for r in counts for x in r)


def test_dense_layers_keep_zero_rows_at_their_decoder_index(model_dirs, tmp_path):
    art = fiddlerc.compile(model_dirs("deepseek_v3"), tmp_path / "out", gpu_memory="1GiB", context=64)
    layers = [ml.layer for ml in art.plan.moe_layers]
    assert layers == [1, 2]  # first_k_dense_replace=1: layer 0 is dense
    counts = [[3, 0, 1, 9, 4, 4, 2, 1], [1, 1, 1, 1, 1, 1, 1, 13]]
    pop_file = tmp_path / "pop.json"
    pop_file.write_text(json.dumps({"total_input_tokens": 10, "expert_popularity": counts, "layers": layers}))
    out = tmp_path / "new" / "sglang.json"
    assert main(["export", str(tmp_path / "out"), "--to", "sglang", "--popularity", str(pop_file), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["logical_count"] == [[0] * 8, *counts]
    with pytest.raises(OptionError, match="MoE layers"):
        sglang_logical_count(
            art.plan, popularity_from_json(json.dumps({"total_input_tokens": 1, "expert_popularity": [[1] * 8]}))
        )


def test_export_without_counts_says_how_to_measure_them(model_dirs, tmp_path, capsys):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    assert main(["export", str(tmp_path / "out"), "--to", "sglang", "-o", str(tmp_path / "x.json")]) == 2
    assert "give --popularity FILE" in capsys.readouterr().err
