"""The network lab: built, delays messages, and leaves nothing behind (also when killed).

Needs root, /dev/net/tun, ip and tc; skipped with the reason otherwise (CI runs as root).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from relaxsgd.cli import main
from relaxsgd.lab.netlab import Lab, LabUnavailable, LinkSpec, check_available


def _lab_reason() -> str | None:
    try:
        check_available()
    except LabUnavailable as e:
        return str(e)
    return None


REASON = _lab_reason()
needs_lab = pytest.mark.skipif(REASON is not None, reason=f"lab unavailable: {REASON}")

ECHO = """
import socket, sys
s = socket.create_server((sys.argv[1], 5001))
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(64)
    if not d:
        break
    c.sendall(d)
"""
PING = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=5)
        break
    except OSError:
        time.sleep(0.05)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter()
    c.sendall(b"x" * 32)
    c.recv(64)
    rtts.append(time.perf_counter() - t)
print(min(rtts))
"""


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _namespaces_in_use() -> set[str]:
    out = set()
    for path in glob.glob("/proc/[0-9]*/ns/net"):
        try:
            out.add(os.readlink(path))
        except OSError:
            continue
    return out


def _assert_gone(state: dict[str, Any]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(_alive(p) for p in state["pids"])
                                           or set(state["namespaces"]) & _namespaces_in_use()):
        time.sleep(0.1)
    assert not [p for p in state["pids"] if _alive(p)]
    assert not set(state["namespaces"]) & _namespaces_in_use()
    for dev in state["devices"]:
        r = subprocess.run(["ip", "link", "show", "dev", dev], capture_output=True)
        assert r.returncode != 0, f"device {dev} still exists"


@needs_lab
def test_a_message_round_trip_takes_at_least_twice_the_delay_and_nothing_is_left() -> None:
    delay = 0.03
    with Lab(2, LinkSpec(latency_s=delay)) as lab:
        with open(lab.state_path, encoding="utf-8") as f:
            state = json.load(f)
        assert lab.address(0) == "198.51.100.1" and len(state["namespaces"]) == 2
        assert len(set(state["namespaces"]) | {os.readlink("/proc/self/ns/net")}) == 3
        srv = lab.spawn(1, [sys.executable, "-c", ECHO, lab.address(1)])
        cli = lab.spawn(0, [sys.executable, "-c", PING, lab.address(1)],
                        stdout=subprocess.PIPE, text=True)
        out, _ = cli.communicate(timeout=60)
        rtt = float(out)
        assert 2 * delay <= rtt < 2 * delay + 0.1  # the upper bound is loose: load
        state["pids"] += [srv.pid, cli.pid]
    stats = lab.forwarder_stats()
    assert stats["packets"] >= 10 and stats["cpu_s"] >= 0
    _assert_gone(state)


@needs_lab
def test_a_failed_worker_stops_the_others_at_once() -> None:
    prog = ("import os, sys, time; r = int(os.environ['RANK']); "
            "time.sleep(0.3 if r == 1 else 120); sys.exit(3 if r == 1 else 0)")
    t = time.monotonic()
    with Lab(2, LinkSpec()) as lab:
        codes = lab.run_workers([sys.executable, "-c", prog])
    assert codes[1] == 3 and codes[0] != 0
    assert time.monotonic() - t < 60


@needs_lab
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_everything_is_gone_after_the_lab_process_is_killed_or_interrupted(sig: int) -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "rl*-state-*.json")))
    lab = subprocess.Popen([sys.executable, "-m", "relaxsgd.cli", "lab", "--workers", "2",
                            "--latency", "0.01", "--", "sleep", "120"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(glob.glob(os.path.join(tempfile.gettempdir(),
                                         f"rl{lab.pid % 100000}-state-*.json"))) - before
        if new:
            state_file = new.pop()
            with open(state_file, encoding="utf-8") as f:
                text = f.read()
            if text:
                state = json.loads(text)
                if len(state["pids"]) == 2 + 1 + 2:  # holders, forwarder, workers
                    break
        time.sleep(0.1)
    assert state, "the lab did not start"
    assert all(_alive(p) for p in state["pids"])
    lab.send_signal(sig)
    code = lab.wait(timeout=60)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    _assert_gone(state)
    if os.path.exists(state_file):  # a killed lab cannot remove its own state file
        os.unlink(state_file)


def test_without_root_the_lab_says_so_in_one_line(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code = main(["lab", "--workers", "2", "--", "true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("relaxsgd: error: the network lab needs root")


@pytest.mark.parametrize("args,msg", [
    (["--workers", "9", "--", "true"], "the lab builds 2 to 8 workers, got 9"),
    (["--workers", "2", "--prefix", "10.0.0", "--", "true"],
     "lab addresses must be in 198.51.100.0/24 or 192.0.2.0/24"),
    (["--workers", "2"], "relaxsgd lab needs a command after '--'"),
])
def test_bad_lab_arguments_are_one_line(args: list[str], msg: str, capsys: Any) -> None:
    code = main(["lab", *args])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1
