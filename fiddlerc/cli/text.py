"""run, chat and demo: the commands that generate text with a compiled model.

Answers stream as they are generated (CompiledModel.stream). A Ctrl-C stops `run` (exit 130); in `chat`
it stops the answer and the conversation goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fiddlerc.cli.common import interrupted
from fiddlerc.errors import OptionError
from fiddlerc.model.tokenizer import has_chat_template


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt's text: --prompt, --prompt-file (- is standard input), or standard input when it is not
    a terminal and neither is given."""
    if prompt is not None and prompt_file is not None:
        raise OptionError("give the prompt once: --prompt or --prompt-file, not both")
    if prompt_file == "-" or prompt == "-" or (prompt is None and prompt_file is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt_file is not None:
        try:
            return Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError(f"cannot read --prompt-file {prompt_file}: {e.strerror or e}") from None
    if prompt is None:
        raise OptionError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe it on standard input")
    return prompt


def sampling_options(temperature: float, top_p: float, seed: int | None, num_beams: int = 1) -> dict:
    """The generation keywords of --temperature, --top-p and --seed; conflicting ones refused."""
    if temperature < 0:
        raise OptionError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {top_p}")
    if num_beams < 1:
        raise OptionError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > 1 and (temperature > 0 or top_p < 1):
        raise OptionError(
            "--num-beams runs beam search, which does not sample: drop --temperature/--top-p, or --num-beams"
        )
    if temperature == 0 and top_p < 1:
        raise OptionError("--top-p samples, and --temperature 0 is greedy: give a --temperature above 0 with --top-p")
    return {"do_sample": temperature > 0, "temperature": temperature or 1.0, "top_p": top_p, "seed": seed}


def chat_template_text(path: str | None) -> str | None:
    """--chat-template FILE's Jinja text (None: the tokenizer's own)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"cannot read --chat-template {path}: {e.strerror or e}") from None


def stream_answer(model, prompt, max_new_tokens: int, sampling: dict, template: str | None = None):
    """Print the answer to `prompt` (text, or a conversation) as it comes; returns (text, tokens, seconds).
    A Ctrl-C raises KeyboardInterrupt with what was printed so far in its `args[0]`."""
    t0 = time.perf_counter()
    done = model.stream(prompt, max_new_tokens, chat_template=template, **sampling)
    shown: list[str] = []
    try:
        for piece in done:
            if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt something swallowed: stop here
                raise KeyboardInterrupt
            print(piece, end="", flush=True)
            shown.append(piece)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("".join(shown)) from None
    finally:
        done.close()
        print()
    return "".join(shown), done.completion_tokens, time.perf_counter() - t0


def _beam_answer(model, text: str, max_new_tokens: int, num_beams: int) -> tuple[str, int, float]:
    """Beam search's best answer, printed at the end (the best beam is known only then)."""
    import torch

    from fiddlerc.model.tokenizer import prompt_ids

    ids = torch.tensor([prompt_ids(model.tokenizer, text)])
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
    answer = model.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    print(answer)
    return answer, out.shape[1] - ids.shape[1], time.perf_counter() - t0


def _cmd_run(args: argparse.Namespace) -> int:
    from fiddlerc.api import load

    text = read_prompt(args.prompt, args.prompt_file)
    sampling = sampling_options(args.temperature, args.top_p, args.seed, args.num_beams)
    if args.system is not None and not args.chat:
        raise OptionError("--system starts a conversation: add --chat")
    if args.chat and args.num_beams > 1:
        raise OptionError("--num-beams and --chat: beam search answers plain prompts here; drop one of them")
    template = chat_template_text(args.chat_template)
    prompt = text
    if args.chat:
        prompt = [
            *([{"role": "system", "content": args.system}] if args.system else []),
            {"role": "user", "content": text},
        ]
    model = load(args.out, device=args.device, model_dir=args.model, trace=args.trace)
    try:
        if args.num_beams > 1:
            _, n, secs = _beam_answer(model, text, args.max_new_tokens, args.num_beams)
        else:
            _, n, secs = stream_answer(model, prompt, args.max_new_tokens, sampling, template)
        stats = model.routing_stats()
        print(
            f"[{n} tokens in {secs:.2f} s, {n / secs if secs else 0:.1f} tokens/s; fast-tier hit rate {stats['hit_rate']:.1%}]",
            file=sys.stderr,
        )
    finally:
        model.close()
    if args.trace:
        print(f"trace written to {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    return 0


CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer"


def _cmd_chat(args: argparse.Namespace) -> int:
    from fiddlerc.api import load

    sampling = sampling_options(args.temperature, args.top_p, args.seed)
    template = chat_template_text(args.chat_template)
    start = [{"role": "system", "content": args.system}] if args.system else []
    model = load(args.out, device=args.device, model_dir=args.model)
    try:
        if not has_chat_template(model.tokenizer, template):
            raise OptionError(
                "this model's tokenizer has no chat template: give one with --chat-template FILE, or use "
                "`fiddlerc run` with plain prompts"
            )
        print(f"fiddlerc chat with {model.artifact.folder.path.name}: {CHAT_HELP}", file=sys.stderr)
        history = list(start)
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            said = line.strip()
            if not said:
                continue
            if said in ("/exit", "/quit", "/bye"):
                return 0
            if said == "/reset":
                history = list(start)
                print("(the conversation is cleared)", file=sys.stderr)
                continue
            if said.startswith("/"):
                print(f"(unknown command {said.split()[0]}: {CHAT_HELP})", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            try:
                answer, _, _ = stream_answer(model, history, args.max_new_tokens, sampling, template)
            except KeyboardInterrupt as stop:
                interrupted.clear()
                answer = stop.args[0] if stop.args else ""
                print("(stopped)", file=sys.stderr)
            except OptionError as e:  # the conversation outgrew the context
                history.pop()
                print(f"({e}; /reset starts a new conversation)", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
    finally:
        model.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    from fiddlerc.api import compile, load
    from fiddlerc.compiler.report import report_text
    from fiddlerc.tools.demo import demo_config, write_model

    root = Path(args.dir)
    model_dir, out_dir = root / "model", root / "compiled"
    if not (model_dir / "config.json").is_file():
        print(f"writing a small random-weight Mixtral-shaped model to {model_dir}")
        write_model(demo_config(), model_dir, seed=0, router_scale=4.0, tokenizer=True)
    art = compile(model_dir, out_dir, args.gpu_memory, context=512)
    print(f"compiled to {out_dir}\n")
    print(report_text(art.plan))
    model = load(out_dir, device=args.device)
    try:
        print(f"prompt: {args.prompt!r}\ncompletion (random weights, so gibberish): ", end="")
        _, n, secs = stream_answer(model, args.prompt, args.max_new_tokens, sampling_options(0.0, 1.0, None))
        stats = model.routing_stats()
        print(
            f"{n} tokens in {secs:.2f} s; routed token-expert pairs: {stats['fast']} fast tier, {stats['cpu']} CPU worker"
        )
        print(f"chat with it: fiddlerc chat {out_dir}")
    finally:
        model.close()
    return 0


def _generation_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("out", help="the compiled folder")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to P")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template instead of the model's")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    p.add_argument("--model", default=None, help="model folder, if it moved since compiling")


def add_commands(sub) -> None:
    """run, chat and demo, on the command's subparsers."""
    g = sub.add_parser("run", help="generate text with a compiled model")
    _generation_options(g, 32)
    g.add_argument("--prompt", default=None, help="the prompt (- or none with a pipe: standard input)")
    g.add_argument("--prompt-file", default=None, metavar="FILE", help="read the prompt from FILE (-: standard input)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message, with the chat template")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (as Hugging Face's)")
    g.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace of the run there")
    g.set_defaults(func=_cmd_run)

    c = sub.add_parser("chat", help="talk with a compiled model: answers stream, the conversation is kept")
    _generation_options(c, 512)
    c.set_defaults(func=_cmd_chat)

    d = sub.add_parser("demo", help="build a small model, compile it under a budget, report, generate")
    d.add_argument("--dir", default="fiddlerc-demo", help="where to write the model and the compiled folder")
    d.add_argument("--gpu-memory", default="32MiB")
    d.add_argument("--prompt", default="Hello, fiddler!")
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--device", default=None)
    d.set_defaults(func=_cmd_demo)
