"""Checkpoints and exact resume in the simulator (issue 11, item 1).

The conformance test: for every registered algorithm (and the variants whose state differs:
SwarmSGD async and sequential with the lattice, OLCO3 top-k through a parameter server and
PowerSGD, ...), a run killed right after its k-th checkpoint and resumed from the file
writes the same metrics.csv (wall times apart) as the same run never interrupted, with the
same checkpoint schedule. The "kill" raises an exception the runner does not catch, so
nothing after the checkpoint is written, as after SIGKILL; a real SIGKILL of a
``relaxsgd run`` process is in :func:`test_sigkill_then_resume_equals_uninterrupted`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from relaxsgd import checkpoint, state_tree
from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.errors import ConfigError
from relaxsgd.run import run
from relaxsgd.sim import saving
from simkit import tiny

# (id, config overrides): every algorithm at least once; the variants with their own state.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("allreduce", {"algo": "allreduce", "train": {"momentum": 0.9}}),
    ("localsgd", {"algo": "localsgd", "algo_options": {"p": 3}}),
    ("olco3-topk-ps", {"algo": "olco3", "algo_options": {"p": 2, "s": 1}}),
    ("olco3-topk-ps-s2-servercomp", {"algo": "olco3", "algo_options": {
        "p": 2, "s": 2, "server_compensation": True}}),
    ("olco3-powersgd", {"algo": "olco3", "algo_options": {
        "p": 2, "s": 1, "compressor": "powersgd:rank=1", "aggregation": "allreduce"}}),
    ("efsgd", {"algo": "efsgd"}),
    ("efsgd-powersgd", {"algo": "efsgd", "algo_options": {"compressor": "powersgd:rank=1"}}),
    ("efsgd-topk-ps-qsgd-server", {"algo": "efsgd", "algo_options": {  # the server's seeds
        "aggregation": "ps", "server_compressor": "qsgd:bits=4"}}),
    ("efsgd-randk-shared", {"algo": "efsgd", "algo_options": {
        "compressor": "randk:ratio=0.25,shared_seed=3"}}),
    ("qsparse", {"algo": "qsparse"}),
    ("qsparse-powersgd", {"algo": "qsparse", "algo_options": {
        "p": 3, "compressor": "powersgd:rank=1"}}),
    ("pipesgd", {"algo": "pipesgd"}),
    ("pipesgd-s2-topk-ps", {"algo": "pipesgd", "algo_options": {  # a FIFO chain in flight
        "s": 2, "compressor": "topk:ratio=0.25", "aggregation": "ps"}}),
    ("pipesgd-s2-powersgd", {"algo": "pipesgd", "algo_options": {
        "s": 2, "compressor": "powersgd:rank=1"}}),
    ("cocod", {"algo": "cocod"}),
    ("cocod-topk-ps", {"algo": "cocod", "algo_options": {
        "p": 3, "compressor": "topk:ratio=0.25", "aggregation": "ps"}}),
    ("overlap-local", {"algo": "overlap-local"}),
    ("overlap-local-anchor-local-sign", {"algo": "overlap-local", "algo_options": {
        "p": 3, "final": "anchor", "anchor_from": "local", "compressor": "sign"}}),
    ("overlap-local-none", {"algo": "overlap-local", "algo_options": {"final": "none"}}),
    ("diloco", {"algo": "diloco", "algo_options": {"p": 3}}),
    ("diloco-topk-ef", {"algo": "diloco", "algo_options": {
        "p": 3, "compressor": "topk:ratio=0.25", "error_feedback": True}}),
    ("streaming-diloco", {"algo": "streaming-diloco", "algo_options": {"p": 4, "fragments": 2}}),
    ("streaming-diloco-tau2", {"algo": "streaming-diloco", "algo_options": {
        "p": 6, "fragments": 2, "tau": 2, "error_feedback": True}}),
    ("streaming-diloco-tau-p", {"algo": "streaming-diloco", "algo_options": {
        "p": 4, "fragments": 2, "tau": 4}}),
    ("streaming-diloco-tau0", {"algo": "streaming-diloco", "algo_options": {
        "p": 4, "tau": 0, "alpha": 1.0, "compressor": "identity"}}),
    ("swarm-async-lattice", {"algo": "swarm", "topology": "ring"}),
    ("swarm-async-overlap", {"algo": "swarm", "topology": "ring", "algo_options": {
        "overlap": True}}),
    ("swarm-sequential-lattice", {"algo": "swarm", "topology": "ring", "algo_options": {
        "schedule": "sequential"}}),
    ("swarm-blocking-qsgd", {"algo": "swarm", "topology": "ring", "algo_options": {
        "averaging": "blocking", "quantizer": "qsgd"}}),
    # pull: the partner keeps the value it sent (pending); qsgd: per-pair references and
    # message numbers on both sides of each direction; overlap: a reply in flight
    ("swarm-async-pull-qsgd", {"algo": "swarm", "topology": "ring", "algo_options": {
        "update": "pull", "quantizer": "qsgd"}}),
    ("swarm-async-overlap-qsgd", {"algo": "swarm", "topology": "complete", "algo_options": {
        "overlap": True, "quantizer": "qsgd", "H": 2}}),
    ("swarm-blocking-lattice-fixed", {"algo": "swarm", "topology": "complete",
                                      "algo_options": {"averaging": "blocking",
                                                       "steps_dist": "fixed", "H": 2}}),
    ("swarm-sequential-pull-qsgd", {"algo": "swarm", "topology": "complete", "algo_options": {
        "schedule": "sequential", "update": "pull", "quantizer": "qsgd", "H": 2}}),
    ("dpsgd", {"algo": "dpsgd", "topology": "ring"}),
    ("dpsgd-atc-exponential", {"algo": "dpsgd", "topology": "exponential", "algo_options": {
        "mix": "atc"}}),
    ("adpsgd", {"algo": "adpsgd", "topology": "ring"}),
    ("sgp", {"algo": "sgp", "topology": "ring"}),
    # tau = 2: the pushes of the last two rounds wait in the inboxes at every checkpoint
    ("sgp-overlap-topology", {"algo": "sgp", "topology": "ring", "algo_options": {
        "overlap": 2, "graph": "topology"}}),
    ("choco", {"algo": "choco", "topology": "ring"}),
    ("choco-zero-qsgd", {"algo": "choco", "topology": "ring", "algo_options": {
        "public_init": "zero", "compressor": "qsgd:bits=4"}}),
]


# The algorithms whose last checkpoints must also be equal, state for state (workers' state,
# generators and counters, the bank, the engine): state that never shows in the metrics of
# a tiny run (a message number, a generator of a rare path) is caught too.
STATE_CHECKED = {"swarm", "dpsgd", "adpsgd", "sgp", "choco"}


def tree_difference(a: Any, b: Any, where: str = "checkpoint") -> str:
    """'' if two loaded checkpoint trees are equal (tensors bit for bit), else where not."""
    if isinstance(a, torch.Generator) and isinstance(b, torch.Generator):
        a, b = a.get_state(), b.get_state()
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return "" if ok else where
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        a, b = vars(a), vars(b)  # a payload (LatticePayload, ...): field by field
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        return next((d for k in a if (d := tree_difference(a[k], b[k], f"{where}[{k!r}]"))), "")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        return next((d for k, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := tree_difference(x, y, f"{where}[{k}]"))), "")
    return "" if a == b else f"{where}: {a!r} != {b!r}"


def metrics(folder: str) -> list[dict[str, str]]:
    with open(os.path.join(folder, "metrics.csv"), encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(f)]


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so nothing more is written."""


