"""The command as a whole: its parser, one-line errors, and a fast --help."""

import subprocess
import sys

import pytest

from fiddlerc.cli import main


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


def test_dense_model_exits_2_from_the_cli(tmp_path, capsys):
    from fiddlerc.cli import main
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    src = write_model(tiny_config("llama"), tmp_path / "llama")
    assert main(["compile", str(src), "-o", str(tmp_path / "out"), "--gpu-memory", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM has no mixture-of-experts block" in err and "DeepSeek-V3" in err


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
