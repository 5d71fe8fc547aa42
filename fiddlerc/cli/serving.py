"""serve and export: the compiled model behind an OpenAI-compatible HTTP API (fiddlerc.serve), and its
measured expert popularity for engines that serve it over many GPUs (fiddlerc.tools.export)."""

from __future__ import annotations

import argparse
import sys

from fiddlerc.cli.text import chat_template_text


def _cmd_serve(args: argparse.Namespace) -> int:
    from fiddlerc.api import load
    from fiddlerc.errors import OptionError
    from fiddlerc.serve import serve

    if args.prefill_tokens < 1 or args.queue < 0:
        raise OptionError("--prefill-tokens must be at least 1 and --queue at least 0")
    template = chat_template_text(args.chat_template)
    model = load(args.out, device=args.device, model_dir=args.model)
    name = args.served_model_name or model.artifact.folder.path.name
    plan = model.plan.target

    def ready(host: str, port: int) -> None:
        print(
            f"fiddlerc serve: {name} at http://{host}:{port}/v1 (up to {plan.batch_size} sequences at once, "
            f"{plan.context_tokens} tokens each; Ctrl-C or SIGTERM stops it)",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(model, host=args.host, port=args.port, name=name, api_key=args.api_key, chat_template=template,
              queue_size=args.queue, prefill_tokens=args.prefill_tokens, ready=ready)  # fmt: skip
    finally:
        model.close()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from fiddlerc.artifact import read_plan
    from fiddlerc.errors import OptionError
    from fiddlerc.files import output_file, write_atomic
    from fiddlerc.popularity import load_popularity
    from fiddlerc.tools.export import sglang_logical_count

    path = output_file(args.output, "-o")
    plan = read_plan(args.out)
    if args.popularity is None:
        raise OptionError(
            "export writes measured expert popularity: give --popularity FILE (`fiddlerc popularity MODEL_DIR --data "
            "TEXT -o FILE` measures it)"
        )
    doc = sglang_logical_count(plan, load_popularity(args.popularity))
    write_atomic(path, json.dumps(doc) + "\n")
    layers = len(doc["logical_count"])
    print(f"wrote {path}: routed-token counts of {layers} decoder layers x {len(doc['logical_count'][0])} experts; "
          f"serve with SGLang's --init-expert-location {path}")  # fmt: skip
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve a compiled model over an OpenAI-compatible HTTP API")
    s.add_argument("out", help="the compiled folder")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its folder's)")
    s.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template instead of the model's")
    s.add_argument("--queue", type=int, default=64, help="requests that may wait beyond the running batch (then 503)")
    s.add_argument("--prefill-tokens", type=int, default=512, metavar="N",
                   help="prompt tokens prefilled a turn between decode steps; longer prompts go in chunks of N")  # fmt: skip
    s.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    s.add_argument("--model", default=None, help="model folder, if it moved since compiling")
    s.set_defaults(func=_cmd_serve)

    e = sub.add_parser("export", help="measured expert popularity for SGLang's expert-parallel placement")
    e.add_argument("out", help="the compiled folder")
    e.add_argument("--to", choices=["sglang"], required=True, help="the engine whose format to write")
    e.add_argument("--popularity", default=None, metavar="FILE", help="the counts (`fiddlerc popularity` writes them)")
    e.add_argument("-o", "--output", required=True, help="the file to write (JSON)")
    e.set_defaults(func=_cmd_export)
