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


def test_conversations_need_a_chat_template_given_or_the_tokenizers_own(tmp_path):
    from fiddlerc.errors import OptionError
    from fiddlerc.model.tokenizer import chat_text, has_chat_template

    tok = byte_tokenizer()
    tok.chat_template = None
    said = [{"role": "user", "content": "hi"}]
    assert not has_chat_template(tok)
    with pytest.raises(OptionError, match="no chat template"):
        chat_text(tok, said)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert has_chat_template(tok, template) and chat_text(tok, said, template) == "<user>hi<assistant>"
    tok.chat_template = template
    assert has_chat_template(tok) and chat_text(tok, said) == "<user>hi<assistant>"
