"""One-shot check of relaxsgd on a CUDA machine (issue 17): run it where a GPU is.

    PYTHONPATH=src:tests python benchmarks/cuda_check.py [--quick] [--out DIR]

1. every algorithm under ``--runtime dist`` on CUDA: one rank (two for the gossip ones,
   which need a partner), MNIST-1D, 120 steps: status ``completed``, device ``cuda:0``;
2. two ranks on one GPU (round-robin sharing, gloo collectives): Local SGD, OLCO3 and
   SwarmSGD (the point-to-point path with CUDA tensors) complete and do not hang;
3. OLCO3 (top-k through a parameter server, an aggregation in flight) checkpointed, one
   worker killed with SIGKILL, resumed: the models equal the uninterrupted run's bit for
   bit; its ``models.pt`` and checkpoints load with CUDA hidden (a CPU-only machine);
4. the CUDA-marked tests (``pytest -m cuda``): the conformance matrix on CUDA and the
   compressors' exact values; the simulator's CUDA tests (``tests/test_sim_device.py -k
   cuda``: vmapped BatchNorm against a module per worker, CPU against CUDA models);
5. the distributed runtime's tests with CUDA visible (skipped with ``--quick``).

Prints one line per check and a summary; exit status 1 if any failed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "tests")]

from distkit import resume_job, run_job  # noqa: E402
from relaxsgd.algorithms import ALGORITHMS  # noqa: E402

GOSSIP = {"swarm", "dpsgd", "adpsgd", "choco", "sgp"}
ENV = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.path.join(ROOT, "tests"),
                                      os.environ.get("PYTHONPATH", "")])}
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def _last_lines(r: Any) -> str:
    return " | ".join(x.strip().splitlines()[-1] for x in r.logs if x.strip())[:400]


def job(cfg: dict[str, Any], n: int, out: str, env: dict[str, str] | None = None,
        **kw: Any) -> Any:
    return run_job(cfg, n, out, timeout=kw.pop("timeout", 300), env={**ENV, **(env or {})},
                   **kw)


def all_algorithms(root: str, steps: int) -> None:
    for name in ALGORITHMS.names():
        n = 2 if name in GOSSIP else 1
        cfg = {"task": "mnist1d", "algo": name, "steps": steps, "evals": 3}
        if name in GOSSIP:
            cfg["topology"] = "ring"
        t = time.perf_counter()
        r = job(cfg, n, os.path.join(root, f"algo-{name}"))
        res = r.result or {}
        where = res.get("dist", {})
        ok = r.codes == [0] * n and res.get("status") == "completed" \
            and str(where.get("device", "")).startswith("cuda")
        check(f"dist {name} on {n} rank(s)", ok,
              f"{where.get('device')} {where.get('backend')} {time.perf_counter() - t:.1f}s"
              + ("" if ok else " " + _last_lines(r)))


def shared_gpu(root: str, steps: int) -> None:
    for name in ("localsgd", "olco3", "swarm"):
        cfg = {"task": "mnist1d", "algo": name, "steps": steps, "evals": 3}
        r = job(cfg, 2, os.path.join(root, f"shared-{name}"), timeout=180,
                env={"CUDA_VISIBLE_DEVICES": "0"})  # one GPU for both ranks
        res = r.result or {}
        where = res.get("dist", {})
        ok = r.codes == [0, 0] and res.get("status") == "completed" \
            and where.get("backend") == "gloo" and where.get("device") == "cuda:0"
        check(f"two ranks on one GPU: {name}", ok,
              f"{where.get('device')} {where.get('backend')}"
              + ("" if ok else " " + _last_lines(r)))


OLCO3 = {"task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8,
                                            "classes": 4},
         "algo": "olco3", "algo_options": {"p": 2, "s": 1}, "steps": 24, "evals": 6,
         "checkpoint_every": 5, "train": {"batch_size": 8, "lr": 0.05, "momentum": 0.9}}


def checkpoint_resume(root: str) -> None:
    whole = job(OLCO3, 2, os.path.join(root, "olco3-whole"))
    cut_dir = os.path.join(root, "olco3-cut")
    cut = job(OLCO3, 2, cut_dir, kill=(1, 13))
    resumed = resume_job(cut_dir, 2, timeout=300, env=ENV)
    ok = whole.models is not None and resumed.models is not None and \
        torch.equal(whole.models, resumed.models)
    check("OLCO3 killed after a checkpoint and resumed on CUDA: bit-identical models", ok,
          f"kill codes {cut.codes}, resume codes {resumed.codes}"
          + ("" if ok else " " + _last_lines(resumed)))
    probe = ("import glob, sys, torch; from relaxsgd import checkpoint, outputs; "
             "assert not torch.cuda.is_available(); d = sys.argv[1]; "
             "m = outputs.load_models(d + '/models.pt'); "
             "[torch.load(p, map_location='cpu', weights_only=True) "
             "for p in glob.glob(d + '/checkpoint*.pt')]; print(m['X'].device)")
    p = subprocess.run([sys.executable, "-c", probe, cut_dir], capture_output=True, text=True,
                       env={**os.environ, **ENV, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    check("models.pt and checkpoints written on the GPU load with CUDA hidden",
          p.returncode == 0, (p.stdout + p.stderr).strip()[-300:])


def pytest_run(name: str, args: list[str], timeout: int) -> None:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **ENV})
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    check(name, p.returncode == 0, f"{tail[0]} ({time.perf_counter() - t:.0f}s)")
    if p.returncode:
        print("\n".join((p.stdout + p.stderr).splitlines()[-40:]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the dist test files")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temp one)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: torch sees no CUDA GPU here; run it on a machine with one",
              file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
    root = args.out or tempfile.mkdtemp(prefix="cuda_check-")
    steps = 60 if args.quick else 120
    all_algorithms(root, steps)
    shared_gpu(root, steps)
    checkpoint_resume(root)
    pytest_run("CUDA-marked tests", ["-m", "cuda", "tests/test_devices.py",
                                     "tests/test_compress_values.py"], 900)
    pytest_run("simulator on CUDA (vmapped BatchNorm, CPU vs CUDA models, evaluation)",
               ["-k", "cuda", "tests/test_sim_device.py"], 600)
    if not args.quick:
        dist_tests = sorted(f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests"))
                            if f.startswith("test_dist_"))
        pytest_run("dist tests with CUDA visible", dist_tests, 1800)
    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed; runs in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
