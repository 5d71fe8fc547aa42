"""What the command's tests share: a tiny model with the byte-level tokenizer."""

import pytest


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from fiddlerc.tools.demo import write_model
    from tests.conftest import tiny_config

    cfg = tiny_config("mixtral")
    cfg.vocab_size = 258
    return write_model(cfg, tmp_path_factory.mktemp("cli") / "model", router_scale=8.0, tokenizer=True)
