import json
import re
import subprocess
import sys

import pytest
import torch

from fiddlerc.cli import main


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    cfg = tiny_config("mixtral")
    cfg.vocab_size = 258
    return write_model(cfg, tmp_path_factory.mktemp("cli") / "model", router_scale=8.0, tokenizer=True)


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compile", "/nonexistent/model", "-o", "/tmp/x", "--gpu-memory", "1GiB"], "does not exist"),
        (["compile", "MODEL", "-o", "OUT", "--gpu-memory", "lots"], "invalid size"),
        (["compile", "MODEL", "-o", "OUT", "--gpu-memory", "1KiB"], "give at least"),
        (["report", "/nonexistent/out"], "not a compiled folder"),
    ],
)
def test_errors_exit_2_with_one_line(argv, message, tiny_with_tokenizer, tmp_path, capsys):
    argv = [str(tiny_with_tokenizer) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_and_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fiddlerc", "demo", "--dir", str(tmp_path / "demo"), "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "experts on cuda:0" in proc.stdout and "4 tokens in" in proc.stdout
    assert (tmp_path / "demo" / "compiled" / "plan.json").is_file()


def test_plan_from_config_alone_predicts_tokens_per_second(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).parent / "data" / "mixtral-8x7b-config.json"
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


def test_calibrate_then_compile_with_auto(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["calibrate", str(tiny_with_tokenizer), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "calibrated-" in out and "roofline fit error" in out
    assert (
        main(
            [
                "compile",
                str(tiny_with_tokenizer),
                "-o",
                str(tmp_path / "out"),
                "--gpu-memory",
                "1MiB",
                "--context",
                "64",
                "--hardware",
                "auto",
            ]
        )
        == 0
    )
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["target"]["hardware"].startswith("calibrated-") and plan["prediction"]["decode_ms_per_token"] > 0


def test_dense_model_exits_2_from_the_cli(tmp_path, capsys):
    from fiddlerc.cli import main
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    src = write_model(tiny_config("llama"), tmp_path / "llama")
    assert main(["compile", str(src), "-o", str(tmp_path / "out"), "--gpu-memory", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM has no mixture-of-experts block" in err and "DeepSeek-V3" in err


def test_popularity_is_also_spelt_profile_as_in_the_fiddler_paper():
    from fiddlerc.cli import build_parser

    for spelling in ("popularity", "profile"):
        args = build_parser().parse_args([spelling, "model", "--data", "d.txt", "-o", "pop.json"])
        assert args.func.__name__ == "_cmd_popularity" and (args.model_dir, args.out) == ("model", "pop.json")


def test_a_ctrl_c_whose_exception_was_swallowed_still_stops_a_run_at_the_next_token():
    import torch

    from fiddlerc import cli

    class Tokenizer:
        def encode(self, text):
            return [1, 2]

        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

    class Model:
        def generate(self, ids, on_token, **kwargs):
            for step in range(5):
                if step == 2:
                    try:  # what a finalizer does with an exception raised while it runs: drops it
                        cli._on_sigint(2, None)
                    except KeyboardInterrupt:
                        pass
                on_token(torch.tensor([7]))

    cli._interrupted.clear()
    with pytest.raises(KeyboardInterrupt):
        cli._generate_text(Model(), Tokenizer(), "hi", 5, 0.0, None)
    assert cli._interrupted.is_set()
    assert cli.main(["plan", "--list-hardware"]) == 0 and not cli._interrupted.is_set()  # each command starts afresh


def test_help_version_and_the_hardware_list_answer_without_importing_torch():
    code = (
        "import contextlib, io, sys\n"
        "from fiddlerc.cli import main\n"
        "for argv in (['--version'], ['--help'], ['compile', '--help'], ['plan', '--list-hardware']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr
