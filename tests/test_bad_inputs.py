"""Careless and hostile input (issue 21): a table of bad inputs, each one line and exit 2.

Every case runs ``relaxsgd.cli.main`` in-process (a few as real processes, where the
process's own exit matters: a segfault, an endless read) and asserts the exit status, a
fragment of the one line, no traceback, and nothing half-written in ``--out``. Files a
case needs are made by the ``files`` entry ({name: bytes | str | builder}); ``{tmp}`` in
an argument is the case's folder. The units below test the pieces (the reader, the YAML
loader, the NEEDS rule, the lock) one by one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from relaxsgd.cli import main

S = ["--task", "logreg", "--workers", "2", "--steps", "4", "--evals", "2", "-q",
     "--step-time", "0.01", "--set", "task.n_train=128", "--set", "task.n_test=64"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _laughs(levels: int = 9) -> str:
    """A config whose algo_options hold ``levels`` of 9-fold nested aliases (9^levels)."""
    lines = ["algo_options:", "  x:", "    a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _laughs_flow(levels: int) -> str:
    """The same as one flow-style YAML value (for --set)."""
    parts = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    parts += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
              for i in range(1, levels + 1)]
    return "{" + ", ".join(parts) + "}"


def _fifo(path: Path) -> None:
    os.mkfifo(path)


CASES = [
    # (id, args, files, status, fragment)
    ("yaml-1e8-is-a-number", ["run", *S, "--set", "network.bandwidth_Bps=-1e8"], {}, 2,
     "network.bandwidth_Bps must be a finite number > 0, got -100000000.0"),
    ("yaml-1e-300-is-a-number", ["run", *S, "--set", "train.lr=-1e-300"], {}, 2,
     "must be a finite number > 0, got -1e-300"),
    ("billion-laughs", ["run", *S, "--config", "{tmp}/c.yaml", "--out", "{tmp}/o"],
     {"c.yaml": _laughs()}, 2, "more than 100,000 values once its aliases are expanded"),
    ("alias-cycle", ["run", *S, "--config", "{tmp}/c.yaml"],
     {"c.yaml": "algo_options: &a {p: *a}\n"}, 2, "refers to the value that holds it"),
    ("set-value-laughs", ["run", *S, "--set", "algo.x=" + _laughs_flow(9)], {}, 2,
     "--set value is refused: it holds more than 100,000 values"),
    ("train-is-a-list", ["run", *S, "--config", "{tmp}/c.yaml", "--out", "{tmp}/o"],
     {"c.yaml": "train: [1, 2]\n"}, 2, "train must be a mapping of options, got list"),
    ("algo-is-a-list", ["run", *S, "--config", "{tmp}/c.yaml"],
     {"c.yaml": "algo: [localsgd]\n"}, 2, "algo must be a name (a string), got ['localsgd']"),
    ("task-is-a-mapping", ["run", *S, "--set", "task={a: 1}"], {}, 2,
     "task must be a name (a string)"),
    ("config-is-a-list", ["run", *S, "--config", "{tmp}/c.yaml"], {"c.yaml": "- 1\n"}, 2,
     "must hold a mapping of keys to values, got list"),
    ("config-is-a-folder", ["run", *S, "--config", "{tmp}"], {}, 2,
     "is a folder, not a regular file"),
    ("config-is-a-fifo", ["run", *S, "--config", "{tmp}/f"], {"f": _fifo}, 2,
     "is a FIFO (named pipe), not a regular file"),
    ("config-binary", ["run", *S, "--config", "{tmp}/c.yaml"],
     {"c.yaml": b"\x00\xff\xfe" * 10}, 2, "is not a text file (a NUL byte at byte 0)"),
    ("config-latin1", ["run", *S, "--config", "{tmp}/c.yaml"],
     {"c.yaml": b"seed: 1 # caf\xe9\n"}, 2, "is not UTF-8 text (invalid continuation byte"),
    ("config-10MB-speed-factors", ["run", *S, "--config", "{tmp}/c.yaml", "--out", "{tmp}/o"],
     {"c.yaml": "compute: {speed_factors: [" + ", ".join(["1.5"] * 1_300_000) + "]}\n"}, 2,
     "more than the 1 MB such a file may hold"),
    ("speed-factors-without-fixed", ["run", *S, "--set", "compute.speed_factors=[1,50]",
                                     "--out", "{tmp}/o"], {}, 2,
     "compute.speed_factors=(1, 50) takes effect only with compute.heterogeneity=fixed"),
    ("speed-factors-over-workers", ["run", *S, "--set", "compute.heterogeneity=fixed",
                                    "--set", "compute.speed_factors=[1,2,3]"], {}, 2,
     "compute.speed_factors has 3 factors for 2 workers"),
    ("sigma-without-lognormal", ["run", *S, "--set", "compute.sigma=2"], {}, 2,
     "compute.sigma=2.0 takes effect only with compute.heterogeneity=lognormal"),
    ("milestones-without-step", ["run", *S, "--set", "train.milestones=[0.3]"], {}, 2,
     "train.milestones=(0.3,) takes effect only with train.schedule=step"),
    ("server-compressor-without-ps", ["run", *S, "--algo", "efsgd", "--set",
                                      "algo.server_compressor=sign"], {}, 2,
     "efsgd option server_compressor='sign' takes effect only with aggregation=ps"),
    ("swarm-bucket-without-qsgd", ["run", *S, "--algo", "swarm", "--set",
                                   "algo.bucket_size=64"], {}, 2,
     "swarm option bucket_size=64 takes effect only with quantizer=qsgd"),
    ("split-alpha-without-dirichlet", ["run", *S, "--set", "split.alpha=0.1"], {}, 2,
     "split 'iid' has no option 'alpha'"),
    ("threads-100000", ["run", *S, "--set", "threads=100000", "--out", "{tmp}/o"], {}, 2,
     "threads must be at most 1,024"),
    ("workers-huge", ["run", *S, "--workers", "10000000"], {}, 2,
     "workers must be at most 100,000"),
    ("model-too-large", ["run", *S, "--set", "task.model=mlp", "--set",
                         "task.hidden=[65536,65536,65536]", "--out", "{tmp}/o"], {}, 2,
     "-parameter model need at least"),
    ("data-too-large", ["run", *S, "--set", "task.dim=100000000"], {}, 2,
     "task 'logreg' would generate"),
    ("long-repr-is-cut", ["run", *S, "--set", "seed=" + "x" * 5000], {}, 2,
     "(cut: 5,000 characters)"),
    ("edges-dev-zero", ["run", *S, "--algo", "dpsgd", "--topology", "edges", "--set",
                        "topology.path=/dev/zero", "--out", "{tmp}/o"], {}, 2,
     "edge list '/dev/zero' is a device, not a regular file"),
    ("edges-binary", ["run", *S, "--algo", "dpsgd", "--topology", "edges", "--set",
                      "topology.path={tmp}/e.txt"], {"e.txt": bytes(range(256)) * 4}, 2,
     "is not a text file (a NUL byte at byte 0)"),
    ("edges-fifo", ["run", *S, "--algo", "dpsgd", "--topology", "edges", "--set",
                    "topology.path={tmp}/f"], {"f": _fifo}, 2, "is a FIFO"),
    ("compute-profile-fifo", ["run", *S, "--compute", "{tmp}/f"], {"f": _fifo}, 2,
     "compute profile file '{tmp}/f' is a FIFO"),
    ("duplicate-key", ["run", *S, "--config", "{tmp}/c.yaml"],
     {"c.yaml": "task: logreg\nworkers: 2\ntask: mnist\n"}, 2,
     "gives the key 'task' twice (at lines 1 and 3)"),
    ("control-character-in-set", ["run", *S, "--set", "algo=local\x01sgd"], {}, 2,
     "unknown algorithm 'local\\x01sgd'"),
    ("unknown-topology-for-all-reduce", ["run", *S, "--algo", "allreduce", "--topology",
                                         "rnig", "--out", "{tmp}/o"], {}, 2,
     "unknown topology 'rnig'"),
    ("compare-checks-the-graph-first", ["compare", *S, "--algos", "localsgd,dpsgd",
                                        "--topology", "edges", "--set",
                                        "topology.path=/dev/zero", "--out", "{tmp}/o"], {}, 2,
     "is a device"),
    ("hidden-without-mlp", ["run", *S, "--set", "task.hidden=[8]"], {}, 2,
     "option hidden=[8] of task 'logreg' takes effect only with model=mlp"),
    ("topology-option-for-all-reduce", ["run", *S, "--topology", "ring", "--set",
                                        "topology.degree=3"], {}, 2,
     "unknown option degree for topology 'ring'"),
    ("report-random-bytes", ["report", "{tmp}/r"], {"r/result.json": "RESULT",
                                                    "r/metrics.csv": os.urandom(4096)}, 2,
     "metrics.csv"),
    ("report-foreign-csv", ["report", "{tmp}/r"], {"r/result.json": "RESULT",
                                                   "r/metrics.csv": "a,b\n1,2\n"}, 2,
     "is not a relaxsgd metrics.csv (its first line has no column virtual_time_s"),
    ("report-missing-csv", ["report", "{tmp}/r"], {"r/result.json": "RESULT"}, 2,
     "has a result.json with figures but no metrics.csv"),
    ("report-damaged-middle", ["report", "{tmp}/r"], {
        "r/result.json": "RESULT", "r/metrics.csv": "virtual_time_s,bytes_sent_total,"
        "accuracy_mean_model\n1,2,0.5\nx,y\n2,3,0.6\n"}, 2,
     "line 3 of '{tmp}/r/metrics.csv' is not a row of numbers"),
    ("report-half-written-json", ["report", "{tmp}/r"], {"r/result.json": '{"algori'}, 2,
     "is not valid JSON (a half-written or foreign file)"),
]
RESULT = json.dumps({"algorithm": "localsgd", "status": "completed",
                     "final": {"accuracy_mean_model": 0.5}})


def _make(tmp: Path, files: dict) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(RESULT if content == "RESULT" else content)


def _call(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _nothing_half_written(args: list[str]) -> None:
    if "--out" in args:
        out = Path(args[args.index("--out") + 1])
        assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, tmp_path, capsys, monkeypatch) -> None:
    _, args, files, status, fragment = case
    monkeypatch.chdir(tmp_path)
    _make(tmp_path, files)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.perf_counter()
    code, output = _call(args, capsys)
    assert code == status, output
    assert "Traceback" not in output
    lines = [x for x in output.strip().splitlines() if not x.startswith("relaxsgd: note:")]
    assert len(lines) == 1 and lines[0].startswith("relaxsgd: error: "), output[:2000]
    assert fragment.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0][:2000]
    assert time.perf_counter() - t0 < 20
    _nothing_half_written(args)


def _subprocess(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "relaxsgd.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra,fragment", [
    (["--set", "threads=100000"], "threads must be at most 1,024"),  # was a segfault (139)
    (["--algo", "dpsgd", "--topology", "edges", "--set", "topology.path=/dev/zero"],
     "is a device"),  # was an endless read
])
def test_as_a_real_process(tmp_path, extra, fragment) -> None:
    p = _subprocess(["run", *S, *extra, "--out", "o"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and fragment in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_numbers_as_a_person_writes_them_are_accepted(tmp_path, capsys) -> None:
    """The README's own ``--set network.bandwidth_Bps=1e8`` and ``train.lr=1e-3`` run."""
    out = tmp_path / "o"
    code, output = _call(["run", *S, "--set", "network.bandwidth_Bps=1e8", "--set",
                          "train.lr=1e-3", "--out", str(out)], capsys)
    assert code == 0, output
    cfg = (out / "config.yaml").read_text()
    assert "bandwidth_Bps: 100000000.0" in cfg and "lr: 0.001" in cfg
    assert not (out / ".relaxsgd.lock").exists()  # released and removed at the end


