# ruff: noqa: E501  (a table of cases: one case per line reads best)
"""A pass of 233 bad inputs through ``relaxsgd.cli.main``, in one process (issue 21).

``python benchmarks/bad_inputs_pass.py [CATEGORY|NAME]``: flags, config keys and values of
every section, edge lists and profile files, MNIST/CIFAR-10/Shakespeare data folders,
report, resume, compare, calibrate. A refusal must be exit 2 with one ``relaxsgd: error:``
line, no traceback, nothing in ``o/``, within 30 s; cases marked "accept" must exit 0. Each
case runs in a fresh temporary folder; memory is capped at 12 GB. Prints a line per case
and a table of counts per category; the fast, instructive ones are kept as tests in
tests/test_bad_inputs.py.
"""
import contextlib
import gzip
import io
import json
import os
import pickle
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
import torch  # noqa: E402

from relaxsgd.cli import main  # noqa: E402

S = ["--task", "logreg", "--workers", "2", "--steps", "4", "--evals", "2", "-q",
     "--step-time", "0.01", "--set", "task.n_train=128", "--set", "task.n_test=64"]
R = ["run", *S]
CASES = []  # (category, id, args, files, expect: "refuse" | "accept" | int)

def case(cat, cid, args, files=None, expect="refuse"):
    CASES.append((cat, cid, args, files or {}, expect))

def cfg(text):
    return {"c.yaml": text}

# -- A. flags of run ------------------------------------------------------------------
for flag, vals in {"--workers": ["0", "-1", "abc", "1e3", "99999999999999999999"],
                   "--steps": ["0", "-5", "1.5"], "--epochs": ["-1", "nan", "inf", "1e400", "0"],
                   "--batch-size": ["0", "-1", "100000000"], "--lr": ["0", "-1", "nan", "inf"],
                   "--seed": ["-1", str(2**64)], "--evals": ["0", "1000000000"],
                   "--split": ["bogus", ""], "--runtime": ["bogus"], "--topology": ["bogus"],
                   "--network": ["bogus", "/nonexistent.yaml"], "--compute": ["bogus"],
                   "--step-time": ["abc", "0", "-1", "nan"],
                   "--checkpoint-every": ["0", "-1", "abc", "0min", "-5min", "nanmin", "1e30min"],
                   "--task": ["bogus", "ＭＮＩＳＴ"], "--data-dir": ["/nonexistent"]}.items():
    for v in vals:
        if flag in ("--steps", "--evals", "--workers", "--batch-size", "--epochs"):
            args = [a for i, a in enumerate(R) if not (R[i - 1] == flag or a == flag)]
        else:
            args = list(R)
        case("flags", f"{flag}={v}", args + [flag, v, "--out", "o"],
             expect="accept" if v == "1e30min" else "refuse")
case("flags", "--algo=bogus", R + ["--algo", "bogus"])
case("flags", "--algo=unicode", R + ["--algo", "lòcalsgd"])
case("flags", "--out=a-file", R + ["--out", "f"], {"f": "x"})
case("flags", "--out=under-a-file", R + ["--out", "f/sub"], {"f": "x"})
case("flags", "--out=/proc/x", R + ["--out", "/proc/relaxsgd-x"])
case("flags", "--set-no-equals", R + ["--set", "p"])
case("flags", "--set-empty-key", R + ["--set", "=1"])
case("flags", "--set-bogus-section", R + ["--set", "bogus.x=1"])
case("flags", "--set-unknown-key", R + ["--set", "nosuchkey=1"])
case("flags", "--set-fullwidth-digits", R + ["--set", "seed=１２"])
case("flags", "--set-seed-huge", R + ["--set", "seed=1e400"])
case("flags", "--set-nul", R + ["--set", "algo=local\x01sgd"])
case("flags", "unknown-flag", R + ["--bogus"])
case("flags", "no-subcommand", [])
case("flags", "list-extra", ["list", "extra"])

