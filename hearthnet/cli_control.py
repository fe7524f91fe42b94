"""What every operator command shares: one call through the node's control socket, output
for people or JSON (`--json`), and the `--config`/`--json` options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hearthnet.config import load_config
from hearthnet.constants import CONTROL_SOCKET_NAME
from hearthnet.control import control_call


def call(args: argparse.Namespace, name: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    """Call capability `name` on the node whose config is `--config`."""
    config = load_config(Path(args.config))
    return control_call(config.data_dir / CONTROL_SOCKET_NAME, name, body, None, timeout)


def out(args: argparse.Namespace, data: Any, text: str) -> int:
    """Print `text`, or `data` as JSON under `--json`; the command's exit status."""
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def common(p: argparse.ArgumentParser) -> None:
    """The options every operator command takes."""
    p.add_argument("--config", required=True, help="node config file")
    p.add_argument("--json", action="store_true", help="JSON output")
