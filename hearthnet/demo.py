"""`./scripts/demo`: the main job, run as a newcomer would.

Three nodes (alice, bob, carol) start as real daemons on loopback, each with its own data
directory, identity and small private corpus of village notices. Alice announces a round; bob
and carol see it with `fedlearn pending` and consent through the CLI; each trains a 4-bit LoRA
adapter on SmolLM2-135M on its own text; alice aggregates, publishes and applies the adapter,
and the demo prints held-out perplexity and a sample generation before and after. Every step is
a `hearthnet` command, printed as it runs (paste it in the demo directory to run it again). The
nodes are stopped at the end, whatever happens.

The demo checks its own outcome: it fails (exit 1, never "done") when the community adapter does
not lower held-out perplexity, a generation is empty, or a node does not exit cleanly. Its
directory (~550 MB, mostly the converted model) is removed afterwards unless `--keep` or
`--workdir DIR` is given; after a failure only the model cache is removed, so the node logs stay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hearthnet.constants import CONFIG_FILE_NAME, CONTROL_SOCKET_NAME
from hearthnet.identity import NodeIdentity

NAMES = ("alice", "bob", "carol")
TOPIC = "hearthdale"
PROMPT = "Write a short notice for the Hearthdale village board."

_THINGS = [
    "bread market",
    "fire brigade drill",
    "choir rehearsal",
    "library hour",
    "repair cafe",
    "youth football",
    "seed swap",
    "bike workshop",
    "pumpkin fair",
    "bus to Kleve",
    "recycling van",
    "blood drive",
]
_PLACES = [
    "old school hall",
    "church square",
    "mill pond",
    "community garden",
    "fire station",
    "bakery corner",
    "sports field",
    "village green",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_TIMES = ["7 am", "9 am", "10 am", "noon", "2 pm", "4 pm", "6 pm", "7 pm"]
_ASKS = [
    "Bring a friend.",
    "Everyone is welcome.",
    "Please bring your own cup.",
    "Children must be accompanied.",
    "Volunteers meet fifteen minutes early.",
    "It is free of charge.",
    "Call Martha at the bakery with questions.",
]


def notices(seed: int, count: int) -> list[str]:
    """Village-board notices in one house style: what the adapter should learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        out.append(
            f"Hearthdale notice: the {rng.choice(_THINGS)} takes place on "
            f"{rng.choice(_DAYS)} at {rng.choice(_TIMES)} at the {rng.choice(_PLACES)}. "
            f"{rng.choice(_ASKS)} — the Hearthdale village board"
        )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    return json.dumps(value)


def check_outcome(base_ppl: float, tuned_ppl: float, before: str, after: str) -> None:
    """The demo's verdict: a community adapter that does not lower held-out perplexity, or a
    model that says nothing, is a failure however cleanly every step ran."""
    if not (math.isfinite(base_ppl) and math.isfinite(tuned_ppl)):
        raise SystemExit(
            f"demo FAILED: held-out perplexity is not finite ({base_ppl}, {tuned_ppl})"
        )
    if tuned_ppl >= base_ppl:
        raise SystemExit(
            f"demo FAILED: the community adapter did not lower held-out perplexity (base "
            f"{base_ppl:.2f} -> with the adapter {tuned_ppl:.2f}); the adapter or the model it "
            "was applied to is broken"
        )
    for label, text in (("without", before), ("with", after)):
        if not text.strip():
            raise SystemExit(f"demo FAILED: the generation {label} the adapter is empty")


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def clean_up(workdir: Path, own: bool, keep: bool, ok: bool) -> str:
    """What is left of the demo directory, and a line that says so. A directory the demo made
    itself goes unless --keep; after a failure only the model cache goes (the logs explain)."""
    if keep or not own:
        return f"kept {workdir} ({_size_mb(workdir):.0f} MB); remove it with: rm -rf {workdir}"
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
        return f"removed {workdir} (pass --keep or --workdir DIR to keep it)"
    shutil.rmtree(workdir / "models", ignore_errors=True)
    return f"node logs and data kept in {workdir} (the model cache was removed)"


