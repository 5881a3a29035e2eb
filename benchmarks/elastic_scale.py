"""Scale of the dist runtime with connections on demand (issue 20): one gossip job of N
processes on this machine, and what each process holds.

    python benchmarks/elastic_scale.py -n 32                 # SwarmSGD on a ring
    python benchmarks/elastic_scale.py -n 16 --topology random-regular --degree 4
    python benchmarks/elastic_scale.py --quick               # 8 processes, a few steps

Runs ``relaxsgd run --runtime dist --algo swarm --task logreg`` under
``python -m relaxsgd.distributed.launch -n N`` with ``RELAXSGD_CONNECT=demand`` (and one
spawn group: gloo's own process groups, which a gossip run barely uses, build a full mesh
each). Every worker samples itself every 0.25 s (a hook installed by this script's
``--worker`` mode): the transport's open connections (both directions), how many it
opened in all, every TCP/Unix socket of the process (gloo's and the store's included),
and its resident memory (VmRSS). It prints one row per statistic over the processes, and
what a full mesh would hold (2(N-1) transport connections per process). Check ``free -g``
first: a torch process is ~0.3 GB resident.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def worker(out: str, argv: list[str]) -> int:
    """Run ``relaxsgd`` with ``argv`` in this process, sampling it (see the module doc)."""
    from relaxsgd import cli
    from relaxsgd.distributed.transport import Transport

    found: list[Transport] = []
    orig = Transport.start

    def start(self: Transport, *a: object, **k: object) -> None:
        found.append(self)
        orig(self, *a, **k)  # type: ignore[arg-type]

    Transport.start = start  # type: ignore[method-assign]
    samples: list[tuple[int, int, float]] = []

    def sample() -> None:
        while True:
            if found:
                samples.append((found[0].connections(), _sockets(), _rss_mb()))
            time.sleep(0.25)

    def dump() -> None:
        tr = found[0] if found else None
        with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump({"samples": samples, "opened": tr.opened if tr else None,
                       "dead": sorted(tr.dead) if tr else None}, f)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(dump)
    return cli.main(argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=32, help="processes (workers)")
    ap.add_argument("--topology", default="ring", choices=("ring", "random-regular"))
    ap.add_argument("--degree", type=int, default=4, help="random-regular's degree")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="8 processes, 100 steps")
    ap.add_argument("--out", default="/tmp/relaxsgd-elastic-scale")
    a = ap.parse_args()
    if a.quick:
        a.n, a.steps = 8, 100
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from relaxsgd.distributed.launch import LocalJob

    stats = os.path.join(a.out, "stats")
    os.makedirs(stats, exist_ok=True)
    run = ["run", "--runtime", "dist", "--algo", "swarm", "--task", "logreg", "--workers",
           str(a.n), "--topology", a.topology, "--steps", str(a.steps), "--evals", "3",
           "--out", os.path.join(a.out, f"run-n{a.n}"), "-q"]
    if a.topology == "random-regular":
        run += ["--set", f"topology.degree={a.degree}"]
    env = {"RELAXSGD_CONNECT": "demand", "RELAXSGD_SPAWN_GROUPS": "1",
           "OMP_NUM_THREADS": "1", "RELAXSGD_TIMEOUT": "300"}
    t = time.monotonic()
    job = LocalJob([sys.executable, os.path.abspath(__file__), "--worker", stats, "--", *run],
                   a.n, env=env, log_dir=os.path.join(a.out, "logs"))
    codes = job.wait(timeout=1800)
    wall = time.monotonic() - t
    with open(os.path.join(a.out, f"run-n{a.n}", "result.json")) as f:
        status = json.load(f)["status"]
    per = []
    for r in range(a.n):
        path = os.path.join(stats, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                per.append(json.load(f))
    print(f"{a.n} processes, swarm on logreg, {a.topology}"
          f"{f' (degree {a.degree})' if a.topology != 'ring' else ''}, {a.steps} steps: "
          f"status {status}, exit codes {sorted(set(codes))}, {wall:.0f} s wall; "
          f"load {os.getloadavg()[0]:.1f}")
    rows = [("transport connections (max over run)", [max(s[0] for s in p["samples"])
                                                      for p in per if p["samples"]]),
            ("transport connections (median)", [statistics.median(s[0] for s in p["samples"])
                                                for p in per if p["samples"]]),
            ("outgoing connections opened", [p["opened"] for p in per]),
            ("sockets of the process (max; gloo, store incl.)",
             [max(s[1] for s in p["samples"]) for p in per if p["samples"]]),
            ("resident memory MB (max)", [max(s[2] for s in p["samples"])
                                          for p in per if p["samples"]])]
    print(f"{'per process':<50} {'min':>8} {'median':>8} {'max':>8}")
    for name, vals in rows:
        if vals:
            print(f"{name:<50} {min(vals):>8.0f} {statistics.median(vals):>8.0f} "
                  f"{max(vals):>8.0f}")
    print(f"a full mesh: {2 * (a.n - 1)} transport connections per process; "
          f"{len(per)} of {a.n} processes reported")
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        rest = sys.argv[3:]
        raise SystemExit(worker(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    raise SystemExit(main())
