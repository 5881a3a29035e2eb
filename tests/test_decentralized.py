"""D-PSGD, AD-PSGD, SGP, Choco-SGD: equivalences, gossip rates, push-sum; and a
conformance run of every SwarmSGD switch and every baseline option on MNIST-1D."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from gossipkit import cd, conf, gossip_run
from relaxsgd.bank import Bank
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare, simulate
from relaxsgd.topology import make_topology
from relaxsgd.training import flat_params
from simkit import tiny

# -- D-PSGD -----------------------------------------------------------------------------


def test_dpsgd_atc_on_the_complete_graph_equals_allreduce_sgd() -> None:
    over = dict(workers=5, steps=10, split="dirichlet",
                train={"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3, "batch_size": 8})
    a = simulate(prepare(tiny(algo="allreduce", **over)))
    b = simulate(prepare(tiny(algo="dpsgd", algo_options={"mix": "atc"},
                              topology="complete", **over)))
    torch.testing.assert_close(b.bank.X, a.bank.X, rtol=1e-5, atol=1e-6)
    # ... and the default (combine-then-adapt, gradient at the un-mixed model) does not
    c = simulate(prepare(tiny(algo="dpsgd", topology="complete", **over)))
    assert float((c.bank.X - a.bank.X).abs().max()) > 1e-4


def test_pure_gossip_on_a_ring_contracts_at_the_spectral_rate() -> None:
    """cd_k ~ lambda_2^(2k): the ratio over steps 40 -> 80 gives lambda_2 = 1 - gap."""
    n = 10
    gap = make_topology("ring", n).spectral_gap()
    lam = 1 - gap
    assert lam == pytest.approx(1 / 3 + 2 / 3 * math.cos(2 * math.pi / n), abs=1e-12)
    runs = {k: gossip_run("dpsgd", {"mix": "atc"}, workers=n, steps=k, topology="ring",
                          seed=3) for k in (40, 80)}
    rate = (cd(runs[80].X) / cd(runs[40].X)) ** (1 / (2 * 40))
    assert rate == pytest.approx(lam, rel=0.01)
    assert abs(runs[80].X.double().sum(0) - runs[80].X0.double().sum(0)).max() < 1e-5


def test_dpsgd_on_the_directed_exponential_graph_keeps_the_sum() -> None:
    r = gossip_run("dpsgd", {}, workers=8, steps=12, topology="exponential")
    assert abs(r.X.double().sum(0) - r.X0.double().sum(0)).max() < 1e-5
    # one-peer exponential graph: exact average after log2(n) = 3 steps
    assert cd(r.X) < 1e-10 * cd(r.X0)


# -- AD-PSGD ----------------------------------------------------------------------------


def test_adpsgd_pairwise_averages_keep_the_sum_and_contract() -> None:
    for split, topo in (("auto", "ring"), ("none", "ring"), ("auto", "random-regular")):
        r = gossip_run("adpsgd", {"split": split}, workers=6, steps=30, topology=topo,
                       topology_options={"degree": 3} if topo == "random-regular" else {})
        assert abs(r.X.double().sum(0) - r.X0.double().sum(0)).max() < 1e-5
        assert cd(r.X) < 0.05 * cd(r.X0)
        # its own averaging always counts; without the split (here: bipartite graphs)
        # partners also average into a model while its gradient is being computed
        assert r.metrics["staleness_mean"] >= 1
        assert (r.metrics["staleness_mean"] > 1) == (split == "none")


def test_adpsgd_bipartite_split_only_even_colour_initiates() -> None:
    prep = prepare(tiny(algo="adpsgd", workers=6, topology="ring",
                        algo_options={"split": "bipartite"}))
    targets = [prep.algo.targets(i) for i in range(6)]
    assert targets == [[1, 5], [], [1, 3], [], [3, 5], []]
    with pytest.raises(ConfigError, match="bipartite"):
        p = prepare(tiny(algo="adpsgd", workers=5, topology="ring",
                         algo_options={"split": "bipartite"}))
        p.algo.targets(0)


# -- SGP --------------------------------------------------------------------------------


@pytest.mark.parametrize("opts,topo", [
    ({}, "ring"),
    ({"overlap": 1}, "ring"),
    ({"overlap": 2, "graph": "topology"}, "edges"),
])
def test_push_sum_converges_to_the_initial_average(opts, topo, tmp_path) -> None:
    """The de-biased models all reach the mean of the initial models, even with delayed
    messages and on an irregular graph (where the push weights differ from 1)."""
    topts = {}
    if topo == "edges":  # irregular: degrees 1..4
        path = tmp_path / "g.txt"
        path.write_text("0 1\n1 2\n2 3\n3 0\n0 2\n2 4\n4 5\n")
        topts = {"path": str(path)}
    r = gossip_run("sgp", opts, workers=6, steps=240, topology=topo, topology_options=topts)
    mean0 = r.X0.double().mean(0)
    for i in range(6):
        torch.testing.assert_close(r.X[i].double(), mean0, rtol=0, atol=1e-5)
    weights = [w.state["weight"] for w in r.workers]
    assert sum(weights) == pytest.approx(6.0, abs=1e-9)  # all mass arrived
    if topo == "edges":
        assert max(weights) - min(weights) > 0.1  # the de-biasing really mattered


# -- Choco-SGD --------------------------------------------------------------------------


def test_choco_with_identity_and_gamma_1_equals_dpsgd_atc() -> None:
    over = dict(workers=6, steps=8, topology="ring", train={"lr": 0.2, "momentum": 0.9})
    a = simulate(prepare(tiny(algo="dpsgd", algo_options={"mix": "atc"}, **over)))
    b = simulate(prepare(tiny(algo="choco", algo_options={"compressor": "identity",
                                                          "gamma": 1.0}, **over)))
    torch.testing.assert_close(b.bank.X, a.bank.X, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("comp", ["topk:ratio=0.25", "sign", "qsgd:bits=4"])
def test_choco_compressed_gossip_keeps_the_sum_and_reaches_consensus(comp) -> None:
    r = gossip_run("choco", {"compressor": comp, "gamma": 0.3}, workers=6, steps=150,
                   topology="ring")
    assert abs(r.X.double().sum(0) - r.X0.double().sum(0)).max() < 1e-4
    assert cd(r.X) < 1e-3 * cd(r.X0)


def test_choco_rejects_a_time_varying_graph() -> None:
    with pytest.raises(ConfigError, match="static undirected"):
        prepare(tiny(algo="choco", topology="exponential", workers=8))


# -- conformance: every switch, every baseline, on MNIST-1D ------------------------------

SWARM_SWITCHES = [
    dict(zip(("schedule", "steps_dist", "averaging", "update", "quantizer"), combo,
             strict=True))
    for combo in itertools.product(("async", "sequential"), ("fixed", "geometric"),
                                   ("nonblocking", "blocking"), ("symmetric", "pull"),
                                   ("none", "lattice", "qsgd"))
] + [{"overlap": True, "quantizer": q} for q in ("none", "lattice", "qsgd")]

BASELINES = [
    ("dpsgd", {}), ("dpsgd", {"mix": "atc"}), ("adpsgd", {}), ("adpsgd", {"split": "none"}),
    ("sgp", {}), ("sgp", {"overlap": 1}), ("sgp", {"graph": "topology"}),
    ("choco", {}), ("choco", {"compressor": "ef(sign)", "gamma": 0.2, "public_init": "zero"}),
]


def _mnist1d(algo: str, opts: dict, workers: int = 4, topology: str = "ring",
             **over) -> object:
    cfg = conf(algo=algo, algo_options={"H": 2, **opts} if algo == "swarm" else opts,
               task="mnist1d", task_options={"num_samples": 400, "model": "logreg"},
               workers=workers, steps=8, evals=2, topology=topology, split="dirichlet",
               split_options={"alpha": 0.5}, train={"batch_size": 8, "lr": 0.1}, **over)
    with recorded_progress() as progress:
        out = simulate(prepare(cfg))
    out.progress = progress[0]
    return out


@contextlib.contextmanager
def recorded_progress():
    """Record, beside the algorithm, how far local steps (``Bank.local_steps`` and
    ``Bank.apply_grad``) move each worker's model; yields [progress tensor]."""
    box: list[torch.Tensor] = []
    steps, grad = Bank.local_steps, Bank.apply_grad
    depth = [0]

    def moved(bank: Bank, rows: list[int], fn) -> object:
        if not box:
            box.append(torch.zeros_like(bank.X, dtype=torch.float64))
        before = bank.X[rows].double()
        depth[0] += 1
        try:
            res = fn()
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            box[0][rows] += bank.X[rows].double() - before
        return res

    def local_steps(self, rows, n):
        return moved(self, list(rows), lambda: steps(self, rows, n))

    def apply_grad(self, k, g):
        return moved(self, [k], lambda: grad(self, k, g))

    Bank.local_steps, Bank.apply_grad = local_steps, apply_grad
    try:
        yield box
    finally:
        Bank.local_steps, Bank.apply_grad = steps, grad