# -- B. config keys and values of every section --------------------------------------
for text in ["workers: '8'", "workers: 8.0", "workers: true", "steps: 4\nepochs: 1",
             "evals: []", "seed: 1.5", "threads: -1", "threads: 5000", "eval_samples: -1",
             "batching: bogus", "runtime: []", "data_dir: 5", "checkpoint_every: [1]",
             "out: 5", "nosuchkey: 1", "algo_options: 5", "algo_options: {nosuch: 1}",
             "task_options: {nosuch: 1}", "task_options: {model: bogus}",
             "task_options: {n_train: -5}", "task_options: {hidden: [0]}",
             "task_options: {model: mlp, hidden: 'abc'}", "split_options: {alpha: 1}",
             "split: dirichlet\nsplit_options: {alpha: -1}",
             "split: shards\nsplit_options: {shards_per_worker: 1000000}",
             "network_options: {latency_s: -1}", "network_options: {latency_s: .nan}",
             "network_options: {latency_s: abc}", "network_options: {bogus: 1}",
             "network_options: {loss: 1}", "network_options: {bandwidth_Bps: 0}",
             "network_options: {backend: bogus}", "topology: ring\ntopology_options: {x: 1}",
             "topology: torus\ntopology_options: {rows: 7}\nalgo: dpsgd",
             "topology: random_regular\ntopology_options: {degree: 99}\nalgo: dpsgd",
             "train: {lr: abc}", "train: {momentum: 1}", "train: {batch_size: 0}",
             "train: {schedule: bogus}", "train: {optimizer: bogus}",
             "train: {optimizer: adamw, betas: [0.9]}", "train: {warmup_steps: -1}",
             "train: {nesterov: true}", "train: {gamma: 0.5}", "train: {eps: 1.0e-6}",
             "train: {milestones: {a: 1}}", "compute: {profile: bogus}",
             "compute: {heterogeneity: bogus}", "compute: {workers_per_core: 0}",
             "compute: {heterogeneity: stragglers, straggler_p: 2}",
             "compute: {step_time_s: abc}", "compute: {straggler_f: 3}",
             "compute: {heterogeneity: fixed}", "compute: {heterogeneity: fixed, speed_factors: [0]}",
             "compute: {heterogeneity: fixed, speed_factors: [1, 2, 3, 4]}",
             "algo: localsgd\nalgo_options: {p: 0}", "algo: swarm\nalgo_options: {bits: 100}",
             "algo: swarm\nalgo_options: {quantizer: bogus}",
             "algo: swarm\nalgo_options: {quantizer: none, safety: 3}",
             "algo: olco3\nalgo_options: {s: -1}", "algo: olco3\nalgo_options: {server_compensation: true, aggregation: allreduce}",
             "algo: efsgd\nalgo_options: {compressor: bogus}",
             "algo: efsgd\nalgo_options: {compressor: 'topk:ratio=2'}",
             "algo: efsgd\nalgo_options: {compressor: 'qsgd:bits=0'}",
             "algo: efsgd\nalgo_options: {compressor: 'powersgd:rank=0'}",
             "algo: efsgd\nalgo_options: {compressor: 'ef(ef(ef(sign)))'}",
             "algo: efsgd\nalgo_options: {server_error_feedback: false}",
             "algo: diloco\nalgo_options: {outer_lr: .nan}", "algo: sgp\nalgo_options: {graph: bogus}",
             "algo: choco\nalgo_options: {gamma: 2}", "algo: pipesgd\nalgo_options: {s: -1}",
             "algo: adpsgd\nalgo_options: {split: bogus}",
             "seed: 99999999999999999999999", "workers: 1e400", "evals: !!python/object:os.system 'x'",
             "task: logreg\ntask: mnist", "a: [unclosed", "\t- tab", "{{{{", "'''",
             "workers: &w 2\nevals: *w\nalgo: *w"]:
    case("config", text.replace("\n", " | ")[:60], ["run", "--config", "c.yaml", "-q", "--out", "o",
         "--task", "logreg", "--steps", "4", "--set", "task.n_train=128"]
         + ([] if text.startswith("workers") else ["--workers", "2"]),
         cfg(text + "\n"), "accept" if text in ("steps: 4\nepochs: 1", "out: 5",
                                                 "task_options: {n_train: -5}") else "refuse")
# the same values without the flags that override them (with the flags: accepted, right)
for text in ["steps: 4\nepochs: 1", "out: 5", "task_options: {n_train: -5}"]:
    case("config", "alone " + text.replace("\n", " | "), ["run", "--config", "c.yaml", "-q",
         "--task", "logreg", "--workers", "2"], cfg(text + "\n"))
case("config", "empty-file", ["run", "--config", "c.yaml", "--task", "logreg", "--workers", "2",
     "--steps", "2", "--evals", "1", "-q", "--set", "task.n_train=128", "--out", "o"], cfg(""),
     "accept")
case("config", "bom-and-crlf", ["run", "--config", "c.yaml", "-q", "--out", "o"],
     {"c.yaml": b"\xef\xbb\xbftask: logreg\r\nworkers: 2\r\nsteps: 2\r\nevals: 1\r\n"
      b"task_options: {n_train: 128}\r\n"}, "accept")