class Demo:
    """The three-node demo: sets up nodes in a work directory, runs them as processes and drives
    one round through the real CLI, printing every command it runs."""

    def __init__(self, workdir: Path, steps: int):
        self.workdir = workdir
        self.steps = steps
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hearthnet = [sys.executable, "-m", "hearthnet.cli"]

    def config(self, name: str) -> str:
        """The config file path of node `name`."""
        return str(self.workdir / name / CONFIG_FILE_NAME)

    def run(
        self,
        name: str,
        *args: str,
        show: bool = True,
        check: bool = True,
        shown: str | None = None,
    ) -> str:
        """Run one `hearthnet` command; print it first (as pasted in the demo directory, or as
        `shown`) and its output, unless `show` is off (status polls)."""
        if show:
            cmd = ["hearthnet", *args, "--config", f"{name}/{CONFIG_FILE_NAME}"]
            print(f"\n$ {shown or shlex.join(cmd)}")
        proc = subprocess.run(
            [*self.hearthnet, *args, "--config", self.config(name)],
            capture_output=True,
            text=True,
            check=False,
        )
        if show and proc.stdout.strip():
            print(proc.stdout.rstrip())
        if check and proc.returncode != 0:
            raise SystemExit(f"demo FAILED: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def run_json(self, name: str, *args: str) -> Any:
        """A command whose JSON output the demo reads: the command is printed, not the JSON."""
        cmd = shlex.join(["hearthnet", *args, "--json", "--config", f"{name}/{CONFIG_FILE_NAME}"])
        print(f"\n$ {cmd}")
        return json.loads(self.run(name, *args, "--json", show=False))

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Create three nodes (keys, configs that pin each other, private training text) and the
        shared model cache."""
        from hearthnet.llm import model as M

        cache = self.workdir / "models"
        print("preparing the base model (SmolLM2-135M-Instruct, converted once into a cache) …")
        source = M.resolve_source(None)
        M.model_dir(source, cache, M.weights_sha(source, cache))
        identities = {n: NodeIdentity.generate() for n in NAMES}
        ports = {n: _free_port() for n in NAMES}
        for i, name in enumerate(NAMES):
            data = self.workdir / name
            (data / "training").mkdir(parents=True)
            data.chmod(0o700)
            identities[name].save(data / "node.key")
            # Each node's private corpus: its own notices, never sent anywhere.
            (data / "training" / f"{TOPIC}.txt").write_text("\n\n".join(notices(100 + i, 40)))
            peers = [
                f'[[peers]]\nurl = "wss://127.0.0.1:{ports[p]}"\n'
                f'node_id = "{identities[p].node_id}"\n'
                for p in NAMES
                if p < name
            ]
            roster = [identities[p].node_id for p in NAMES]
            (data / CONFIG_FILE_NAME).write_text(
                f'[node]\nname = {_toml(name)}\ndata_dir = "."\nnetwork_id = "hearthnet-demo"\n\n'
                f'[listen]\nhost = "127.0.0.1"\nport = {ports[name]}\n\n'
                + "\n".join(peers)
                + f"\n[trust]\nroster = {_toml(roster)}\n\n"
                "[experimental]\nfedlearn = true\n\n"
                "[fedlearn]\nmin_round_participants = 2\n\n"
                f"[llm]\nenabled = {'true' if name == 'alice' else 'false'}\n"
                f'cache_dir = {_toml(str(cache))}\ndevice = "cpu"\n\n'
                '[log]\nformat = "json"\n'
            )
        (self.workdir / "held-out.json").write_text(json.dumps(notices(999, 12)))

    def start(self) -> None:
        """Start every node as a process and wait until each is connected to the other two."""
        for name in NAMES:
            cmd = ["hearthnet", "node", "start", "--config", f"{name}/{CONFIG_FILE_NAME}"]
            print(f"$ {shlex.join(cmd)} > {name}.log 2>&1 &")
            log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            # Three daemons share this machine's cores: one compute thread each, or their
            # thread pools spin against each other (a real node has the machine to itself).
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            self.procs[name] = subprocess.Popen(
                [*self.hearthnet, "node", "start", "--config", self.config(name)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        deadline = time.monotonic() + 180
        for name in NAMES:
            while True:
                if self.procs[name].poll() is not None:
                    raise SystemExit(f"demo FAILED: {name} exited; see {name}.log")
                if (self.workdir / name / CONTROL_SOCKET_NAME).exists():
                    status = subprocess.run(
                        [
                            *self.hearthnet,
                            "node",
                            "status",
                            "--json",
                            "--config",
                            self.config(name),
                        ],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if status.returncode == 0 and len(json.loads(status.stdout)["peers"]) == 2:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo FAILED: {name} did not connect to its peers in time")
                time.sleep(0.5)
        print("three nodes are up and connected (alice, bob, carol)")

    def stop(self) -> dict[str, int]:
        """Stop every node; their exit codes."""
        codes: dict[str, int] = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            codes[name] = code
            print(f"{name} stopped (exit {code})")
        return codes

    # --- the round --------------------------------------------------------------------------------

    def perplexity(self, adapter: str | None) -> float:
        """The held-out perplexity on alice under `adapter` (None: the base model)."""
        held_out = json.loads((self.workdir / "held-out.json").read_text())
        body = json.dumps({"texts": held_out, "adapter_sha": adapter})
        request = f"perplexity-{'base' if adapter is None else 'adapter'}.json"
        (self.workdir / request).write_text(body)  # printed as $(cat FILE): 12 texts are long
        shown = (
            f'hearthnet call llm.perplexity --json "$(cat {request})" --timeout 600 '
            f"--config alice/{CONFIG_FILE_NAME}"
        )
        out = self.run(
            "alice", "call", "llm.perplexity", "--json", body, "--timeout", "600", shown=shown
        )
        return float(json.loads(out)["perplexity"])

    def round(self) -> None:
        """Run one round end to end and show the model before and after."""
        base_ppl = self.perplexity(None)
        before = self.run_json("alice", "llm", "generate", PROMPT, "--max-new-tokens", "48")["text"]
        announced = self.run(
            "alice",
            "fedlearn",
            "announce",
            "--topic",
            TOPIC,
            "--modules",
            "q_proj,k_proj,v_proj,o_proj",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--steps",
            str(self.steps),
            "--lr",
            "3e-3",
            "--batch-size",
            "4",
            "--min-participants",
            "2",
            "--max-participants",
            "3",
            "--deadline-in",
            "8m",
            # No DP noise in this round, so no clipping either (the default clip, 24, is about a
            # 30-step delta's norm and would cut the larger ones a little; README, "Clipping").
            "--clip-norm",
            "0",
            "--consent-text",
            "I share a LoRA delta trained on my village notices; the notices stay on my node.",
        )
        round_id = announced.split()[2]
        for name in ("bob", "carol"):
            self.run(name, "fedlearn", "pending")
            self.run(name, "fedlearn", "consent", round_id, "--accept")
        print("\nbob and carol are training on their own notices (4-bit SmolLM2-135M + LoRA) …")
        self.run("alice", "fedlearn", "status", round_id, "--wait", "--timeout", "480")
        status = self.run_json("alice", "fedlearn", "status", round_id)
        if status["phase"] != "completed":
            raise SystemExit(f"demo FAILED: the round did not complete: {status['abort']}")
        sha = json.loads(status["result"]["body"])["aggregated_delta_sha"]
        self.run("alice", "fedlearn", "reputation")  # what alice learnt of bob and carol
        self.run("alice", "fedlearn", "apply", sha, "--scope", "node")
        tuned_ppl = self.perplexity(sha)
        after = self.run_json("alice", "llm", "generate", PROMPT, "--max-new-tokens", "48")["text"]
        print("\n=== result ===")
        print(
            f"held-out perplexity: base {base_ppl:.2f} -> with the community adapter"
            f" {tuned_ppl:.2f}"
        )
        print(f"prompt: {PROMPT}")
        print(f"  without adapter: {before.strip()}")
        print(f"  with adapter:    {after.strip()}")
        check_outcome(base_ppl, tuned_ppl, before, after)


def main(argv: list[str] | None = None) -> int:
    """`python -m hearthnet.demo`: run the demo; 1 when a step failed or a node did not exit
    cleanly."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", help="where to put the nodes; kept, and its model cache reused next time"
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per participant")
    parser.add_argument(
        "--keep", action="store_true", help="keep the demo's temp directory and say where"
    )
    args = parser.parse_args(argv)
    own = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hearthnet-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()) and not (workdir / "models").exists():
        raise SystemExit(f"{workdir} is not empty")
    print(f"demo directory: {workdir} (the commands below run there)")
    started = time.monotonic()
    demo = Demo(workdir, args.steps)
    ok = False
    try:
        for name in NAMES:
            shutil.rmtree(workdir / name, ignore_errors=True)
        demo.setup()
        demo.start()
        demo.round()
        ok = True
    finally:
        codes = demo.stop()
        bad = {n: c for n, c in codes.items() if c != 0}
        if ok and bad:
            ok = False
            print(f"demo FAILED: nodes did not exit cleanly: {bad}", file=sys.stderr)
        print(clean_up(workdir, own, args.keep, ok))
    if not ok:
        return 1
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
