"""Our transport's quorum all-reduce against gloo's, on loopback (issue 20).

An elastic dist job runs its collectives as quorum rounds on the job's authenticated
transport (:mod:`relaxsgd.distributed.quorum`: every member sends its tensor to the lowest
live id, which averages and sends the mean back) instead of gloo's ring, because a gloo
group breaks when a member dies. This measures what that costs: n processes on this
machine (one torch thread each) do back-to-back all-reduces of the MNIST-1D CNN's
parameters (float32) with gloo and with the quorum rounds, interleaved in blocks in the
same processes, and rank 0 prints the median time per all-reduce of each and the ratio.

    python benchmarks/quorum_allreduce.py              # 2 and 4 processes, 5 x 20 each
    python benchmarks/quorum_allreduce.py --quick      # 5 x 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_size() -> int:
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare

    spec = prepare(from_dict({"task": "mnist1d", "task_options": {"model": "cnn"},
                              "workers": 2})).spec
    return sum(p.numel() for p in spec.model_fn().parameters())


def worker(d: int, blocks: int, per: int) -> None:
    import torch.distributed as dist

    from relaxsgd.algorithms.base import AllReduce
    from relaxsgd.distributed.auth import from_env
    from relaxsgd.distributed.collectives import Counts
    from relaxsgd.distributed.elastic import live_of
    from relaxsgd.distributed.quorum import QuorumCollectives
    from relaxsgd.distributed.transport import Transport

    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), n, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("g", store), rank=rank,
                            world_size=n)
    q: list[QuorumCollectives] = []
    tr = Transport(rank, n, lambda src, msg: q[0].on_message(src, msg), 60.0, None,
                   auth=from_env(), max_frame=8 * d + (1 << 20))
    q.append(QuorumCollectives(rank, n, tr.send, lambda: live_of(tr), range(n),
                               timeout_s=60.0))
    tr.start(store, "127.0.0.1")
    x = torch.randn(d)
    times: dict[str, list[float]] = {"gloo": [], "transport": []}
    k = 0
    for _ in range(blocks):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(per):
            y = x.clone()
            dist.all_reduce(y)
            y.div_(n)
        times["gloo"].append((time.perf_counter() - t) / per)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(per):
            h = q[0].all_reduce(k, AllReduce(x), Counts())
            k += 1
            h.event.wait(60)
            h.result()
        times["transport"].append((time.perf_counter() - t) / per)
    dist.barrier()
    if rank == 0:
        print(json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)
    tr.close(wait_s=2.0)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return 0
    from relaxsgd.distributed.launch import LocalJob

    d = model_size()
    blocks, per = (5, 5) if a.quick else (5, 20)
    print(f"all-reduce of {d} float32 ({4 * d / 1024:.0f} KiB), median of {blocks} blocks "
          f"of {per}; load {os.getloadavg()[0]:.2f}")
    print(f"{'procs':>5}  {'gloo ms':>8}  {'transport ms':>12}  {'ratio':>6}")
    for n in a.procs:
        with tempfile.TemporaryDirectory() as logs:
            job = LocalJob([sys.executable, __file__, "--worker", str(d), str(blocks),
                            str(per)], n, env={"PYTHONPATH": os.path.join(ROOT, "src")},
                           log_dir=logs)
            codes = job.wait(timeout=300, grace=5.0)
            text = job.output(0)
        if any(codes):
            print(f"{n} processes failed ({codes}): {text[-500:]}")
            return 1
        got = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
        g, t = 1e3 * got["gloo"], 1e3 * got["transport"]
        print(f"{n:>5}  {g:8.2f}  {t:12.2f}  {t / g:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