case("config", "null-sections-then-set", ["run", "--config", "c.yaml", "-q", "--out", "o",
     "--set", "algo.p=2", "--set", "train.lr=1e-2"],
     cfg("task: logreg\nworkers: 2\nsteps: 2\nevals: 1\nalgo_options:\ntrain:\n"
         "task_options: {n_train: 128}\n"), "accept")
case("config", "binary", ["run", "--config", "c.yaml"], {"c.yaml": os.urandom(3000)})
case("config", "huge-2MB", ["run", "--config", "c.yaml"], cfg("# " + "x" * (2 << 20)))
case("config", "deep-nesting", ["run", "--config", "c.yaml"], cfg("a: " + "[" * 3000 + "]" * 3000))
case("config", "many-keys", ["run", "--config", "c.yaml"],
     cfg("algo_options: {" + ", ".join(f"k{i}: {i}" for i in range(50000)) + "}"))

# -- C. files: profiles and edge lists ---------------------------------------------------
EDGES = ["run", *S, "--algo", "dpsgd", "--topology", "edges", "--set", "topology.path=e.txt"]
for name, text in [("out-of-range", "0 1\n1 5\n"), ("self-loop", "0 0\n"), ("three-fields", "0 1 2\n"),
                   ("disconnected", "# none\n"), ("empty", ""), ("floats", "0.5 1\n"),
                   ("negative", "-1 0\n"), ("huge-id", "0 99999999999999999999\n"),
                   ("utf16", "0 1\n".encode("utf-16")), ("latin1", b"0 1 # \xe9\n"),
                   ("20MB", "0 1\n" * (5 << 20))]:
    case("files", f"edges-{name}", EDGES + ["--out", "o"], {"e.txt": text})
case("files", "edges-folder", EDGES, {"e.txt/x": "0 1\n"})
case("files", "edges-missing-path", ["run", *S, "--algo", "dpsgd", "--topology", "edges"])
case("files", "edges-dangling-symlink", EDGES, {"e.txt": lambda p: os.symlink("/nonexistent", p)})
case("files", "edges-unreadable-root-reads-it", EDGES, {"e.txt": lambda p: (p.write_text("0 1\n"), os.chmod(p, 0))}, "accept")
for name, text in [("binary", os.urandom(500)), ("no-section", "foo: 1\n"),
                   ("no-flops", "compute: {overhead_s: 1}\n"),
                   ("negative", "compute: {flops_per_s: -1}\n"),
                   ("nan", "compute: {flops_per_s: .nan}\n"), ("string", "compute: {flops_per_s: abc}\n"),
                   ("list", "- 1\n"), ("laughs", "compute: &a [*a]\n")]:
    case("files", f"compute-profile-{name}", R + ["--compute", "p.yaml"], {"p.yaml": text})
for name, text in [("binary", os.urandom(500)), ("no-section", "foo: 1\n"),
                   ("negative-latency", "network: {latency_s: -1, bandwidth_Bps: 1e6}\n"),
                   ("string-bw", "network: {latency_s: 0.1, bandwidth_Bps: fast}\n"),
                   ("bad-fits", "network: {latency_s: 0.1, bandwidth_Bps: 1e6, collectives: 5}\n")]:
    case("files", f"network-profile-{name}", R + ["--network", "n.yaml"], {"n.yaml": text})

# -- D. data dirs -----------------------------------------------------------------------
MN = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
      "t10k-labels-idx1-ubyte"]
MRUN = ["run", "--task", "mnist", "--workers", "2", "--steps", "2", "--evals", "1", "-q",
        "--data-dir", "d", "--out", "o"]
def idx(magic, dims, data):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + data
case("data", "mnist-empty-dir", MRUN, {"d/.keep": ""})
case("data", "mnist-empty-files", MRUN, {f"d/{n}": b"" for n in MN})
case("data", "mnist-wrong-magic", MRUN, {f"d/{n}": idx(1234, [1], b"\0") for n in MN})
case("data", "mnist-truncated", MRUN, {f"d/{MN[0]}": idx(2051, [10, 28, 28], b"\0" * 100)})
case("data", "mnist-huge-dims", MRUN, {f"d/{MN[0]}": idx(2051, [2**31, 2**31, 2**31], b"")})
case("data", "mnist-gzip-bomb", MRUN, {f"d/{MN[0]}.gz": gzip.compress(idx(2051, [100000, 28, 28], b"") + b"\0" * (100 << 20))})
case("data", "mnist-corrupt-gzip", MRUN, {f"d/{MN[0]}.gz": b"\x1f\x8b" + os.urandom(1000)})
case("data", "mnist-file-is-a-dir", MRUN, {f"d/{MN[0]}/x": ""})
case("data", "mnist-file-is-a-fifo", MRUN, {f"d/{MN[0]}": lambda p: os.mkfifo(p)})
case("data", "mnist-labels-over-9", MRUN, {f"d/{MN[0]}": idx(2051, [2, 28, 28], b"\0" * 1568),
                                           f"d/{MN[1]}": idx(2049, [2], b"\x0a\x0b")})
