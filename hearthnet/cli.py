"""The `hearthnet` command.

Every failure prints `error [code]: message` on stderr and exits 2; a failed `events --verify`
exits 1. Nothing is changed on disk by a command that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hearthnet import __version__
from hearthnet.cli_fedlearn import add_commands
from hearthnet.config import NodeConfig, config_from_dict, load_config
from hearthnet.constants import (
    CONFIG_FILE_NAME,
    CONTROL_SOCKET_NAME,
    DEFAULT_LISTEN_PORT,
    EVENTLOG_FILE_NAME,
    KEY_FILE_NAME,
)
from hearthnet.control import control_call
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeIdentity

Handler = Callable[[argparse.Namespace], int]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def cmd_init(args: argparse.Namespace) -> int:
    """`hearthnet init`: create a data directory with a key and a starter config."""
    data_dir = Path(args.data_dir).resolve()
    name = args.name or data_dir.name
    config_path = data_dir / CONFIG_FILE_NAME
    key_path = data_dir / KEY_FILE_NAME
    for existing in (config_path, key_path):
        if existing.exists():
            raise HearthnetError(
                ErrorCode.CONFIG_INVALID, f"{existing} already exists; refusing to overwrite"
            )
    text = (
        "# hearthnet node configuration; every key is documented in config/node.example.toml\n"
        "[node]\n"
        f"name = {_toml_str(name)}\n"
        'data_dir = "."\n'
        f"network_id = {_toml_str(args.network_id)}\n\n"
        "[listen]\n"
        f"host = {_toml_str(args.host)}\n"
        f"port = {args.port}\n\n"
        "[experimental]\n"
        "fedlearn = false\n"
    )
    import tomllib

    config_from_dict(tomllib.loads(text), data_dir)  # validate before touching the disk
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = NodeIdentity.generate()
    identity.save(key_path)
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"node id: {identity.node_id}")
    print(f"config:  {config_path}")
    return 0


def _load(args: argparse.Namespace) -> tuple[NodeConfig, NodeIdentity]:
    config = load_config(Path(args.config))
    return config, NodeIdentity.load(config.key_path)


def cmd_id(args: argparse.Namespace) -> int:
    """`hearthnet id`: print this node's NodeID (what peers pin in `[[peers]] node_id`)."""
    _, identity = _load(args)
    print(identity.node_id)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """`hearthnet events`: print or `--verify` the node's log (read-only, beside a running node)."""
    config, identity = _load(args)
    path = config.data_dir / EVENTLOG_FILE_NAME
    if not path.exists():
        print("no events yet: the node has not been started", file=sys.stderr)
        return 0

    async def run() -> int:
        log = EventLog.open_readonly(path, identity.node_id)
        try:
            if args.verify:
                result = await log.verify()
                if args.json:
                    print(json.dumps(result.__dict__))
                elif result.ok:
                    print(f"ok: {result.checked} events verified")
                elif result.first_bad_seq is None:  # the head checkpoint, not an event
                    print(f"BROKEN: {result.reason}")
                else:
                    print(f"BROKEN at seq {result.first_bad_seq}: {result.reason}")
                return 0 if result.ok else 1
            after = args.after
            while page := await log.read(after, type_prefix=args.type):
                for event in page:
                    if args.json:
                        print(json.dumps(event.to_dict(), sort_keys=True))
                    else:
                        payload = event.payload_bytes.decode()
                        print(f"{event.seq:>6} {event.ts} {event.type:<32} {payload}")
                after = page[-1].seq
            return 0
        finally:
            await log.close()

    return asyncio.run(run())


def cmd_node_start(args: argparse.Namespace) -> int:
    """`hearthnet node start`: run the node in the foreground until a signal."""
    from hearthnet.node import run_node

    config = load_config(Path(args.config))
    if args.log_format:
        config = config.model_copy(
            update={"log": config.log.model_copy(update={"format": args.log_format})}
        )
    return run_node(config)


def _control(args: argparse.Namespace) -> Path:
    return load_config(Path(args.config)).data_dir / CONTROL_SOCKET_NAME


def cmd_node_status(args: argparse.Namespace) -> int:
    """`hearthnet node status`: the running node's peers and counters, via the control socket."""
    status = control_call(_control(args), "node.status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"node id:   {status['node_id']}")
    print(f"name:      {status['name']}")
    print(f"listening: {status['listen']}")
    features = ", ".join(f"{k}={'on' if v else 'off'}" for k, v in status["features"].items())
    print(f"features:  {features}")
    print(f"events:    {status['event_head']}")
    print(f"peers:     {len(status['peers'])}")
    for peer in status["peers"]:
        print(f"  {peer['node_id']}  {peer['remote']}")
    counters = status["counters"]
    if counters:
        print("counters:  " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    """`hearthnet call`: call any capability on the node or, with `--peer`, through it on a peer."""
    try:
        body = json.loads(args.json_body) if args.json_body else {}
    except json.JSONDecodeError as exc:
        raise HearthnetError(ErrorCode.BAD_REQUEST, f"--json is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HearthnetError(ErrorCode.BAD_REQUEST, "--json must be a JSON object")
    result = control_call(_control(args), args.capability, body, args.peer, args.timeout)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `hearthnet` command (fedlearn's come from cli_fedlearn)."""
    parser = argparse.ArgumentParser(
        prog="hearthnet", description="hearthnet peer-to-peer node daemon and operator tool"
    )
    parser.add_argument("--version", action="version", version=f"hearthnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a node identity and config file")
    p.add_argument("--data-dir", required=True, help="directory for the key, config and data")
    p.add_argument("--name", help="node name (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="listen host (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_LISTEN_PORT, help="listen port (default %(default)s)"
    )
    p.add_argument("--network-id", default="hearthnet-local", help="network id peers must share")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("id", help="print this node's NodeID")
    p.add_argument("--config", required=True, help="node config file")
    p.set_defaults(handler=cmd_id)

    p = sub.add_parser("events", help="print or verify the node's event log")
    p.add_argument("--config", required=True, help="node config file")
    p.add_argument("--type", help="only events whose type starts with this prefix")
    p.add_argument("--after", type=int, default=0, help="only events after this seq")
    p.add_argument("--verify", action="store_true", help="verify the hash chain and signatures")
    p.add_argument("--json", action="store_true", help="JSON lines output")
    p.set_defaults(handler=cmd_events)

    node = sub.add_parser("node", help="run or inspect the node daemon")
    node_sub = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    p = node_sub.add_parser("start", help="run the node in the foreground until SIGINT/SIGTERM")
    p.add_argument("--config", required=True, help="node config file")
    p.add_argument("--log-format", choices=["console", "json"], help="override [log] format")
    p.set_defaults(handler=cmd_node_start)
    p = node_sub.add_parser("status", help="NodeID, listen address, peers, features, counters")
    p.add_argument("--config", required=True, help="node config file")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(handler=cmd_node_status)

    p = sub.add_parser("call", help="invoke a capability on the local node or a peer")
    p.add_argument("capability", help="capability name, e.g. node.info")
    p.add_argument("--config", required=True, help="node config file")
    p.add_argument("--json", dest="json_body", default="{}", help="request body as JSON")
    p.add_argument("--peer", help="NodeID of the peer to call (default: the local node)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.set_defaults(handler=cmd_call)

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The `hearthnet` entry point: run a command; a HearthnetError prints its code and message."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except HearthnetError as exc:
        print(f"error [{exc.code.value}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
