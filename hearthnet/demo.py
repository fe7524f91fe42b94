"""`./scripts/demo`: the main job, run as a newcomer would.

Today it sets up three local nodes (identity, config, signed event log) and verifies them; the
federated round on SmolLM2 (announce, consent, 4-bit training, aggregation, apply) joins this
demo with the rounds issue. Everything lives under a fresh directory it prints, and nothing is
left running.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from hearthnet.cli import main as cli_main
from hearthnet.config import load_config
from hearthnet.constants import CONFIG_FILE_NAME, EVENTLOG_FILE_NAME
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeIdentity

NODES = (("alice", 7411), ("bob", 7412), ("carol", 7413))

PLAN = """\
The full round (coming with the rounds issue) will:
  1. start the three nodes as daemons on loopback, each with its own private corpus;
  2. announce a signed round from alice; bob and carol consent through the CLI;
  3. train a 4-bit LoRA adapter on SmolLM2-135M on each node's own text;
  4. aggregate the deltas, publish the adapter by SHA and apply it;
  5. print held-out perplexity and a sample generation before and after, then stop cleanly."""


async def _record_start(config_path: Path) -> str:
    config = load_config(config_path)
    identity = NodeIdentity.load(config.key_path)
    log = EventLog(config.data_dir / EVENTLOG_FILE_NAME, identity)
    try:
        await log.append("demo.node.initialised", {"name": config.node.name})
        result = await log.verify()
        return f"{config.node.name:<6} {identity.node_id}  log ok={result.ok} ({result.checked})"
    finally:
        await log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to put the nodes (default: a new temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hearthnet-demo-"))
    print(f"demo directory: {workdir}")
    for name, port in NODES:
        data_dir = workdir / name
        if not (data_dir / CONFIG_FILE_NAME).exists():
            rc = cli_main(["init", "--data-dir", str(data_dir), "--port", str(port)])
            if rc != 0:
                return rc
    for name, _ in NODES:
        print(asyncio.run(_record_start(workdir / name / CONFIG_FILE_NAME)))
    print(PLAN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
