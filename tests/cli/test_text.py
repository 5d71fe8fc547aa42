"""run, chat, demo: generating text from the command line."""

import json
import subprocess
import sys

import pytest
import torch

from fiddlerc.cli import main


def test_demo_and_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fiddlerc", "demo", "--dir", str(tmp_path / "demo"), "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "experts on cuda:0" in proc.stdout and "4 tokens in" in proc.stdout
    assert (tmp_path / "demo" / "compiled" / "plan.json").is_file()


def test_a_ctrl_c_whose_exception_was_swallowed_still_stops_a_run_at_the_next_token():
    from fiddlerc.cli import common, text

    class Completion:
        completion_tokens = 0

        def __iter__(self):
            for step in range(5):
                if step == 2:
                    try:  # what a finalizer does with an exception raised while it runs: drops it
                        common.on_sigint(2, None)
                    except KeyboardInterrupt:
                        pass
                yield "x"

        def close(self):
            pass

    class Model:
        def stream(self, prompt, max_new_tokens, **kwargs):
            return Completion()

    common.interrupted.clear()
    with pytest.raises(KeyboardInterrupt) as stop:
        text.stream_answer(Model(), "hi", 5, {})
    assert stop.value.args == ("xx",)  # what was shown before it stopped
    assert common.interrupted.is_set()
    assert main(["plan", "--list-hardware"]) == 0 and not common.interrupted.is_set()  # each command starts afresh


@pytest.fixture(scope="module")
def compiled(tiny_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "out"
    assert main(["compile", str(tiny_with_tokenizer), "-o", str(out), "--gpu-memory", "0", "--context", "256"]) == 0
    return out


def _fiddlerc(*args, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fiddlerc", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_run_reads_its_prompt_from_the_option_a_file_or_standard_input_alike(compiled, tmp_path):
    import fiddlerc
    from fiddlerc.model.tokenizer import prompt_ids

    with fiddlerc.load(compiled, device="cpu") as model:
        ids = torch.tensor([prompt_ids(model.tokenizer, "tell me")])
        want_ids = model.generate(ids, max_new_tokens=6)[0, ids.shape[1] :].tolist()
        want = model.tokenizer.decode([t for t in want_ids if t not in model.eos_token_ids], skip_special_tokens=True)
    (tmp_path / "p.txt").write_text("tell me")
    for args, stdin in [
        (["--prompt", "tell me"], ""),
        (["--prompt-file", str(tmp_path / "p.txt")], ""),
        ([], "tell me"),
    ]:
        run = _fiddlerc("run", str(compiled), "--max-new-tokens", "6", *args, stdin=stdin)
        assert run.returncode == 0, run.stderr
        assert run.stdout == want + "\n" and "tokens/s" in run.stderr


def test_run_chat_writes_the_conversation_with_the_chat_template(compiled):
    import fiddlerc

    with fiddlerc.load(compiled, device="cpu") as model:
        convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        want = model.stream(convo, 6).text()
        assert want != model.stream("hi", 6).text()  # the template changed what the model read
    run = _fiddlerc("run", str(compiled), "--chat", "--system", "be brief", "--prompt", "hi", "--max-new-tokens", "6")
    assert run.returncode == 0, run.stderr
    assert run.stdout == want + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "a", "--prompt-file", "f"], "give the prompt once"),
        (["--prompt-file", "/no/such/file"], "cannot read --prompt-file /no/such/file"),
        (["--prompt", "a", "--num-beams", "2", "--temperature", "0.8"], "beam search, which does not sample"),
        (["--prompt", "a", "--top-p", "0.9"], "--temperature 0 is greedy"),
        (["--prompt", "a", "--system", "x"], "add --chat"),
        (["--prompt", "a", "--chat", "--chat-template", "/no/t.jinja"], "cannot read --chat-template"),
    ],
)
def test_run_refuses_what_it_cannot_do_in_one_line(compiled, args, message, capsys):
    assert main(["run", str(compiled), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_chat_keeps_the_conversation_resets_it_and_quits(compiled):
    import fiddlerc

    with fiddlerc.load(compiled, device="cpu") as model:
        first = model.stream([{"role": "user", "content": "hi"}], 5).text()
        second = model.stream(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "more"},
            ],
            5,
        ).text()
        fresh = model.stream([{"role": "user", "content": "more"}], 5).text()
    run = _fiddlerc("chat", str(compiled), "--max-new-tokens", "5", stdin="hi\nmore\n/reset\nmore\n/nope\n/exit\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout == f">>> {first}\n>>> {second}\n>>> >>> {fresh}\n>>> >>> "
    assert "the conversation is cleared" in run.stderr and "unknown command /nope" in run.stderr


def test_chat_without_a_chat_template_says_how_to_give_one(tiny_with_tokenizer, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_with_tokenizer, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["compile", str(model), "-o", str(tmp_path / "out"), "--gpu-memory", "0", "--context", "64"]) == 0
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "out")]) == 2
    assert "no chat template: give one with --chat-template FILE" in capsys.readouterr().err