def _check(out, keys) -> None:
    assert out.result["status"] == "completed"
    assert all(w.step == w.total_steps == 8 for w in out.workers)
    f, first = out.result["final"], out.rows[0]
    # training worked: the loss of the mean model and of the workers' own models fell
    assert f["loss_mean_model"] < first["loss_mean_model"] - 0.01
    assert f["loss_workers_mean"] < first["loss_workers_mean"] - 0.01
    assert f["bytes_sent_total"] > 0
    for k in keys:  # the family's metrics reach metrics.csv rows and result.json
        if not k.startswith("lattice") and not k.startswith("decode") \
                and not k.startswith("fallback"):
            assert k in out.rows[-1] and k in f


def _sum_moved_only_by_local_steps(out, tol: float = 5e-5) -> None:
    """The averaging moved no mass: sum_i x_i = sum_i x_i^0 + what local steps moved."""
    X = out.bank.X.double()
    x0 = flat_params(out.bank.template)[0].detach().double()  # the template never trains
    err = X.sum(0) - X.shape[0] * x0 - out.progress.sum(0)
    assert float(out.progress.abs().max()) > 1e-3 and float(err.abs().max()) < tol


def _swarm_bytes(out, opts: dict) -> None:
    """Bytes: unquantized, exactly the copies' size per interaction (request and reply,
    or the copies both ways; pull: an 8-byte request and one copy); quantized, what was
    not a fallback is less than the unquantized traffic would be."""
    f, d = out.result["final"], out.bank.d
    inter = f["interactions_per_worker"] * out.bank.X.shape[0] / 2
    pull = opts.get("update") == "pull"
    seq = opts.get("schedule") == "sequential"
    per = 4 * d + (0 if seq else 8) if pull else 8 * d
    if opts.get("quantizer", "none") == "none":
        assert f["bytes_sent_total"] == inter * per
    else:
        assert f["bytes_sent_total"] - f.get("fallback_bytes", 0) < inter * per


