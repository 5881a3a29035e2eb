"""The ``relaxsgd lab`` and ``relaxsgd calibrate`` subcommands.

``relaxsgd lab --workers 2 --latency 0.025 --rate 80e6 -- relaxsgd run --runtime dist
--workers 2 ...`` builds the emulated network (:mod:`.netlab`), runs the command once per
worker inside it (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR = worker 0), tears
everything down (also on Ctrl-C, SIGTERM, an error or a killed worker) and prints the
forwarder's statistics. Its exit status is the workers' (the first that failed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from ..errors import ConfigError


def add_lab_parser(sub: Any) -> None:
    p = sub.add_parser("lab", help="run a dist command on an emulated network (root)",
                       description="Build 2-8 workers, one network namespace each, joined "
                       "by links of the given one-way latency, rate, jitter and loss "
                       "(addresses in 198.51.100.0/24 or 192.0.2.0/24); run COMMAND once "
                       "per worker as a torchrun-style job; tear everything down.")
    p.add_argument("--workers", type=int, required=True, help="2 to 8")
    p.add_argument("--latency", type=float, default=0.0, help="one-way seconds (default 0)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="uplink of each worker in bit/s (default 0: unshaped)")
    p.add_argument("--jitter", type=float, default=0.0,
                   help="sigma of a log-normal factor on each packet's latency")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability")
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--prefix", default="198.51.100", help="198.51.100 or 192.0.2")
    p.add_argument("--port", type=int, default=29500, help="MASTER_PORT on worker 0")
    p.add_argument("--timeout", type=float, help="seconds before the workers are stopped")
    p.add_argument("--stats", help="also write the forwarder's statistics to this file")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the command each worker runs")


def cmd_lab(args: argparse.Namespace) -> int:
    from .netlab import Lab, LinkSpec

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise ConfigError("relaxsgd lab needs a command after '--', e.g. -- relaxsgd run "
                          "--runtime dist --workers 2 ...")
    link = LinkSpec(args.latency, args.rate, args.jitter, args.loss, args.mtu, args.prefix)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # both, explicitly: a process started in the background by a shell ignores SIGINT
    old = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    lab = Lab(args.workers, link)
    try:
        with lab:
            env_desc = (f"{args.workers} workers, one-way {args.latency:g} s, rate "
                        f"{args.rate:g} bit/s, jitter {args.jitter:g}, loss {args.loss:g}")
            codes = lab.run_workers(cmd, port=args.port, timeout_s=args.timeout,
                                    extra_env={"RELAXSGD_LAB": env_desc})
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        stats = lab.forwarder_stats()
        if stats:
            sys.stderr.write(f"relaxsgd lab: forwarder {json.dumps(stats)}\n")
            if args.stats:
                with open(args.stats, "w", encoding="utf-8") as f:
                    json.dump(stats, f)
    bad = [c for c in codes if c != 0]
    return 0 if not bad else (bad[0] if bad[0] > 0 else 128 - bad[0])


def add_calibrate_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser("calibrate", help="measure real workers; write a profile file",
                       description="Run once per worker (under 'relaxsgd lab ... --' or "
                       "torchrun) with the run's task, model and batch: measures the step "
                       "time, the network's latency, and the runtime's own collectives and "
                       "point-to-point messages (per-message overhead, bandwidth); "
                       "rank 0 writes --out (a YAML profile for --compute FILE and "
                       "--network FILE).")
    common(p)


def cmd_calibrate(args: argparse.Namespace, cfg_dict: dict[str, Any]) -> int:
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from ..config import from_dict
    from ..distributed.auth import store_key
    from ..distributed.environment import check
    from ..distributed.rendezvous import rendezvous
    from ..distributed.sockets import local_address
    from ..sim.profile_file import write_profile
    from .calibrate import calibrate

    # the dist runtime's start-up: every setting checked (a missing secret is one line
    # before any connection), then the job's signed store
    env, opts, auth = check()
    rank, world = env.rank, env.world
    out = cfg_dict.pop("out", None) or "profile.yaml"
    cfg = from_dict({**cfg_dict, "workers": world, "runtime": "sim"})
    torch.set_num_threads(max(cfg.threads, 1))
    host = os.environ.get("RELAXSGD_HOST") or local_address(
        os.environ.get("MASTER_ADDR", "127.0.0.1"))
    rdv = rendezvous(env, store_key(auth), opts.rendezvous_s)
    store, group_store = rdv.run_store()
    rdv.meet(store)
    dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=opts.rendezvous_s))
    rdv.started()  # as the runtime does: start-up failures are no longer watched for
    try:
        prof = calibrate(cfg, rank, host, store)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        write_profile(out, prof)
        c, n = prof["compute"], prof["network"]
        print(f"step {c['step_time_s'] * 1e3:.3f} ms ({c['flops_per_s'] / 1e9:.1f} GFLOP/s; "
              f"spread in a round: sigma {c['step_sigma']:.3f}, slowest/mean "
              f"{c['step_max_over_mean']:.2f}), "
              f"latency {n['latency_s'] * 1e3:.2f} ms, overhead "
              f"{n['overhead_s'] * 1e6:.0f} us a message, bandwidth "
              f"{n['bandwidth_Bps'] * 8 / 1e6:.1f} Mbit/s; profile in {out}")
    return 0