def run_killed_after(cfg: Any, k: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``cfg`` and stop it dead right after its k-th checkpoint is on disk."""
    taken = [0]
    orig = saving.SimCheckpoints._take

    def take(self: Any, engine: Any) -> None:
        orig(self, engine)
        taken[0] += 1
        if taken[0] == k:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(saving.SimCheckpoints, "_take", take)
        with pytest.raises(Killed):
            run(cfg, progress=False)
    return taken[0]


def test_every_algorithm_is_resumable_and_has_a_case() -> None:
    names = {e.name for e in ALGORITHMS.entries()}
    covered = {d["algo"] for _, d in CASES}
    assert names <= covered, f"no checkpoint case for {sorted(names - covered)}"
    not_resumable = sorted(n for n in names if not ALGORITHMS.get(n).resumable)
    assert not not_resumable, f"algorithms that do not follow the checkpoint rule: " \
        f"{not_resumable}"


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_resumed_run_equals_uninterrupted_run(case: dict[str, Any], tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(**case, steps=24, evals=6, network="wan", checkpoint_every=5)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(dataclasses.replace(cfg, out=whole), progress=False)
    run_killed_after(dataclasses.replace(cfg, out=cut), 2, monkeypatch)
    assert os.path.isfile(os.path.join(cut, checkpoint.FILE))
    res = run(dataclasses.replace(cfg, out=cut), progress=False, resume=True)
    assert res["status"] == "completed"
    a, b = metrics(whole), metrics(cut)
    assert len(a) == len(b) >= 6
    for ra, rb in zip(a, b, strict=True):
        assert ra == rb
    ma = torch.load(os.path.join(whole, "models.pt"), weights_only=True)
    mb = torch.load(os.path.join(cut, "models.pt"), weights_only=True)
    assert torch.equal(ma["X"], mb["X"])
    if case["algo"] in STATE_CHECKED:  # the last checkpoints of the two runs, key for key
        ca, cb = (torch.load(os.path.join(f, checkpoint.FILE), weights_only=True)
                  for f in (whole, cut))
        assert ca["position"] == cb["position"]
        for c in (ca, cb):  # w.state readable in a message: decoded (a handle as a tuple)
            for w in c["workers"]:
                w["state"] = state_tree.decode(w["state"], lambda v: ("handle", v))
        for key in ("workers", "bank", "engine"):
            assert not tree_difference(ca[key], cb[key], key), tree_difference(
                ca[key], cb[key], key)


@pytest.mark.parametrize("case_id", ["swarm-sequential-pull-qsgd", "sgp-overlap-topology"])
def test_a_checkpoint_asked_at_any_moment_is_a_consistent_cut(
        case_id: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ctrl-C does: a checkpoint asked at a virtual time (not at a multiple of
    checkpoint_every), so the safe points are at positions no schedule chose; the run killed
    after it and resumed equals the whole run asked at the same moment (the sequential
    stream's positions and messages waiting in inboxes included)."""
    case = dict(CASES)[case_id]
    cfg = tiny(**case, steps=30, evals=5, network="wan")
    ask = {"at": 0.137}
    poll = saving.SimCheckpoints.poll

    def asking_poll(self: Any) -> None:
        if ask["at"] is not None and self.engine.now >= ask["at"]:
            ask["at"] = None
            self.engine.request_checkpoint()
            self.asked = True
        poll(self)

    monkeypatch.setattr(saving.SimCheckpoints, "poll", asking_poll)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(dataclasses.replace(cfg, out=whole), progress=False)
    ask["at"] = 0.137
    assert run_killed_after(dataclasses.replace(cfg, out=cut), 1, monkeypatch) == 1
    position = torch.load(os.path.join(cut, checkpoint.FILE), weights_only=True)["position"]
    assert 0 < position < 30
    run(dataclasses.replace(cfg, out=cut), progress=False, resume=True)
    assert metrics(whole) == metrics(cut)
    assert torch.equal(torch.load(os.path.join(whole, "models.pt"), weights_only=True)["X"],
                       torch.load(os.path.join(cut, "models.pt"), weights_only=True)["X"])


# Algorithms whose models cannot depend on time: every exchange is a collective of all
# workers, each worker's sequence of local steps and aggregations is fixed by the config,
# so waiting for an aggregation earlier (at a checkpoint) changes no number.
SYNCHRONOUS = [
    ("olco3", {"p": 2, "s": 1}),
    ("efsgd", {"aggregation": "ps", "server_compressor": "qsgd:bits=4"}),
    ("qsparse", {"p": 3}),
    ("pipesgd", {"s": 2, "compressor": "powersgd:rank=1"}),
    ("cocod", {"p": 3}),
    ("overlap-local", {"p": 3}),
    ("diloco", {"p": 3}),
    ("streaming-diloco", {"p": 6, "fragments": 2, "tau": 2}),
]


@pytest.mark.parametrize("algo, opts", SYNCHRONOUS, ids=[a for a, _ in SYNCHRONOUS])
def test_checkpoints_change_no_parameter_of_a_synchronous_run(algo: str, opts: dict[str, Any],
                                                              tmp_path: Any) -> None:
    """A barrier only costs time: the models with checkpoints equal those without (the
    aggregations in flight are waited for, not applied early). Local steps one worker at a
    time (``batching: loop``): a barrier changes which workers compute at the same instant
    (a parameter server's replies reach the workers one after another), and vmapped groups
    of other sizes round differently."""
    base = tiny(algo=algo, algo_options=opts, steps=24, evals=2, network="wan",
                batching="loop")
    finals, stalls = [], []
    for every in (None, 5):
        out = str(tmp_path / f"e{every}")
        res = run(dataclasses.replace(base, checkpoint_every=every, out=out), progress=False)
        finals.append(torch.load(os.path.join(out, "models.pt"), weights_only=True)["X"])
        stalls.append(res["final"]["stall_time_s_mean"])
    assert torch.equal(finals[0], finals[1])
    ck = torch.load(os.path.join(str(tmp_path / "e5"), checkpoint.FILE), weights_only=True)
    assert ck["position"] >= 20  # it did stop at its safe points, up to the last one
    assert stalls[1] >= stalls[0]  # the barriers' waits are stall


def test_an_inconsistent_streaming_diloco_state_is_one_line_not_a_hang(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose schedule state lies behind its step would make the program
    compute zero steps forever; it is refused instead."""
    cfg = tiny(algo="streaming-diloco", algo_options={"p": 4, "fragments": 2}, steps=24,
               evals=2, checkpoint_every=5)
    cut = str(tmp_path / "cut")
    run_killed_after(dataclasses.replace(cfg, out=cut), 2, monkeypatch)
    path = os.path.join(cut, checkpoint.FILE)
    ck = torch.load(path, weights_only=True)
    for wk in ck["workers"]:
        wk["state"]["items"] = [(k, 1 if k == "next_sync" else v)
                                for k, v in wk["state"]["items"]]
    torch.save(ck, path)
    r = _cli("resume", cut, "-q")
    _, err = r.communicate(timeout=120)
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "inconsistent state at inner step 10: next sync #1 was due at step 2" in err


def test_a_checkpoint_is_a_weights_only_file_with_the_documented_keys(tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    run(dataclasses.replace(tiny(algo="allreduce", steps=12, checkpoint_every=5), out=out),
        progress=False)  # a safe point at every step: checkpoints at 5 and 10
    ck = torch.load(os.path.join(out, checkpoint.FILE), weights_only=True)
    assert ck["format"] == checkpoint.FORMAT and ck["runtime"] == "sim"
    assert {"config", "position", "virtual_time", "bank", "workers", "engine", "run"} <= set(ck)
    assert ck["position"] == 10  # the second multiple of 5 local steps


@pytest.mark.parametrize("damage", ["truncate", "foreign", "garbage"])
def test_a_damaged_or_foreign_checkpoint_is_one_line(damage: str, tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    cfg = dataclasses.replace(tiny(algo="localsgd", steps=12, checkpoint_every=5), out=out)
    run(cfg, progress=False)
    path = os.path.join(out, checkpoint.FILE)
    data = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "foreign":
        torch.save({"format": "something-else", "x": torch.zeros(2)}, path)
    else:
        open(path, "wb").write(b"\x80\x04not a checkpoint at all")
    with pytest.raises(ConfigError) as e:
        run(cfg, progress=False, resume=True)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    cfg = dataclasses.replace(tiny(algo="localsgd", steps=12, checkpoint_every=5), out=out)
    run(cfg, progress=False)
    with pytest.raises(ConfigError, match="belongs to another run: seed"):
        run(dataclasses.replace(cfg, seed=3), progress=False, resume=True)


def test_a_pickle_in_a_checkpoint_runs_nothing(tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    cfg = dataclasses.replace(tiny(algo="localsgd", steps=12, checkpoint_every=5), out=out)
    run(cfg, progress=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    torch.save({"format": checkpoint.FORMAT, "evil": Evil()}, os.path.join(out, checkpoint.FILE))
    with pytest.raises(ConfigError):
        run(cfg, progress=False, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("value, ok", [(5, True), ("5", True), ("2.5min", True),
                                       ("0", False), (-1, False), ("soon", False),
                                       (True, False), ("nanmin", False)])
def test_checkpoint_every_is_checked(value: Any, ok: bool) -> None:
    if ok:
        tiny(checkpoint_every=value)
    else:
        with pytest.raises(ConfigError, match="checkpoint_every"):
            tiny(checkpoint_every=value)


# -- the command line, in real processes ----------------------------------------------------

def _cli(*args: str, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relaxsgd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _config_file(tmp_path: Any, **over: Any) -> str:
    d = {"algo": "olco3", "task": "logreg", "workers": 4, "steps": 400, "evals": 8,
         "task_options": {"n_train": 512, "n_test": 256, "dim": 8, "classes": 4},
         "compute": {"step_time_s": 0.01}, "train": {"batch_size": 8, "lr": 0.1},
         "algo_options": {"p": 2, "s": 1}, "checkpoint_every": 40, **over}
    path = str(tmp_path / "job.yaml")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f)  # JSON is YAML
    return path


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Any) -> None:
    job = _config_file(tmp_path)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    p = _cli("run", "--config", job, "--out", whole, "-q")
    assert p.wait(timeout=300) == 0, p.stderr.read()
    p = _cli("run", "--config", job, "--out", cut, "-q")
    path = os.path.join(cut, checkpoint.FILE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.exists(path):
            ck = torch.load(path, weights_only=True)
            if ck["position"] >= 120:
                break
        time.sleep(0.02)
    if p.poll() is not None:
        pytest.skip("the run ended before it could be killed (machine too fast)")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    r = _cli("resume", cut, "-q")
    assert r.wait(timeout=300) == 0, r.stderr.read()
    assert metrics(whole) == metrics(cut)
    assert json.load(open(os.path.join(cut, "result.json")))["status"] == "completed"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_resume_finishes(sig: int, tmp_path: Any) -> None:
    job = _config_file(tmp_path, steps=3000, evals=30, checkpoint_every=None)
    out = str(tmp_path / "r")
    p = _cli("run", "--config", job, "--out", out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if os.path.exists(os.path.join(out, "metrics.csv")) and \
                len(open(os.path.join(out, "metrics.csv")).readlines()) >= 3:
            break
        time.sleep(0.05)
    if p.poll() is not None:
        pytest.skip("the run ended before the signal (machine too fast)")
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "relaxsgd resume" in err.strip().splitlines()[-1]
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["status"] == "interrupted"
    assert os.path.isfile(os.path.join(out, checkpoint.FILE))
    assert os.path.isfile(os.path.join(out, "models.pt"))
    r = _cli("resume", out, "-q")
    assert r.wait(timeout=300) == 0, r.stderr.read()
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["status"] == "completed" and res["final"]["steps_per_worker"] == 3000


def test_resume_without_a_checkpoint_or_a_run_folder_is_one_line(tmp_path: Any) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("resume", str(empty))
    _, err = r.communicate(timeout=120)
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "config.yaml" in err
    out = str(tmp_path / "r")
    p = _cli("run", "--config", _config_file(tmp_path, steps=8, checkpoint_every=None),
             "--out", out, "-q")
    assert p.wait(timeout=120) == 0
    r = _cli("resume", out)
    _, err = r.communicate(timeout=120)
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "already completed" in err
    os.unlink(os.path.join(out, "result.json"))  # as if killed before its first checkpoint
    r = _cli("resume", out)
    _, err = r.communicate(timeout=120)
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint" in err


@pytest.mark.parametrize("algo, topology", [("localsgd", "complete"), ("swarm", "ring")])
def test_resume_restores_the_network_and_compute_generators(algo: str, topology: str,
                                                            tmp_path: Any,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A lossy, jittery link and straggling workers draw from the network's and the compute
    model's generators at every message and step: a resume that rebuilt them from the seed
    instead of the checkpoint would time (and, for gossip, order) everything differently."""
    cfg = tiny(algo=algo, topology=topology, steps=24, evals=6, network="mobile",
               compute={"step_time_s": 0.01, "heterogeneity": "stragglers",
                        "straggler_p": 0.3, "straggler_f": 4.0},
               checkpoint_every=5)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(dataclasses.replace(cfg, out=whole), progress=False)
    run_killed_after(dataclasses.replace(cfg, out=cut), 2, monkeypatch)
    run(dataclasses.replace(cfg, out=cut), progress=False, resume=True)
    assert metrics(whole) == metrics(cut)


@pytest.mark.parametrize("algo, topology", [("diloco", "complete"), ("swarm", "ring")])
def test_resume_restores_the_tcp_windows_and_the_spawn_groups(algo: str, topology: str,
                                                              tmp_path: Any,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """With slow start (a 64-byte first window: every message waits for flights) each
    connection's window, and which process group a spawn's collective uses, decide the
    times: a resume that opened every window afresh would time everything after it
    differently."""
    cfg = tiny(algo=algo, topology=topology, steps=24, evals=6, network="wan",
               network_options={"initial_window_B": 64, "restart_after_idle": False},
               algo_options={"p": 2} if algo == "diloco" else {}, checkpoint_every=5)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    run(dataclasses.replace(cfg, out=whole), progress=False)
    run_killed_after(dataclasses.replace(cfg, out=cut), 2, monkeypatch)
    run(dataclasses.replace(cfg, out=cut), progress=False, resume=True)
    assert metrics(whole) == metrics(cut)


def test_a_checkpoint_that_cannot_be_written_is_a_warning_and_the_run_goes_on(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def full_disk(path: str, data: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    out = str(tmp_path / "r")
    res = run(dataclasses.replace(tiny(algo="allreduce", steps=12, checkpoint_every=5),
                                  out=out), progress=False)
    assert res["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("checkpoint not written") == 2 and "No space left" in err
    assert not os.path.exists(os.path.join(out, checkpoint.FILE))


@pytest.mark.parametrize("damage", ["workers", "type"])
def test_a_checkpoint_damaged_inside_is_one_line_and_keeps_the_metrics(
        damage: str, tmp_path: Any) -> None:
    """A file torch reads but whose content is wrong (a worker missing, a type that is not
    allowed in state): one line, and the run's metrics.csv is left as it was."""
    out = str(tmp_path / "r")
    cfg = dataclasses.replace(tiny(algo="localsgd", steps=12, checkpoint_every=5), out=out)
    run(cfg, progress=False)
    path = os.path.join(out, checkpoint.FILE)
    ck = torch.load(path, weights_only=True)
    if damage == "workers":
        ck["engine"]["procs"] = ck["engine"]["procs"][:1]
    else:
        ck["workers"][0]["state"] = {"__relaxsgd_kind__": "type", "name": "os.system",
                                     "fields": {}}
    torch.save(ck, path)
    os.unlink(os.path.join(out, "result.json"))  # as if killed
    before = open(os.path.join(out, "metrics.csv")).read()
    with pytest.raises(ConfigError, match="cannot be restored") as e:
        run(cfg, progress=False, resume=True)
    assert "\n" not in str(e.value)
    assert open(os.path.join(out, "metrics.csv")).read() == before
