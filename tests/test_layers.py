"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and a generated module.py runs
without importing the compiler."""

import subprocess
import sys
from pathlib import Path

import fiddlerc

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    # import-linter is a test dependency (README's test command installs it): missing, this fails
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def test_generated_module_imports_no_compiler(model_dirs, tmp_path):
    art = fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, batch=2,
                           fast_experts=2, micro_batches=2)  # fmt: skip
    code = (
        "import sys; text = open(sys.argv[1]).read(); exec(compile(text, 'module.py', 'exec'), {}); "
        "print(sorted(m for m in sys.modules if m.startswith('fiddlerc')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(art.path / "module.py")], capture_output=True, text=True, check=True
    )
    loaded = eval(run.stdout)  # a list of module names
    assert "fiddlerc.runtime.forward" in loaded
    assert not [m for m in loaded if not m.startswith("fiddlerc.runtime") and m not in (
        "fiddlerc", "fiddlerc.errors", "fiddlerc.version", "fiddlerc.measure", "fiddlerc.files", "fiddlerc.hardware",
        "fiddlerc.chrome_trace", "fiddlerc.plan", "fiddlerc.quant_format", "fiddlerc.runtime")], loaded  # fmt: skip
