"""What the loader's tests share: a small Mixtral compiled with two experts on the fast tier."""

import pytest

import fiddlerc


@pytest.fixture(scope="module")
def compiled(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "out"
    fiddlerc.compile(model_dirs("mixtral"), out, gpu_memory="1GiB", context=32, fast_experts=2)
    return out
