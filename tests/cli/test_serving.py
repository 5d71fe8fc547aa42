"""serve from the command line: what it refuses before it listens (tests/serve runs it live)."""

from fiddlerc.cli import main


def test_serve_refuses_a_model_folder_and_a_missing_template_in_one_line(tiny_with_tokenizer, tmp_path, capsys):
    assert main(["serve", str(tiny_with_tokenizer)]) == 2
    err = capsys.readouterr().err
    assert "is a model folder, not a compiled one" in err and err.count("\n") == 1
    assert main(["serve", str(tmp_path), "--chat-template", "/no/such.jinja"]) == 2
    assert "cannot read --chat-template /no/such.jinja" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--prefill-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--prefill-tokens must be at least 1" in err and err.count("\n") == 1