@pytest.mark.parametrize("opts", SWARM_SWITCHES, ids=lambda o: "-".join(map(str, o.values())))
def test_every_swarm_switch_runs_a_short_mnist1d_job(opts) -> None:
    out = _mnist1d("swarm", opts)
    _check(out, out.engine.algo.metric_keys)
    if opts.get("update", "symmetric") == "symmetric":  # what symmetric averaging claims
        _sum_moved_only_by_local_steps(out)
    _swarm_bytes(out, opts)


@pytest.mark.parametrize("algo,opts", BASELINES, ids=lambda x: str(x))
def test_every_baseline_runs_a_short_mnist1d_job(algo, opts) -> None:
    out = _mnist1d(algo, opts, topology="random-regular", workers=6,
                   topology_options={"degree": 3})
    _check(out, out.engine.algo.metric_keys)
    if algo == "sgp":  # push-sum: every weight arrived somewhere
        assert sum(w.state["weight"] for w in out.workers) == pytest.approx(6.0, abs=1e-9)
    else:  # doubly stochastic mixing / pairwise averages / Choco's symmetric steps
        _sum_moved_only_by_local_steps(out)
    if algo == "dpsgd":  # the model to each of 3 neighbours, every step
        assert out.result["final"]["bytes_sent_total"] == 6 * 8 * 3 * 4 * out.bank.d


@pytest.mark.parametrize("algo", ["swarm", "dpsgd", "adpsgd", "sgp"])
def test_irregular_custom_graph(algo, tmp_path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("0 1\n1 2\n2 3\n0 2\n")
    out = _mnist1d(algo, {}, topology="edges", topology_options={"path": str(path)})
    _check(out, ())
    if algo != "sgp":
        _sum_moved_only_by_local_steps(out)
    else:
        assert sum(w.state["weight"] for w in out.workers) == pytest.approx(4.0, abs=1e-9)
