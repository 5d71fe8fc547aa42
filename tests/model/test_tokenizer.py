"""The model folder's own tokenizer, or a clear error saying how to do without one."""

import pytest

from fiddlerc.errors import ModelFolderError
from fiddlerc.model.tokenizer import load_tokenizer
from fiddlerc.tools.demo import byte_tokenizer


def test_the_folders_tokenizer_is_loaded(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok("fiddlerc")["input_ids"]) == "fiddlerc" and tok.eos_token == "</s>"


def test_a_folder_without_a_tokenizer_names_both_fixes(model_dirs):
    with pytest.raises(
        ModelFolderError, match="has no usable tokenizer.*add the model's tokenizer files.*token ids"
    ) as e:
        load_tokenizer(model_dirs("mixtral"))
    assert "\n" not in str(e.value)  # one line, as the CLI prints it
