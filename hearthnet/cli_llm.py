"""`hearthnet llm ...`: the node's language model, through the control socket."""

from __future__ import annotations

import argparse
from typing import Any

from hearthnet.cli_control import call, common, out


def cmd_generate(args: argparse.Namespace) -> int:
    """`llm generate`: generate text with the node's model, optionally with an adapter."""
    body = {
        "prompt": args.prompt,
        "adapter_sha": args.adapter,
        "max_new_tokens": args.max_new_tokens,
    }
    res = call(args, "llm.generate", body, 600.0)
    return out(args, res, res["text"])


def add_commands(sub: Any) -> None:
    """Add the `llm` subcommands to the CLI's parser."""
    llm = sub.add_parser("llm", help="the node's language model")
    ls = llm.add_subparsers(dest="llm_command", required=True, metavar="COMMAND")
    p = ls.add_parser("generate", help="generate a reply to a prompt")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--adapter", help="adapter SHA to use (default: the node default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(handler=cmd_generate)