# -- a damaged checkpoint, and the run folder's lock ----------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run with a checkpoint whose result.json says it was interrupted."""
    folder = tmp_path_factory.mktemp("stopped") / "st"
    assert main(["run", *S, "--checkpoint-every", "2", "--set", "algo.p=1", "--out",
                 str(folder)]) == 0
    assert (folder / "checkpoint.pt").is_file()
    res = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**res, "status": "interrupted"}))
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_checkpoint_with_a_string_for_a_tensor_is_one_line(stopped_run, tmp_path,
                                                           capsys) -> None:
    folder = _copy(stopped_run, tmp_path / "st")
    ck = torch.load(folder / "checkpoint.pt", weights_only=True)
    ck["bank"]["X"] = "hello"
    torch.save(ck, folder / "checkpoint.pt")
    before = (folder / "metrics.csv").read_bytes()
    code, output = _call(["resume", str(folder), "-q"], capsys)
    assert code == 2 and "Traceback" not in output
    assert "the checkpoint's X is a str, not a torch.float32 tensor" in output, output
    assert (folder / "metrics.csv").read_bytes() == before  # the old file as it was


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    code = ("import sys; from relaxsgd.runlock import RunLock; l = RunLock(sys.argv[1])"
            ".acquire(); print('held', flush=True); sys.stdin.read(); l.release()")
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_first(stopped_run, tmp_path, capsys) -> None:
    import socket

    folder = _copy(stopped_run, tmp_path / "st")
    holder = _hold_lock(folder)
    try:
        before = (folder / "metrics.csv").read_bytes()
        for args in (["resume", str(folder), "-q"],
                     ["run", *S, "--out", str(folder), "--force"]):
            code, output = _call(args, capsys)
            assert code == 2, output
            assert f"is in use by pid {holder.pid} on host {socket.gethostname()!r}" in output
            assert (folder / "metrics.csv").read_bytes() == before  # --force removed nothing
    finally:
        holder.communicate("", timeout=30)
    # the holder is gone: its lock file is released (removed by a clean release)
    assert not (folder / ".relaxsgd.lock").exists()