case("data", "data-dir-is-a-file", MRUN, {"d": "x"})
CRUN = ["run", "--task", "cifar10", "--workers", "2", "--steps", "2", "--evals", "1", "-q",
        "--data-dir", "d", "--out", "o"]
class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))
case("data", "cifar-evil-pickle", CRUN, {"d/data_batch_1": pickle.dumps(Evil())})
case("data", "cifar-random-bytes", CRUN, {"d/data_batch_1": os.urandom(5000)})
case("data", "cifar-wrong-shape", CRUN, {"d/data_batch_1": pickle.dumps({b"data": [[1, 2]], b"labels": [1]})})
case("data", "cifar-labels-out-of-range", CRUN, {"d/data_batch_1": pickle.dumps(
    {b"data": __import__("numpy").zeros((1, 3072), "uint8"), b"labels": [99]})})
SRUN = ["run", "--task", "shakespeare", "--workers", "2", "--steps", "2", "--evals", "1", "-q",
        "--data-dir", "d", "--out", "o"]
case("data", "shakespeare-latin1", SRUN, {"d/plays.txt": b"caf\xe9\n" * 100})
case("data", "shakespeare-empty", SRUN, {"d/plays.txt": b""})
case("data", "shakespeare-gz-corrupt", SRUN, {"d/plays.txt.gz": b"\x1f\x8b" + os.urandom(500)})

# -- E. report --------------------------------------------------------------------------
RES = json.dumps({"algorithm": "localsgd", "status": "completed", "final": {"accuracy_mean_model": 0.5}})
GOODCSV = "virtual_time_s,bytes_sent_total,accuracy_mean_model\n1,2,0.5\n"
case("report", "nonexistent", ["report", "nope"])
case("report", "a-file", ["report", "f"], {"f": "x"})
case("report", "empty-dir", ["report", "r"], {"r/.keep": ""})
case("report", "result-garbage", ["report", "r"], {"r/result.json": os.urandom(100)})
case("report", "result-a-list", ["report", "r"], {"r/result.json": "[1, 2]"})
case("report", "result-no-status", ["report", "r"], {"r/result.json": '{"algorithm": "x"}'})
case("report", "result-huge", ["report", "r"], {"r/result.json": "[" + "1," * (9 << 20) + "1]"})
case("report", "result-is-fifo", ["report", "r"], {"r/result.json": lambda p: os.mkfifo(p)})
case("report", "result-final-a-string", ["report", "r"],
     {"r/result.json": '{"algorithm": "x", "status": "completed", "final": "abc"}', "r/metrics.csv": GOODCSV}, "accept")
case("report", "metrics-random", ["report", "r"], {"r/result.json": RES, "r/metrics.csv": os.urandom(2000)})
case("report", "metrics-missing", ["report", "r"], {"r/result.json": RES})
case("report", "metrics-empty", ["report", "r"], {"r/result.json": RES, "r/metrics.csv": ""})
case("report", "metrics-dir", ["report", "r"], {"r/result.json": RES, "r/metrics.csv/x": ""})
case("report", "metrics-cut-last-line", ["report", "r"], {"r/result.json": RES, "r/metrics.csv": GOODCSV + "2,3"}, "accept")
case("report", "metrics-nan-inf", ["report", "r"], {"r/result.json": RES, "r/metrics.csv": GOODCSV + "nan,inf,-inf\n"}, "accept")
case("report", "markdown-into-dir", ["report", "r", "--markdown", "md"], {"r/result.json": RES, "r/metrics.csv": GOODCSV, "md/x": ""})
case("report", "out-non-empty", ["report", "r", "--out", "md"], {"r/result.json": RES, "r/metrics.csv": GOODCSV, "md/x": ""})
case("report", "result-unicode-algo", ["report", "r"], {"r/result.json": json.dumps({"algorithm": "ü\u202e|x", "status": "completed", "final": {}}), "r/metrics.csv": GOODCSV}, "accept")

