"""Issue 15's bar for SecAgg+: a secure round of six member daemons (`hearthnet node start`
processes on loopback, the real 4-bit SmolLM2; a seventh coordinates, since a secure round's
coordinator may not also be a member), two of them SIGKILLed after the key exchange (their
shares are out, they are training), still completes with the four survivors' weighted mean:
the coordinator unmasks it from the survivors' confirmed reveals."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch

from hearthnet import constants as C
from hearthnet.fedlearn.delta import deserialize_delta
from hearthnet.fedlearn.privacy import clip_gradient
from hearthnet.fedlearn.publish import read_adapter
from hearthnet.fedlearn.submission import capped_weights
from hearthnet.identity import NodeIdentity
from tests.fedlearn.rounds import write_corpus
from tests.test_daemon_cli import free_port

HEARTHNET = [sys.executable, "-m", "hearthnet.cli"]
NAMES = [f"n{i}" for i in range(7)]
MEMBERS = NAMES[1:]
CLIP = 4.0


def cli(node: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HEARTHNET, *args, "--config", str(node / "node.toml")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def events(node: Path, type_: str) -> list[dict]:
    """Events of one type from a node's log, read directly (read-only) while it runs."""
    path = node / C.EVENTLOG_FILE_NAME
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute("SELECT payload FROM events WHERE type = ? ORDER BY seq", (type_,))
        return [json.loads(r[0]) for r in rows]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def setup(tmp_path: Path, model_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    ids = {n: NodeIdentity.generate() for n in NAMES}
    ports = {n: free_port() for n in NAMES}
    dirs = {}
    for i, name in enumerate(NAMES):
        d = tmp_path / name
        write_corpus(d / "training", name, "village", lines=16)
        d.chmod(0o700)
        ids[name].save(d / "node.key")
        peers = "".join(
            f'[[peers]]\nurl = "wss://127.0.0.1:{ports[p]}"\nnode_id = "{ids[p].node_id}"\n'
            for p in NAMES[:i]
        )
        roster = json.dumps([ids[p].node_id for p in NAMES])
        (d / "node.toml").write_text(
            f'[node]\nname = "{name}"\ndata_dir = "."\nnetwork_id = "secagg-test"\n\n'
            f'[listen]\nhost = "127.0.0.1"\nport = {ports[name]}\n\n{peers}\n'
            f"[trust]\nroster = {roster}\n\n[experimental]\nfedlearn = true\n\n"
            "[fedlearn]\nmin_round_participants = 3\n\n"
            f'[llm]\nenabled = false\nbase_model = "{model_dir}"\n'
            f'cache_dir = "{tmp_path / "cache"}"\ndevice = "cpu"\n\n[log]\nformat = "json"\n'
        )
        dirs[name] = d
    return dirs, {n: ids[n].node_id for n in NAMES}


def test_six_daemon_secure_round_survives_two_sigkilled_after_the_key_exchange(
    tmp_path, smollm_dir
):
    dirs, ids = setup(tmp_path, smollm_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for name, d in dirs.items():
        log = open(d / "node.log", "wb")  # noqa: SIM115 - closed with the process
        procs[name] = subprocess.Popen(
            [*HEARTHNET, "node", "start", "--config", str(d / "node.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    coord, victims = dirs["n0"], ["n5", "n6"]
    try:

        def all_connected() -> bool:
            for d in dirs.values():
                out = cli(d, "node", "status", "--json")
                if out.returncode != 0 or len(json.loads(out.stdout)["peers"]) != 6:
                    return False
            return True

        wait_for(all_connected, 180, "seven connected daemons")
        announced = cli(
            coord,
            "fedlearn",
            "announce",
            "--topic",
            "village",
            "--modules",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--steps",
            "4",
            "--lr",
            "3e-3",
            "--batch-size",
            "2",
            "--min-participants",
            "4",
            "--max-participants",
            "6",
            "--deadline-in",
            "90s",
            "--secure",
            "--clip-policy",
            "fixed",
            "--clip-norm",
            str(CLIP),
            "--consent-text",
            "I share a masked LoRA delta; my notices stay here.",
        )
        assert announced.returncode == 0, announced.stderr
        round_id = announced.stdout.split()[2]
        for name in MEMBERS:
            d = dirs[name]
            wait_for(
                lambda d=d: round_id in cli(d, "fedlearn", "pending").stdout, 60, f"{name} offer"
            )
            accepted = cli(d, "fedlearn", "consent", round_id, "--accept")
            assert accepted.returncode == 0, accepted.stderr
        # The key exchange is over once the share phase closes with all six: kill two members
        # while they train (their shares are out, so their pairwise masks are in the others').
        wait_for(
            lambda: events(coord, "fedlearn.round.shares_closed"), 120, "the share phase to close"
        )
        (closed,) = events(coord, "fedlearn.round.shares_closed")
        assert sorted(closed["participants"]) == sorted(ids[n] for n in MEMBERS)
        for name in victims:
            assert not events(dirs[name], "fedlearn.participant.submitted")
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait(10)
        wait_for(
            lambda: (
                events(coord, "fedlearn.round.completed") or events(coord, "fedlearn.round.aborted")
            ),
            300,
            "the round to end",
        )
        assert not events(coord, "fedlearn.round.aborted"), events(coord, "fedlearn.round.aborted")
        (unmask,) = events(coord, "fedlearn.round.unmask")
        survivors = sorted(ids[n] for n in MEMBERS if n not in victims)
        assert unmask["request"]["survivors"] == survivors
        assert unmask["request"]["dropped"] == sorted(ids[n] for n in victims)
        (completed,) = events(coord, "fedlearn.round.completed")
        result = json.loads(completed["result"]["body"])
        assert result["secure"] and result["n_participants"] == 4
        # The adapter equals the roster-weighted mean of the survivors' clipped deltas.
        anns = {
            e["announcement"]["participant"]: e["announcement"]["num_samples"]
            for e in events(coord, "fedlearn.round.mask_key")
        }
        order = sorted(anns)
        weight = dict(zip(order, capped_weights([anns[p] for p in order]), strict=True))
        deltas = {}
        for name in MEMBERS:
            if name in victims:
                continue
            (trained,) = events(dirs[name], "fedlearn.participant.trained")
            blob = next((dirs[name] / "blobs").rglob(trained["blob_sha"]))
            deltas[ids[name]] = clip_gradient(deserialize_delta(blob.read_bytes())[0], CLIP)
        sha = result["aggregated_delta_sha"]
        adapter_blob = next((coord / "blobs").rglob(sha))
        tensors, _ = read_adapter(adapter_blob.read_bytes())
        total = sum(weight[p] for p in deltas)
        bound = CLIP * 2.0 ** -(C.FEDLEARN_SECURE_FRACTION_BITS + 1)
        checked = 0
        for key in (k for k in tensors if k.endswith("lora_B")):
            ref = sum(weight[p] * d[key].double() for p, d in deltas.items()) / total
            tol = bound + float(ref.abs().max()) * 2**-24
            assert (tensors[key].double() - ref).abs().max().item() <= tol, key
            checked += 1
        assert checked > 0 and any(
            float(t.abs().max()) > 0 for k, t in tensors.items() if k.endswith("lora_B")
        )
        (confirmed,) = events(coord, "fedlearn.round.confirmed")
        assert sorted(confirmed["signatures"]) == survivors  # every survivor signed it
        for name in MEMBERS:
            if name not in victims:  # every survivor accepted the result; secrets discarded
                wait_for(
                    lambda n=name: events(dirs[n], "fedlearn.participant.completed"),
                    60,
                    f"{name} to accept the result",
                )
                wait_for(
                    lambda n=name: not list((dirs[n] / "round-secrets").glob("*.sealed")),
                    30,
                    f"{name} to discard its sealed round secrets",
                )
        assert torch.isfinite(torch.cat([t.flatten() for t in tensors.values()])).all()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