def test_a_stale_lock_is_taken_over_with_a_note(stopped_run, tmp_path, capsys) -> None:
    folder = _copy(stopped_run, tmp_path / "st")
    (folder / ".relaxsgd.lock").write_text(json.dumps(
        {"pid": 999999, "host": "elsewhere", "since": "2026-01-01T00:00:00"}))
    code, output = _call(["resume", str(folder), "-q"], capsys)
    assert code == 0, output
    assert "taking over the lock of" in output and "pid 999999 on host 'elsewhere'" in output
    assert not (folder / ".relaxsgd.lock").exists()
    assert json.loads((folder / "result.json").read_text())["status"] == "completed"


# -- the pieces ----------------------------------------------------------------------------

def test_yaml_reads_numbers_as_written_and_refuses_bombs_fast() -> None:
    from relaxsgd.config import parse_value
    from relaxsgd.errors import ConfigError
    from relaxsgd.yamlio import load_yaml_text

    for text, want in [("1e8", 1e8), ("1e-3", 1e-3), ("-1E+5", -1e5), (".5e3", 500.0),
                       ("1e-300", 1e-300), ("3", 3), ("0x10", 16), ("1.5", 1.5),
                       ("true", True), ("1e", "1e"), ("abc", "abc"), ("[1e2, 2]", [100.0, 2])]:
        got = parse_value(text)
        assert got == want and type(got) is type(want), (text, got)
    shared = load_yaml_text("a: &x [1, 2]\nb: *x\n", "t")  # a few aliases are fine
    assert shared == {"a": [1, 2], "b": [1, 2]}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        load_yaml_text(_laughs(9), "t")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_yaml_text("[" * 100 + "]" * 100, "t")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_yaml_text("[" * 5000 + "]" * 5000, "t")
    assert time.perf_counter() - t0 < 10  # ~1 s on a 2-core machine under a load of 15


