"""The real CLI driving real daemons: `hearthnet node start` as subprocesses."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hearthnet.errors import ErrorCode

HEARTHNET = str(Path(sys.executable).with_name("hearthnet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HEARTHNET, *args], capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_two_daemons_cli_call_and_sigterm(tmp_path):
    port_a, port_b = free_port(), free_port()
    cfg_a, cfg_b = tmp_path / "a" / "node.toml", tmp_path / "b" / "node.toml"
    assert run("init", "--data-dir", str(tmp_path / "a"), "--port", str(port_a)).returncode == 0
    assert run("init", "--data-dir", str(tmp_path / "b"), "--port", str(port_b)).returncode == 0
    id_a = run("id", "--config", str(cfg_a)).stdout.strip()
    id_b = run("id", "--config", str(cfg_b)).stdout.strip()
    with cfg_b.open("a") as fh:
        fh.write(f'\n[[peers]]\nurl = "wss://127.0.0.1:{port_a}"\nnode_id = "{id_a}"\n')

    procs = [
        subprocess.Popen(
            [HEARTHNET, "node", "start", "--config", str(c), "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in (cfg_a, cfg_b)
    ]
    try:

        def connected() -> bool:
            result = run("node", "status", "--config", str(cfg_a), "--json")
            return result.returncode == 0 and any(
                p["node_id"] == id_b for p in json.loads(result.stdout)["peers"]
            )

        wait_until(connected)
        result = run("call", "node.info", "--peer", id_b, "--config", str(cfg_a))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["node_id"] == id_b
        result = run(
            "call", "node.ping", "--json", '{"nonce": "x"}', "--peer", id_a, "--config", str(cfg_b)
        )
        assert json.loads(result.stdout)["nonce"] == "x"
        result = run(
            "call", "experimental.fedlearn.round.list", "--peer", id_b, "--config", str(cfg_a)
        )
        assert result.returncode == 2
        assert f"error [{ErrorCode.EXPERIMENTAL_DISABLED.value}]" in result.stderr
        assert "set [experimental] fedlearn = true" in result.stderr  # says how
        result = run("llm", "generate", "hello", "--config", str(cfg_a))
        assert result.returncode == 2
        assert f"error [{ErrorCode.MODEL_UNAVAILABLE.value}]" in result.stderr
        assert "[llm] enabled = true" in result.stderr
        status = run("node", "status", "--config", str(cfg_b))
        assert id_b in status.stdout and "peers:     1" in status.stdout
        peer_line = next(line for line in status.stdout.splitlines() if id_a in line)
        assert peer_line.split()[-1].startswith("127.0.0.1:") and "(" not in peer_line
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=30) for proc in procs]
    assert [p.returncode for p in procs] == [0, 0]
    lines = [json.loads(line) for line in outputs[0][1].splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "node started" in events and "node stopped" in events
    started = next(line for line in lines if line["event"] == "node started")
    assert started["node_id"] == id_a and started["listen"].endswith(str(port_a))
    assert not (tmp_path / "a" / "control.sock").exists()
    result = run("node", "status", "--config", str(cfg_a))
    assert result.returncode == 2 and "no node is running" in result.stderr
    result = run("events", "--config", str(cfg_a), "--verify")
    assert result.returncode == 0


def test_a_taken_port_is_a_clear_error_exit_2(tmp_path):
    """A second daemon on a port in use: `error [address_in_use]` naming the key to change,
    exit 2, no traceback, and no "node stopped" for a node that never started."""
    port = free_port()
    cfg_a, cfg_b = tmp_path / "a" / "node.toml", tmp_path / "b" / "node.toml"
    for d in ("a", "b"):
        assert run("init", "--data-dir", str(tmp_path / d), "--port", str(port)).returncode == 0
    first = subprocess.Popen(
        [HEARTHNET, "node", "start", "--config", str(cfg_a)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: run("node", "status", "--config", str(cfg_a)).returncode == 0)
        second = subprocess.run(
            [HEARTHNET, "node", "start", "--config", str(cfg_b), "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert second.returncode == 2, second.stderr
    assert f"error [{ErrorCode.ADDRESS_IN_USE.value}]" in second.stderr
    assert f"127.0.0.1:{port}" in second.stderr and "[listen] port" in second.stderr
    assert "Traceback" not in second.stderr
    events = [json.loads(line)["event"] for line in second.stderr.splitlines() if line[:1] == "{"]
    assert "node started" not in events and "node stopped" not in events
    assert run("events", "--config", str(cfg_b)).stderr.startswith("no events yet")
    assert first.returncode == 0  # the node that holds the port is untouched


def test_running_out_of_descriptors_is_one_log_line_and_the_daemon_recovers(tmp_path):
    """A socket flood against a daemon limited to 128 descriptors: accept() fails with EMFILE
    thousands of times a second (asyncio logged a traceback for each: 22,711 lines in 10 s).
    Now it is counted, logged once per interval, and the daemon serves again afterwards."""
    import resource

    port = free_port()
    cfg = tmp_path / "a" / "node.toml"
    assert run("init", "--data-dir", str(tmp_path / "a"), "--port", str(port)).returncode == 0

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc = subprocess.Popen(
        [HEARTHNET, "node", "start", "--config", str(cfg), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    socks: list[socket.socket] = []
    try:
        wait_until(lambda: run("node", "status", "--config", str(cfg)).returncode == 0)
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
            except OSError:
                time.sleep(0.01)
            if len(socks) > 200:  # keep reconnecting, as the audit's flood did
                for s in socks[:100]:
                    s.close()
                del socks[:100]
        for s in socks:
            s.close()
        socks.clear()
        status: dict = {}

        def serves() -> bool:
            nonlocal status
            result = run("node", "status", "--config", str(cfg), "--json")
            if result.returncode == 0:
                status = json.loads(result.stdout)
            return result.returncode == 0

        wait_until(serves)
        # enough failed accepts that one log line each (asyncio: six with the traceback) shows
        assert status["counters"].get("accept_failed", 0) >= 20
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = (out + err).splitlines()
    assert sum("accept failed" in line for line in lines) <= 2  # one per 10 s interval
    assert not any("Traceback" in line for line in lines)
    assert len(lines) < 20