# -- F. resume ------------------------------------------------------------------------
case("resume", "nonexistent", ["resume", "nope"])
case("resume", "a-file", ["resume", "f"], {"f": "x"})
case("resume", "config-garbage", ["resume", "r"], {"r/config.yaml": os.urandom(300)})
case("resume", "config-ok-no-checkpoint", ["resume", "r"], {"r/config.yaml": "task: logreg\nworkers: 2\nsteps: 2\n"})
case("resume", "checkpoint-garbage", ["resume", "r"], {"r/config.yaml": "task: logreg\nworkers: 2\nsteps: 2\n", "r/checkpoint.pt": os.urandom(1000)})
case("resume", "checkpoint-is-dir", ["resume", "r"], {"r/config.yaml": "task: logreg\nworkers: 2\nsteps: 2\n", "r/checkpoint.pt/x": ""})
case("resume", "checkpoint-pickle", ["resume", "r"], {"r/config.yaml": "task: logreg\nworkers: 2\nsteps: 2\n", "r/checkpoint.pt": lambda p: torch.save({"x": Evil()}, p) if False else p.write_bytes(pickle.dumps(Evil()))})
case("resume", "completed", ["resume", "r"], {"r/config.yaml": "task: logreg\n", "r/result.json": RES})

# -- G. compare -----------------------------------------------------------------------
C = ["compare", *S]
case("compare", "algos-empty", C + ["--algos", ","])
case("compare", "algos-bogus", C + ["--algos", "localsgd,bogus"])
case("compare", "algos-dup", C + ["--algos", "localsgd,localsgd"])
case("compare", "per-algo-bad", C + ["--algos", "localsgd,swarm", "--set", "swarm.bits=100", "--out", "o"])
case("compare", "per-algo-needs", C + ["--algos", "localsgd,efsgd", "--set", "efsgd.server_compressor=sign", "--out", "o"])
case("compare", "bad-topology-file", C + ["--algos", "localsgd,dpsgd", "--topology", "edges", "--set", "topology.path=/dev/zero", "--out", "o"])
case("compare", "threads", C + ["--algos", "localsgd", "--set", "threads=99999", "--out", "o"])

# -- H. calibrate / lab -------------------------------------------------------------------
case("other", "calibrate-workers-0", ["calibrate", "--workers", "0", "--out", "p.yaml"])
case("other", "calibrate-config-fifo", ["calibrate", "--config", "f"], {"f": lambda p: os.mkfifo(p)})
case("other", "lab-nothing", ["lab"])


def make(tmp, files):
    for name, content in files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


class Timeout(Exception):
    pass


def run_case(c, root):
    cat, cid, args, files, expect = c
    tmp = Path(tempfile.mkdtemp(dir=root))
    os.chdir(tmp)
    make(tmp, files)
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout()))
    signal.alarm(90)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    except Timeout:
        code = "timeout"
    except BaseException:
        code = "exception"
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        os.chdir(root)
    dt = time.time() - t0
    e = err.getvalue()
    lines = [x for x in e.strip().splitlines() if x and not x.startswith("relaxsgd: note:")
             and not x.startswith("relaxsgd: warning:")]
    problems = []
    if "Traceback" in e or code in ("exception", "timeout"):
        problems.append(f"crash:{code}")
    if expect == "refuse":
        if code != 2:
            problems.append(f"status {code}")
        if len(lines) != 1 or not lines[0].startswith("relaxsgd: error:"):
            problems.append(f"{len(lines)} lines")
        o = tmp / "o"
        if o.exists() and any(o.iterdir()):
            problems.append("half-written o/: " + ",".join(sorted(os.listdir(o))))
    elif expect == "accept" and code != 0:
        problems.append(f"status {code}")
    if (tmp / "pwned").exists():
        problems.append("PWNED")
    if lines and len(lines[0]) > 800:
        problems.append(f"line of {len(lines[0])} chars")
    if dt > 30:
        problems.append(f"slow {dt:.0f}s")
    return cat, cid, code, dt, problems, (lines[0] if lines else e.strip()[-300:])


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="relaxsgd-badpass-"))
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    results = []
    for c in CASES:
        if only and only not in c[1] and only != c[0]:
            continue
        r = run_case(c, root)
        results.append(r)
        flag = "FAIL" if r[4] else "ok  "
        print(f"{flag} {r[0]:8} {r[1][:45]:45} {str(r[2]):9} {r[3]:5.1f}s {';'.join(r[4])} | {r[5][:220]}", flush=True)
    from collections import Counter
    tot = Counter(r[0] for r in results)
    bad = Counter(r[0] for r in results if r[4])
    print("\ncategory  cases  failures")
    for k in tot:
        print(f"{k:9} {tot[k]:5}  {bad[k]:5}")
    print(f"total     {sum(tot.values()):5}  {sum(bad.values()):5}")