def test_the_reader_refuses_what_is_not_a_small_regular_text_file(tmp_path) -> None:
    from relaxsgd.errors import ConfigError
    from relaxsgd.userfiles import read_text

    big = tmp_path / "big"
    big.write_bytes(b"x" * 1001)
    cases = [(tmp_path, "is a folder"), ("/dev/zero", "is a device"),
             (tmp_path / "none", "not found"), (big, "is 1001 bytes, more than the 1000")]
    os.mkfifo(tmp_path / "fifo")
    cases.append((tmp_path / "fifo", "is a FIFO"))
    for path, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            read_text(path, "thing", max_bytes=1000)
    (tmp_path / "ok").write_bytes("\ufeffcafé\n".encode())
    assert read_text(tmp_path / "ok", "thing") == "café\n"


def test_every_needs_rule_refuses_its_option_alone_and_accepts_it_with_its_partner() -> None:
    """Each entry of every NEEDS table is enforced: the option alone is refused, with what
    it needs it is accepted (a dropped entry or a wrong predicate fails here)."""
    from relaxsgd.algorithms.efsgd import EFSGDConfig
    from relaxsgd.algorithms.olco3 import OLCO3Config
    from relaxsgd.algorithms.swarm_config import SwarmConfig
    from relaxsgd.errors import ConfigError
    from relaxsgd.sim.compute import ComputeConfig
    from relaxsgd.training import TrainConfig

    table = [
        (ComputeConfig, {"speed_factors": (1.0, 2.0)}, {"heterogeneity": "fixed"}),
        (ComputeConfig, {"sigma": 1.0}, {"heterogeneity": "lognormal"}),
        (ComputeConfig, {"straggler_p": 0.5}, {"heterogeneity": "stragglers"}),
        (ComputeConfig, {"straggler_f": 2.0}, {"heterogeneity": "stragglers"}),
        (TrainConfig, {"milestones": (0.3,)}, {"schedule": "step"}),
        (TrainConfig, {"gamma": 0.5}, {"schedule": "step"}),
        (TrainConfig, {"betas": (0.8, 0.9)}, {"optimizer": "adamw"}),
        (TrainConfig, {"eps": 1e-6}, {"optimizer": "adamw"}),
        (TrainConfig, {"nesterov": True}, {"momentum": 0.9}),
        (SwarmConfig, {"bits": 4, "quantizer": "none"}, {"quantizer": "qsgd"}),
        (SwarmConfig, {"eps": 0.1, "quantizer": "qsgd"}, {"quantizer": "lattice"}),
        (SwarmConfig, {"safety": 3.0, "quantizer": "none"}, {"quantizer": "lattice"}),
        (SwarmConfig, {"per_tensor": False, "quantizer": "none"}, {"quantizer": "lattice"}),
        (SwarmConfig, {"spread_decay": 0.5, "quantizer": "none"}, {"quantizer": "lattice"}),
        (SwarmConfig, {"bucket_size": 64}, {"quantizer": "qsgd"}),
        (SwarmConfig, {"overlap": True, "schedule": "sequential"}, {"schedule": "async"}),
        (EFSGDConfig, {"server_compressor": "sign"}, {"aggregation": "ps"}),
        (EFSGDConfig, {"server_error_feedback": False}, {"aggregation": "ps"}),
        (OLCO3Config, {"server_compensation": True, "aggregation": "allreduce"},
         {"aggregation": "ps"}),
    ]
    for cls, alone, partner in table:
        option = next(k for k in alone if k not in partner)
        with pytest.raises(ConfigError, match=f"{option}=.* takes effect only with"):
            cls(**alone)
        cls(**{**alone, **partner})  # accepted with what it needs
    ComputeConfig(heterogeneity="fixed", speed_factors=(1.0,))  # defaults are never "given"
    TrainConfig(momentum=0.0, nesterov=False)


def test_shown_cuts_and_says_how_long() -> None:
    from relaxsgd.errors import shown

    assert shown([1] * 1_300_000) == "[1, 1, 1, 1, 1, 1, ...] (cut: 1,300,000 items)"
    assert shown("abc") == "'abc'" and shown(2.5) == "2.5"
    assert shown("x" * 1000).endswith("(cut: 1,000 characters)")


def test_a_run_refused_after_writing_its_config_leaves_nothing(tmp_path, capsys,
                                                               monkeypatch) -> None:
    """A ConfigError raised once config.yaml is written (here planted in the simulator)
    removes what the run wrote and the folder it made: the rerun is accepted."""
    import relaxsgd.run as run_mod
    from relaxsgd.errors import ConfigError

    def refuse(*a, **k):
        assert (out / "config.yaml").is_file() and (out / ".relaxsgd.lock").is_file()
        raise ConfigError("planted")

    out = tmp_path / "o"
    monkeypatch.setattr(run_mod, "simulate", refuse)
    code, output = _call(["run", *S, "--out", str(out)], capsys)
    assert code == 2 and "planted" in output
    assert not out.exists()
