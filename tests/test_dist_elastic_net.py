"""Elastic membership on the transport (issue 20, ELASTIC.md): connections on demand,
admission of restarted workers and joiners, membership changes reaching every worker.

In one process: several Transports over a real TCPStore (the launcher hosts one like it),
so each test takes a second or two."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from relaxsgd.distributed import auth as A
from relaxsgd.distributed.membership import JoinRefused, Registry, claim_id
from relaxsgd.distributed.sockets import PeerLost, parse_address, shut
from relaxsgd.distributed.store import SignedStore
from relaxsgd.distributed.transport import Transport

pytestmark = pytest.mark.timeout(60)
KEY = os.urandom(32).hex().encode()  # (as RELAXSGD_SECRET holds it)


class _Job:
    """Transports of one job on one store; ``got[rank]``: (src, tag) of every 'msg'."""

    def __init__(self, n: int, on_demand: bool = True) -> None:
        self.raw = dist.TCPStore("127.0.0.1", 0, None, True,
                                 datetime.timedelta(seconds=10), wait_for_workers=False)
        self.n, self.on_demand = n, on_demand
        self.got: dict[int, list] = {}
        self.events: dict[int, list] = {}
        self.trs: list[Transport] = []

    def start(self, rank: int, key: bytes = KEY, inc: int = 0, members: Any = None,
              n: int | None = None) -> Transport:
        auth = A.Auth(key)
        self.got[rank], self.events[rank] = [], []
        tr = Transport(rank, n or self.n, lambda src, m, r=rank: self.got[r].append(
            (src, m[1])), 10.0, auth=auth, max_frame=1 << 20, peer_timeout_s=5.0,
            incarnation=inc, members=members, on_demand=self.on_demand)
        tr.on_member(lambda kind, w, info, r=rank: self.events[r].append((kind, w)))
        store = SignedStore(self.raw, A.store_key(auth), "relaxsgd/run0/", 10.0, "test")
        tr.start(store, "127.0.0.1", startup_s=10.0,
                 registry=Registry(self.raw, A.store_key(auth), 10.0))
        self.trs.append(tr)
        return tr

    def close(self) -> None:
        for tr in self.trs:
            tr._closing = True
            tr._members_stop.set()
            if tr._listener is not None:
                tr._listener.close()


def _until(cond: Any, what: str, wait: float = 10.0) -> None:
    end = time.monotonic() + wait
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def _kill(tr: Transport) -> None:
    """As a SIGKILL looks to the others: every socket closed, no goodbye."""
    tr._closing = True
    tr._members_stop.set()
    assert tr._listener is not None
    tr._listener.close()
    for s in [*tr._incoming.values(), *(link.sock for link in tr._links.values())]:
        shut(s)


def test_a_ring_on_demand_holds_degree_bounded_connections() -> None:
    job = _Job(6)
    trs = [job.start(r) for r in range(6)]
    for k in range(3):
        for tr in trs:
            for peer in ((tr.rank + 1) % 6, (tr.rank - 1) % 6):
                tr.send(peer, ("msg", k, torch.ones(2)))
    _until(lambda: all(len(job.got[r]) == 6 for r in range(6)), "ring messages")
    assert [tr.connections() for tr in trs] == [4] * 6  # 2 partners, both directions
    assert [tr.opened for tr in trs] == [2] * 6
    assert all(tr.live() == frozenset(range(6)) for tr in trs)
    job.close()


def test_idle_connections_close_and_reopen_without_a_death() -> None:
    job = _Job(2)
    a, b = job.start(0), job.start(1)
    a.idle_s = 0.3
    a.send(1, ("msg", 1, torch.ones(1)))
    _until(lambda: a.connections() == 0 and b.connections() == 0, "idle close", 5.0)
    a.send(1, ("msg", 2, torch.ones(1)))
    _until(lambda: [t for _, t in job.got[1]] == [1, 2], "after reopening")
    assert a.dead == {} and b.dead == {} and a.opened == 2
    job.close()


def test_a_death_reaches_workers_without_a_connection_to_it() -> None:
    job = _Job(3)
    trs = [job.start(r) for r in range(3)]
    trs[0].send(2, ("msg", 0, torch.ones(1)))  # 0 talks to 2; 1 never does
    _until(lambda: len(job.got[2]) == 1, "0 -> 2")
    _kill(trs[2])
    _until(lambda: 2 in trs[0].dead, "0 sees the end of its outgoing connection", 5.0)
    _until(lambda: 2 in trs[1].dead, "1 learns it from the member registry", 5.0)
    assert trs[1].live() == frozenset({0, 1}) and ("leave", 2) in job.events[1]
    assert trs[1].connections() == 0
    job.close()


def test_a_restarted_worker_is_readmitted_and_its_old_incarnation_ignored() -> None:
    job = _Job(3)
    trs = [job.start(r) for r in range(3)]
    old = trs[2]
    old.send(0, ("msg", "old", torch.ones(1)))
    _until(lambda: job.got[0] == [(2, "old")], "the first incarnation's message")
    new = job.start(2, inc=1)  # the old one is frozen, not dead: still connected
    new.send(0, ("msg", "new", torch.ones(1)))
    _until(lambda: (2, "new") in job.got[0], "the new incarnation's message")
    assert trs[0].incarnation(2) == 1 and job.events[0] == [("leave", 2), ("join", 2)]
    _until(lambda: trs[1].incarnation(2) == 1, "1 learns of the restart", 5.0)
    assert 2 in trs[1].live() and ("join", 2) in job.events[1]
    # the old incarnation wakes up: what it sends is dropped, its reconnection refused
    old.send(0, ("msg", "stale", torch.ones(1)))
    old._drop_links(0)
    old.send(0, ("msg", "stale2", torch.ones(1)))
    time.sleep(0.3)
    assert [t for s, t in job.got[0] if s == 2] == ["old", "new"]
    assert trs[0].refused >= 1 and 2 not in trs[0].dead
    job.close()


def test_a_joiner_with_the_wrong_secret_is_refused_and_the_job_goes_on() -> None:
    job = _Job(3)
    trs = [job.start(r, members=range(2)) for r in range(2)]
    intruder = job.start(2, key=os.urandom(32), members=range(3))
    intruder.send(0, ("msg", "in", torch.ones(1)))  # it cannot read the job's addresses
    assert "not signed with this job's secret" in intruder.dead[0]
    raw = job.raw.get("relaxsgd/run0//relaxsgd/p2p/0")[:-32].decode()  # (read it raw)
    with pytest.raises(PeerLost, match="did not prove the job secret"):
        intruder._connect(0, parse_address(raw), 2.0)  # the handshake refuses it
    time.sleep(0.4)  # (its registration, signed with its own key, is no member either)
    for k in range(3):
        trs[0].send(1, ("msg", k, torch.ones(1)))
        trs[1].send(0, ("msg", k, torch.ones(1)))
    _until(lambda: len(job.got[0]) == len(job.got[1]) == 3, "the job goes on")
    assert job.got[0] == [(1, 0), (1, 1), (1, 2)] and trs[0].refused >= 1
    assert [tr.live() for tr in trs] == [frozenset({0, 1})] * 2
    assert job.events[0] == job.events[1] == []
    job.close()


def test_a_joiner_takes_the_lowest_unused_id_and_one_beyond_the_maximum_is_refused() -> None:
    job = _Job(3)
    trs = [job.start(r, members=range(2)) for r in range(2)]
    wid = claim_id(job.raw, 2, 3)
    assert wid == 2
    joiner = job.start(wid, members=range(3))
    joiner.send(1, ("msg", "hi", torch.ones(1)))
    _until(lambda: all(tr.live() == frozenset(range(3)) for tr in trs), "the join", 5.0)
    assert ("join", 2) in job.events[0]  # 0 has no connection to it: from the registry
    with pytest.raises(JoinRefused, match="at most 3 workers") as e:
        claim_id(job.raw, 2, 3)
    assert "\n" not in str(e.value)
    job.close()


def _launch(args: list[str], script: str, tmp_path: Any) -> subprocess.CompletedProcess:
    log = tmp_path / "starts"
    env = {**os.environ, "STARTS": str(log)}
    return subprocess.run([sys.executable, "-m", "relaxsgd.distributed.launch", *args, "--",
                           sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)


WORKER = """
import os, sys, time
with open(os.environ["STARTS"], "a") as f:
    f.write(f"{os.environ['RANK']} {os.environ['RELAXSGD_INCARNATION']} "
            f"{os.environ['RELAXSGD_RESTART']} {os.environ['TORCHELASTIC_USE_AGENT_STORE']}\\n")
