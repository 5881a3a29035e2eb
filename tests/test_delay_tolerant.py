"""The delay-tolerant and compressed baselines (EF-SGD, Qsparse-local-SGD, Pipe-SGD,
CoCoD-SGD, Overlap-Local-SGD, DiLoCo, Streaming DiLoCo) against independent references, their
byte counts, and every algorithm of the family by name with every compressor."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
import torch

from refkit import LR, Reference, mean
from relaxsgd.algorithms.diloco import fragment_bounds
from relaxsgd.cli import main
from relaxsgd.compress.spec import make_compressor
from relaxsgd.run import prepare, simulate
from relaxsgd.training import flat_params
from simkit import tiny

FAMILY = ["olco3", "efsgd", "qsparse", "pipesgd", "cocod", "overlap-local", "diloco",
          "streaming-diloco"]


def sim(algo: str, opts: dict[str, Any], **over: Any) -> Any:
    return simulate(prepare(tiny(algo=algo, algo_options=opts, **over)))


def test_efsgd_with_identity_is_allreduce_sgd() -> None:
    train = {"momentum": 0.9, "weight_decay": 1e-3}
    a = sim("allreduce", {}, train=train)
    b = sim("efsgd", {"compressor": "identity"}, train=train)
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=0, atol=0)


def test_qsparse_with_identity_is_local_sgd() -> None:
    a = sim("localsgd", {"p": 3}, train={"momentum": 0.9})
    b = sim("qsparse", {"p": 3, "compressor": "identity"}, train={"momentum": 0.9})
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s", [0, 2])
def test_pipe_sgd_applies_the_mean_gradient_of_s_steps_ago(s: int) -> None:
    ref = Reference("pipesgd", algo_options={"s": s})
    w, grads = ref.x0.clone(), []
    for t in range(ref.prep.total_steps + s):
        if t < ref.prep.total_steps:
            grads.append(mean([ref.grad(r, w) for r in range(ref.n)]))
        if t >= s:
            w = w - LR * grads[t - s]
    ref.check([w] * ref.n)


def test_cocod_adds_local_progress_to_the_stale_average() -> None:
    p = 3
    ref = Reference("cocod", algo_options={"p": p}, steps=13)
    X = [ref.x0.clone() for _ in range(ref.n)]
    for done in range(0, 13, p):
        avg = mean(X)
        Y = ref.local(X, min(p, 13 - done))
        X = [avg + y - x for x, y in zip(X, Y, strict=True)]
    ref.check([mean(X)] * ref.n)


@pytest.mark.parametrize("anchor_from", ["pulled", "local"])
def test_overlap_local_pulls_to_the_momentum_anchor(anchor_from: str) -> None:
    p, a, b = 2, 0.6, 0.7
    ref = Reference("overlap-local", algo_options={"p": p, "anchor_from": anchor_from,
                                                   "final": "none"})
    X = [ref.x0.clone() for _ in range(ref.n)]
    z, v, pending = ref.x0.clone(), torch.zeros_like(ref.x0), None
    for _ in range(ref.prep.total_steps // p):
        X = ref.local(X, p)
        if pending is not None:
            v = b * v + pending
            z = z + v
        local = [x - z for x in X]
        X = [(1 - a) * x + a * z for x in X]
        pending = mean(local if anchor_from == "local" else [x - z for x in X])
    ref.check(X)


def test_diloco_is_local_sgd_driven_by_torch_nesterov() -> None:
    p, steps = 4, 12
    ref = Reference("diloco", algo_options={"p": p, "outer_lr": 0.7, "outer_momentum": 0.9},
                    steps=steps)
    xg = ref.x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([xg], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(steps // p):
        Y = ref.local([xg.detach().clone() for _ in range(ref.n)], p)
        xg.grad = mean([xg.detach() - y for y in Y])
        opt.step()
    ref.check([xg.detach()] * ref.n)


def test_diloco_with_plain_outer_step_is_local_sgd_and_streaming_reduces_to_diloco() -> None:
    train = {"momentum": 0.9}
    a = sim("localsgd", {"p": 4}, train=train)
    b = sim("diloco", {"p": 4, "outer_lr": 1.0, "outer_momentum": 0.0}, train=train)
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-5, atol=1e-6)
    c = sim("diloco", {"p": 4}, train=train)
    d = sim("streaming-diloco", {"p": 4, "tau": 0, "alpha": 1.0, "compressor": "identity"},
            train=train)
    torch.testing.assert_close(c.bank.X, d.bank.X, rtol=0, atol=0)
    e = sim("streaming-diloco", {"p": 4, "tau": 2, "alpha": 0.5, "compressor": "identity"},
            train=train)
    assert not torch.allclose(c.bank.X, e.bank.X, atol=1e-4)  # the overlap changes things


def test_streaming_fragments_take_turns_and_everyone_ends_on_the_global_model() -> None:
    out = sim("streaming-diloco", {"p": 4, "tau": 1, "fragments": 2,
                                   "compressor": "identity"}, steps=12)
    lay = out.workers[0].layout
    bounds = fragment_bounds(lay, 2)
    assert [b[2] for b in bounds] == [[lay[0]], [lay[1]]]  # weight, then bias
    # syncs start at steps 2, 4, ..., 12, fragments in turn (0 at 2, 6, 10; 1 at 4, 8, 12);
    # fragment 0 has 2 steps of unsent progress at the end: one more sync of it
    sizes = {0: 4 * lay[0][1].numel(), 1: 4 * lay[1][1].numel()}
    assert out.result["final"]["payload_bytes"] == 4 * (4 * sizes[0] + 3 * sizes[1])
    X = out.bank.X
    assert all(torch.equal(X[0], X[r]) for r in range(1, X.shape[0]))
    assert out.result["final"]["staleness_mean"] == 1


@pytest.mark.parametrize("algo,opts,rounds", [("efsgd", {}, 12), ("qsparse", {"p": 3}, 4),
                                              ("pipesgd", {"s": 2}, 12)])
def test_bytes_are_the_encoded_payloads(algo: str, opts: dict, rounds: int) -> None:
    n, k = 4, 5
    out = sim(algo, {**opts, "compressor": "topk:k=5"})
    fin = out.result["final"]
    assert fin["payload_bytes"] == rounds * n * 8 * k
    # ring all-gather of top-k messages: each worker forwards the n - 1 others' messages
    assert fin["bytes_sent_total"] == rounds * n * (n - 1) * 8 * k


@pytest.mark.parametrize("algo", FAMILY)
def test_every_algorithm_runs_with_every_compressor(algo: str) -> None:
    """Each run: the loss falls, bytes are whole messages of the encoded size, and what the
    algorithm claims holds (OLCO3: the mean model is the delay-free trajectory; the others
    end with every worker on the same model)."""
    for comp in ("identity", "fp16", "qsgd:bits=2", "topk:ratio=0.2", "randk:ratio=0.3",
                 "sign", "ef(powersgd:rank=1)"):
        # OLCO3 in all-reduce mode, whose claim is the exact delay-free mean (its default,
        # ps mode, is checked against its own invariant in test_olco3)
        mode = {"aggregation": "allreduce"} if algo == "olco3" else {}
        prep = prepare(tiny(algo=algo, algo_options={"compressor": comp, **mode}, steps=8))
        out = simulate(prep)
        f, first = out.result["final"], out.rows[0]
        assert out.result["status"] == "completed"
        assert f["loss_mean_model"] < first["loss_mean_model"] - 0.01, comp
        assert f["loss_workers_mean"] < first["loss_workers_mean"] - 0.01, comp
        d, n = out.bank.d, out.bank.X.shape[0]
        size = _encoded_size(comp, d, out.bank.layout)
        messages = f["payload_bytes"] / (n * size)
        assert messages >= 1 and messages == int(messages), (comp, messages)
        X = out.bank.X
        if algo == "olco3":
            torch.manual_seed(prep.cfg.seed)
            x0, _ = flat_params(prep.spec.model_fn())
            u = torch.stack([w.state["update_sum"] for w in out.workers]).mean(0)
            torch.testing.assert_close(X.mean(0), x0 - u, rtol=0, atol=2e-6)
        else:
            assert all(torch.equal(X[0], X[r]) for r in range(1, n)), comp


def _encoded_size(spec: str, d: int, layout: Any) -> int:
    """The bytes of one whole-model message (streaming-diloco: one fragment, the default),
    from the compressor's own encoding."""
    comp = make_compressor(spec)
    inner = getattr(comp, "inner", comp)
    payload, _ = inner.compress(torch.randn(d), inner.init_state(d, layout),
                                torch.Generator().manual_seed(0))
    return inner.nbytes(payload)


def test_cli_runs_olco3_by_name_with_the_family_metrics(tmp_path: Any) -> None:
    out = tmp_path / "o"
    code = main(["run", "--algo", "olco3", "--task", "logreg", "--workers", "3", "--steps",
                 "16", "--evals", "2", "--step-time", "0.01", "-q", "--network", "wan",
                 "--set", "task.n_train=96", "--set", "task.n_test=32", "--set", "s=2",
                 "--set", "compressor=topk:ratio=0.1", "--set", "aggregation=ps",
                 "--out", str(out)])
    assert code == 0
    with open(out / "metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for col in ("staleness_mean", "ef_residual_norm_mean", "payload_bytes",
                "bits_per_param_per_step", "stall_time_s_mean"):
        assert rows[-1][col] != "", col
    final = json.loads((out / "result.json").read_text())["final"]
    assert final["staleness_mean"] == 2 * 4  # s rounds of p = 4 (the default) steps
