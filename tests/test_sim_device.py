"""The simulator's device and batching: device resolution, batched and unbatched paths.

Virtual-time results must not depend on the path: every algorithm run with its local steps
vmapped over stacked workers and with a per-worker loop gives the same models; the
workers' models evaluated together equal the one-by-one evaluation. On CUDA (when torch
sees it) the same run gives the CPU's models up to float rounding.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relaxsgd.bank as bank_mod
from lmkit import TINY_LM, write_corpus
from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.bank import evaluate, evaluate_many
from relaxsgd.cli import main
from relaxsgd.config import from_dict
from relaxsgd.devices import resolve_device
from relaxsgd.errors import ConfigError
from relaxsgd.metrics import CommStats, Recorder
from relaxsgd.run import prepare, simulate
from simkit import fake_cifar, tiny

HAVE_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAVE_CUDA, reason="needs CUDA (torch sees no GPU)")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


# -- device resolution ---------------------------------------------------------------------

def test_device_names_resolve_and_bad_ones_are_one_line() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAVE_CUDA else "cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "", "cuda:0:1"):
        with pytest.raises(ConfigError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="unknown device"):
        tiny(device="tpu")  # refused when the config is read, before anything runs


@pytest.mark.skipif(HAVE_CUDA, reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_exit_2_and_one_line(tmp_path, capsys) -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device(spec)
    code = main(["run", "--task", "logreg", "--workers", "2", "--steps", "2", "-q",
                 "--device", "cuda", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cpu" in err


@pytest.mark.parametrize("device", DEVICES)
def test_result_json_names_the_device_and_the_evaluation(tmp_path, device) -> None:
    out = tmp_path / "r"
    assert main(["run", "--task", "logreg", "--workers", "4", "--steps", "6", "--evals", "2",
                 "-q", "--device", device, "--set", "eval_worker_samples=50",
                 "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["device"].startswith(device)
    ev = res["evaluation"]
    assert ev["worker_subsample"] and ev["worker_samples"] == 50
    assert ev["mean_model_samples"] > 50
    assert 0 < res["final"]["eval_wall_share"] < 1


# -- batched and unbatched simulation ------------------------------------------------------

# Float32 throughout: the vmapped step computes each worker's gradient with batched matrix
# products, the loop with one product per worker; the sums are ordered differently, so
# each step differs by a few ulps (~1e-7 relative), and 14 steps of a convex model on
# O(1) parameters keep the difference well under 1e-5. A wrong worker (a permuted batch,
# a row updated with another's gradient) moves parameters by O(lr) = 0.1.
TOL = {"rtol": 1e-5, "atol": 2e-6}


@pytest.mark.parametrize("algo", ALGORITHMS.names())
def test_batched_and_unbatched_simulation_give_the_same_models(algo) -> None:
    # momentum: each worker's own state, never averaged, so a worker computed with another's
    # batch shows even where the models are averaged at the end (Local SGD, all-reduce)
    runs = {b: simulate(prepare(tiny(algo=algo, batching=b, workers=4, steps=14,
                                     train={"momentum": 0.9})))
            for b in ("vmap", "loop")}
    a, b = runs["vmap"], runs["loop"]
    assert a.bank.batching == "vmap" and b.bank.batching == "loop"
    torch.testing.assert_close(a.bank.X, b.bank.X, **TOL)
    torch.testing.assert_close(a.bank.M, b.bank.M, **TOL)
    assert a.result["final"]["virtual_time_s"] == b.result["final"]["virtual_time_s"]
    assert a.result["final"]["bytes_sent_total"] == b.result["final"]["bytes_sent_total"]
    # the workers must differ from one another somewhere in the run, or a permutation of
    # the workers inside the batched path would go unseen
    assert len(a.rows) >= 2


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_simulation_equals_cpu_up_to_rounding(device) -> None:
    for algo in ("localsgd", "swarm", "olco3"):
        cpu = simulate(prepare(tiny(algo=algo, device="cpu")))
        gpu = simulate(prepare(tiny(algo=algo, device=device)))
        torch.testing.assert_close(gpu.bank.X.cpu(), cpu.bank.X, rtol=1e-4, atol=1e-5)
        assert gpu.result["final"]["virtual_time_s"] == cpu.result["final"]["virtual_time_s"]


# -- batched evaluation --------------------------------------------------------------------

def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 12)), nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(40, 3))


def _spec(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"loss_fn": F.cross_entropy, "metric": "accuracy",
                              "bits_per_token": False, "batching": "loop", **kw})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_pairs", [1 << 16, 150])  # all rows in one call; chunked
def test_batched_evaluation_equals_one_by_one(monkeypatch, device, chunk_pairs) -> None:
    """Conv + BatchNorm (per-worker statistics as functional buffers), 5 workers, a test
    set not divisible by the batch; losses within float32 rounding, accuracies exact."""
    monkeypatch.setattr(bank_mod, "EVAL_PAIRS_PER_CALL", chunk_pairs)
    torch.manual_seed(0)
    model = _bn_model().to(device)
    d = sum(p.numel() for p in model.parameters())
    X = torch.randn(5, d, device=device)
    bufs = {"2.running_mean": torch.randn(5, 4, device=device),
            "2.running_var": torch.rand(5, 4, device=device) + 0.5,
            "2.num_batches_tracked": torch.zeros(5, dtype=torch.long, device=device)}
    x, y = torch.randn(230, 12, device=device), torch.randint(0, 3, (230,), device=device)
    spec = _spec()
    ls, ms = evaluate_many(spec, model, X, bufs, x, y, batch=64, batched=True)
    for k in range(5):
        lk, mk = evaluate(spec, model, X[k], {n: b[k] for n, b in bufs.items()}, x, y, 64)
        assert ls[k] == pytest.approx(lk, rel=1e-5) and ms[k] == mk
    assert len(set(ms)) > 1  # the workers differ, so a swapped row would show


def test_batched_evaluation_of_the_transformer_equals_one_by_one() -> None:
    from relaxsgd.tasks.transformer import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab=11, context=8, d=16, layers=1, heads=2)
    d = sum(p.numel() for p in model.parameters())
    X = torch.randn(3, d) * 0.3
    x, y = torch.randint(0, 11, (20, 8)), torch.randint(0, 11, (20, 8))
    spec = _spec(bits_per_token=True)
    ls, ms = evaluate_many(spec, model, X, None, x, y, batch=64, batched=True)
    for k in range(3):
        lk, mk = evaluate(spec, model, X[k], {}, x, y, 64)
        assert ls[k] == pytest.approx(lk, rel=1e-5) and ms[k] == pytest.approx(mk)


def test_workers_are_evaluated_on_a_fixed_subsample_and_the_mean_model_on_all() -> None:
    prep = prepare(tiny(workers=3))
    spec = prep.spec
    d = sum(p.numel() for p in spec.model_fn().parameters())
    rec = Recorder(spec, None, 3, d, 512, [], worker_samples=40)
    full = Recorder(spec, None, 3, d, 512, [])
    assert rec.eval_info()["worker_samples"] == 40 and rec.worker_subsample
    assert full.eval_info()["worker_samples"] == spec.data.x_test.shape[0]
    again = Recorder(spec, None, 3, d, 512, [], worker_samples=40)
    assert torch.equal(rec.x_workers, again.x_workers)  # the same samples every time
    torch.manual_seed(1)
    X = torch.randn(3, d)
    kw = {"step": 1.0, "samples": 0, "virtual_time": 0.0, "wall_time": 0.0,
          "mean_buffers": {}, "w0_buffers": {}, "comm": CommStats(), "train_loss": 0.0,
          "extra": {}}
    row, ref = rec.record(X=X, **kw), full.record(X=X, **kw)
    # the mean model and worker 0 on the whole test set, the workers on the subsample
    assert row["loss_mean_model"] == ref["loss_mean_model"]
    assert row["loss_worker0"] == ref["loss_worker0"]
    want = [evaluate(spec, rec.model, X[k], {}, rec.x_workers, rec.y_workers)
            for k in range(3)]
    assert row["loss_workers_mean"] == pytest.approx(sum(w[0] for w in want) / 3, rel=1e-6)
    assert row["accuracy_workers_mean"] == pytest.approx(sum(w[1] for w in want) / 3)
    assert row["loss_workers_mean"] != pytest.approx(ref["loss_workers_mean"], rel=1e-6)


def test_config_refuses_a_negative_worker_subsample() -> None:
    with pytest.raises(ConfigError, match="eval_worker_samples"):
        from_dict({"eval_worker_samples": -1})


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_vmapped_conv_and_transformer_steps_equal_the_loop(tmp_path, model) -> None:
    """The models a GPU vmaps and a CPU loops (the CNN; the transformer, whose attention
    under vmap is our own batched formula) give the same models both ways."""
    if model == "cnn":
        base = {"task": "mnist1d", "task_options": {"model": "cnn", "num_samples": 400},
                "train": {"batch_size": 8, "momentum": 0.9}}
    else:
        write_corpus(tmp_path)
        base = {"task": "shakespeare", "task_options": dict(TINY_LM),
                "data_dir": str(tmp_path), "eval_samples": 16}
    d = {"algo": "localsgd", "algo_options": {"p": 2}, "workers": 3, "steps": 5,
         "evals": 1, "compute": {"step_time_s": 0.01}, "train": {"batch_size": 8},
         **base}
    a = simulate(prepare(from_dict({**d, "batching": "vmap"})))
    b = simulate(prepare(from_dict({**d, "batching": "loop"})))
    assert a.bank.batching == "vmap" and b.bank.batching == "loop"
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-4, atol=1e-5)
    # the models end averaged; the optimizer states (momentum, AdamW's first moment) are
    # each worker's own, so they show a step computed for the wrong worker
    torch.testing.assert_close(a.bank.M, b.bank.M, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a.bank.M[0], a.bank.M[1])


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("device", DEVICES)
def test_vmapped_batchnorm_steps_equal_a_module_per_worker(tmp_path, float64, device) -> None:
    """ResNet-20 with BatchNorm (the CIFAR-10 task's default model), its buffers stacked
    and vmapped, against a module per worker, through steps of all rows (the stacked
    buffers updated in place) and of some rows (gathered, written back): the same
    parameters, momentum, running statistics and batch counts for every worker. In
    float64, because in float32 batch statistics of 4 samples amplify the few-ulp
    differences of batched kernels to ~1e-4 in 4 steps; in float64 both paths agree to
    ~1e-15 (seen), so 1e-10 is rounding. A running statistic not written back stays at
    its initial 0 / 1, one shared by the workers differs by O(0.1) between workers."""
    fake_cifar(tmp_path, per_batch=8)
    prep = prepare(from_dict({"task": "cifar10", "data_dir": str(tmp_path), "workers": 3,
                              "task_options": {"augment": False},
                              "train": {"batch_size": 4, "momentum": 0.9}}))
    data = prep.spec.data
    spec = dataclasses.replace(prep.spec, data=dataclasses.replace(
        data, x_train=data.x_train.double(), x_test=data.x_test.double()))

    def bank(batching: str) -> bank_mod.Bank:
        return bank_mod.Bank(spec, prep.cfg.train, [0, 1, 2], prep.shards, 0, 10,
                             batching=batching, device=device)

    a, b = bank("vmap"), bank("loop")
    assert a.B and not a.modules and b.modules and not b.B
    tol = {"rtol": 1e-10, "atol": 1e-10}
    for rows in ([0, 1, 2], [1], [2, 0], [0, 1, 2], [1, 2]):
        torch.testing.assert_close(a.local_steps(rows, 1), b.local_steps(rows, 1), **tol)
    torch.testing.assert_close(a.X, b.X, **tol)
    torch.testing.assert_close(a.M, b.M, **tol)
    for k in range(3):
        ba, bb = a.buffers_of(k), b.buffers_of(k)
        assert ba.keys() == bb.keys() and len(ba) == 3 * 19  # 19 BatchNorm layers
        for n in ba:
            torch.testing.assert_close(ba[n], bb[n], **tol, msg=f"worker {k} {n}")
    for rows in (None, [2, 0]):  # all rows; some (the live ones under churn)
        want = b.mean_buffers(rows)
        for n, m in a.mean_buffers(rows).items():
            torch.testing.assert_close(m, want[n], **tol)
    assert not torch.equal(a.mean_buffers([2, 0])["n0.running_mean"],
                           a.mean_buffers()["n0.running_mean"])
    # the running statistics moved, each worker's are its own, and each counts its steps
    rm = [a.buffers_of(k)["n0.running_mean"] for k in range(3)]
    assert not torch.equal(rm[0], torch.zeros_like(rm[0]))
    assert not torch.equal(rm[0], rm[1]) and not torch.equal(rm[1], rm[2])
    assert [int(a.buffers_of(k)["n0.num_batches_tracked"]) for k in range(3)] == a.steps
    # buffers_of gives views: writing them (a checkpoint restore, a handover) changes row k
    a.buffers_of(2)["n0.running_mean"].copy_(rm[0])
    assert torch.equal(a.B["n0.running_mean"][2], a.B["n0.running_mean"][0])


# -- batched sampling ----------------------------------------------------------------------

def test_batched_sampling_gives_each_samplers_own_batches() -> None:
    """Bank._indices (one gather for all rows, new passes drawn and stored together) equals
    each row's Sampler.next and leaves each sampler in its state: through the ends of
    passes (a new permutation), subsets of rows, and a restored sampler state."""
    prep = prepare(tiny(workers=5, train={"batch_size": 40}))
    # unequal shards; 79 and 121 end a pass one sample short of / past a batch boundary,
    # 40 every batch exactly, 30 is shorter than a batch (two passes in one batch)
    shards = [s[:m] for s, m in zip(prep.shards, (79, 100, 121, 40, 30), strict=True)]
    make = lambda: bank_mod.Bank(prep.spec, prep.cfg.train, list(range(5)), shards, 5, 99)  # noqa: E731
    fast, ref = make(), make()
    saved = None
    for t, rows in enumerate([[0, 1, 2, 3, 4], [1], [2, 0, 3], [0, 1, 2, 4],
                              [4, 3, 2, 1, 0], [1, 2]] * 3):
        if t == 7:
            saved = [s.state_dict() for s in fast.samplers]
        if t == 12:  # both go back to step 7's state, as a resumed run does
            for b in (fast, ref):
                for s, st in zip(b.samplers, saved, strict=True):
                    s.load_state_dict(st)
        got = fast._indices(rows)
        want = torch.stack([ref.samplers[k].next(40) for k in rows])
        assert torch.equal(got, want), t
        for a, b in zip(fast.samplers, ref.samplers, strict=True):
            assert (a.pos, a.passes) == (b.pos, b.passes), t
            assert torch.equal(a.perm, b.perm) and a.perm.dtype == b.perm.dtype, t
            assert torch.equal(a.gen.get_state(), b.gen.get_state()), t
    assert all(s.passes >= 2 for s in fast.samplers)