if os.environ["RANK"] == "1":
    sys.exit(3)
end = time.monotonic() + 30  # (rank 0 runs until worker 1's third start, and a little)
while time.monotonic() < end and sum(ln.startswith("1 ") for ln in open(
        os.environ["STARTS"])) < 3:
    time.sleep(0.05)
time.sleep(1.0)
"""


def test_the_launcher_restarts_a_dead_worker_k_times_then_gives_up_in_one_line(
        tmp_path) -> None:
    r = _launch(["-n", "2", "--restarts", "2"], WORKER, tmp_path)
    starts = (tmp_path / "starts").read_text().split("\n")
    assert sorted(s for s in starts if s) == ["0 0 0 True", "1 0 0 True", "1 1 1 True",
                                              "1 2 2 True"], r.stderr
    lines = r.stderr.strip().split("\n")
    assert [ln for ln in lines if "; restarting it" in ln] == [
        f"relaxsgd.distributed.launch: worker 1 ended (status 3); restarting it (restart "
        f"{k} of 2)" for k in (1, 2)]
    gave_up = [ln for ln in lines if "not restarting it" in ln]
    assert gave_up == ["relaxsgd.distributed.launch: worker 1 ended (status 3); not "
                       "restarting it: it was restarted 2 times (--restarts 2); the job "
                       "goes on without it"]
    assert r.returncode == 3


def _join(port: int, secret: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RELAXSGD_SECRET": secret, "RELAXSGD_RENDEZVOUS_TIMEOUT": "10"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "relaxsgd.cli", "join", f"127.0.0.1:{port}",
                           "--algo", "swarm", "--workers", "2", "--task", "logreg", "-q"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_relaxsgd_join_refuses_a_wrong_secret_and_a_full_job_in_one_line() -> None:
    job = _Job(2)
    job.start(0)  # (its record in the registry is what a joiner's secret is checked on)
    r = _join(job.raw.port, os.urandom(32).hex())
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "signs its records with another secret" in r.stderr
    assert int(job.raw.add("relaxsgd/next-id", 0)) == 0  # no id spent on it
    r = _join(job.raw.port, KEY.decode())  # the right secret, but the job is full
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("relaxsgd: error: the job is full: it takes at most 2 "
                               "workers (elastic.max_workers)"), r.stderr
    assert int(job.raw.add("relaxsgd/next-id", 0)) == 1  # it claimed (and was refused)
    job.close()
