"""compile, report, plan: making a plan and reading it back."""

import json
import re

import torch

from fiddlerc.cli import main


def test_compile_report_run(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "compile",
                str(tiny_with_tokenizer),
                "-o",
                str(out),
                "--gpu-memory",
                "1MiB",
                "--context",
                "64",
                "--fast-experts",
                "3",
            ]
        )
        == 0
    )
    assert "3 of 8 experts on cuda:0" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dense weights" in text and "KV-cache reserve" in text and "3 of 8 experts on cuda:0" in text
    assert main(["report", str(out), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(e["device"] == "cuda:0" for e in data["experts"]) == 3
    assert main(["run", str(out), "--prompt", "hi there", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err


def test_plan_from_config_alone_predicts_tokens_per_second(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).parent.parent / "data" / "mixtral-8x7b-config.json"
    assert (
        main(
            ["plan", str(config), "--gpu-memory", "24GiB", "--hardware", "quadro-rtx6000-skylake48", "--context", "512"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "experts on cuda:0" in out
    assert re.search(r"predicted decode on quadro-rtx6000-skylake48 .*: \d+\.\d+ tokens/s", out)
    assert re.search(r"simulated on .*prefill \d+\.\d+ s, decode \d+\.\d+ tokens/s.*busy gpu .* cpu", out)
    assert "PAGES FROM DISK" not in out
    assert main(["plan", str(config)]) == 0  # no budget: this machine's GPU, or a CPU-only plan without one
    out = capsys.readouterr().out
    assert "hardware profile: quadro-rtx6000-skylake48" in out and "the default, as no --hardware was given" in out
    assert ("target: CPU only, no GPU tier" in out) != torch.cuda.is_available()
    # host memory too small for the CPU-tier experts: the plan says it pages, and the speed drops
    args = ["plan", str(config), "--gpu-memory", "24GiB", "--context", "512", "--output-tokens", "16"]
    assert main([*args, "--cpu-memory", "40GiB"]) == 0
    paged = capsys.readouterr().out
    assert "PAGES FROM DISK" in paged and "of 40.00 GiB (--cpu-memory)" in paged

    def speed(text):
        return float(re.search(r"predicted decode .*: (\d+\.\d+) tokens/s", text).group(1))

    assert speed(paged) < speed(out) / 2


def test_report_writes_html_where_asked_making_its_folder_and_refuses_a_folder_in_one_line(
    tiny_with_tokenizer, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(["compile", str(tiny_with_tokenizer), "-o", str(out), "--gpu-memory", "0", "--context", "64"]) == 0
    target = tmp_path / "new" / "r.html"
    assert main(["report", str(out), "--format", "html", "-o", str(target)]) == 0
    assert target.read_text().startswith("<!DOCTYPE html>") or "<html" in target.read_text()
    capsys.readouterr()
    for argv, message in [
        (["report", str(out), "--format", "html", "-o", str(tmp_path)], "is a folder"),
        (["report", str(out), "-o", str(target)], "add --format html"),
        (["bench", str(tiny_with_tokenizer)], "is a model folder, not a compiled one"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
