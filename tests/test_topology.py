"""Topologies: mixing-matrix invariants, spectral gaps, validation errors."""

from __future__ import annotations

import math

import pytest
import torch

from relaxsgd.errors import ConfigError
from relaxsgd.topology import TOPOLOGIES, make_topology

# (name, n, options) for every undirected registered topology, several sizes each.
UNDIRECTED_CASES = [
    *[("complete", n, {}) for n in (1, 2, 3, 7)],
    *[("ring", n, {}) for n in (1, 2, 3, 4, 9)],
    *[("torus", n, {}) for n in (9, 12, 16, 30)],
    ("torus", 12, {"rows": 4}),
    *[("hypercube", n, {}) for n in (1, 2, 4, 16)],
    *[("random-regular", n, {"degree": d}) for n, d in ((2, 1), (8, 3), (10, 2), (12, 5),
                                                        (9, 6), (20, 4))],
]


def _edges_file(tmp_path, text: str) -> str:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    return str(path)


def _check_symmetric_doubly_stochastic(topo) -> None:
    w = topo.mixing_matrix()
    assert w.dtype == torch.float64 and w.shape == (topo.n, topo.n)
    assert torch.equal(w, w.T)
    assert (w >= 0).all()
    ones = torch.ones(topo.n, dtype=torch.float64)
    torch.testing.assert_close(w.sum(0), ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(1), ones, rtol=0, atol=1e-12)
    # Nonzero off-diagonal pattern = the graph's edges, and neighbours are mutual.
    for i in range(topo.n):
        nbrs = topo.neighbors(i)
        assert nbrs == sorted(nbrs) and i not in nbrs
        assert [j for j in range(topo.n) if j != i and w[i, j] > 0] == nbrs
        assert all(i in topo.neighbors(j) for j in nbrs)
    assert 0 < topo.spectral_gap() <= 1 + 1e-12  # connected


@pytest.mark.parametrize("name,n,opts", UNDIRECTED_CASES)
def test_undirected_mixing_is_symmetric_doubly_stochastic(name, n, opts) -> None:
    _check_symmetric_doubly_stochastic(make_topology(name, n, seed=3, **opts))


def test_edges_topology_is_symmetric_doubly_stochastic(tmp_path) -> None:
    path = _edges_file(tmp_path, "0 1\n1 2\n2 3\n3 0\n0 2\n2 4\n")
    _check_symmetric_doubly_stochastic(make_topology("edges", 5, path=path))


@pytest.mark.parametrize("name,n,opts", [c for c in UNDIRECTED_CASES if c[1] > 1])
def test_regular_graphs_use_uniform_weights(name, n, opts) -> None:
    topo = make_topology(name, n, **opts)
    d = len(topo.neighbors(0))
    assert all(len(topo.neighbors(i)) == d for i in range(n))
    w = topo.mixing_matrix()
    expected = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        expected[i, [i, *topo.neighbors(i)]] = 1.0 / (d + 1)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)


def test_irregular_graph_uses_metropolis_hastings(tmp_path) -> None:
    # A star with centre 0 and 3 leaves, plus the edge 1-2: degrees 3, 2, 2, 1.
    topo = make_topology("edges", 4, path=_edges_file(tmp_path, "0 1\n0 2\n0 3\n1 2\n"))
    w = topo.mixing_matrix()
    assert w[0, 1] == w[0, 2] == w[0, 3] == 0.25  # 1 / (1 + max(3, .))
    assert w[1, 2] == pytest.approx(1 / 3)
    assert w[3, 3] == pytest.approx(0.75) and w[0, 0] == pytest.approx(0.25)
    assert w[1, 1] == pytest.approx(1 - 0.25 - 1 / 3)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 11, 16, 25])
def test_ring_spectral_gap_closed_form(n) -> None:
    topo = make_topology("ring", n)
    ev = sorted(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(n))
    torch.testing.assert_close(torch.linalg.eigvalsh(topo.mixing_matrix()),
                               torch.tensor(ev, dtype=torch.float64), rtol=0, atol=1e-12)
    second = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    assert topo.spectral_gap() == pytest.approx(1 - second, abs=1e-12)


def test_ring_of_two_is_one_edge_and_single_nodes_work() -> None:
    ring2 = make_topology("ring", 2)
    assert ring2.edges() == [(0, 1)] and ring2.neighbors(0) == [1]
    torch.testing.assert_close(ring2.mixing_matrix(), torch.full((2, 2), 0.5, dtype=torch.float64))
    for name in ("complete", "ring", "hypercube", "exponential"):
        one = make_topology(name, 1)
        assert one.neighbors(0) == [] and one.spectral_gap() == 1.0
        assert one.mixing_matrix().tolist() == [[1.0]]


@pytest.mark.parametrize("n", [2, 3, 6, 10])
def test_complete_graph_gap_is_one(n) -> None:
    topo = make_topology("complete", n)
    assert topo.spectral_gap() == pytest.approx(1.0, abs=1e-12)
    assert len(topo.edges()) == n * (n - 1) // 2


def test_torus_shape_and_errors() -> None:
    topo = make_topology("torus", 12)
    assert (topo.rows, topo.cols) == (3, 4)
    assert topo.neighbors(0) == [1, 3, 4, 8]
    assert (make_topology("torus", 36).rows, make_topology("torus", 12, rows=4).cols) == (6, 3)
    for n in (4, 8, 13, 14):
        with pytest.raises(ConfigError, match=f"n={n} has no such split"):
            make_topology("torus", n)
    with pytest.raises(ConfigError, match="valid rows: 3, 4, 6, 8"):
        make_topology("torus", 72, rows=5)


def test_hypercube_needs_power_of_two() -> None:
    assert make_topology("hypercube", 8).neighbors(5) == [1, 4, 7]
    with pytest.raises(ConfigError, match="power of 2, got n=6; use n=4 or n=8"):
        make_topology("hypercube", 6)


def test_random_regular_is_deterministic_and_regular() -> None:
    a = make_topology("random-regular", 30, seed=7, degree=3)
    b = make_topology("random-regular", 30, seed=7, degree=3)
    c = make_topology("random-regular", 30, seed=8, degree=3)
    assert a.edges() == b.edges() and a.edges() != c.edges()
    for seed in range(5):
        for n, d in ((30, 3), (16, 2), (11, 8), (40, 6)):
            topo = make_topology("random-regular", n, seed=seed, degree=d)
            assert topo.degrees() == [d] * n and len(topo.edges()) == n * d // 2
            assert topo.spectral_gap() > 0


@pytest.mark.parametrize("n,degree,message", [
    (5, 3, "n\\*degree even, got n=5, degree=3"),
    (6, 6, "degree < n=6"),
    (6, 1, "always disconnected"),
    (6, 2.5, "degree must be an integer"),
])
def test_random_regular_unrealisable_degree(n, degree, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_topology("random-regular", n, degree=degree)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 16, 17])
def test_exponential_period_and_push_matrix(n) -> None:
    topo = make_topology("exponential", n)
    assert topo.directed and topo.period == math.ceil(math.log2(n))
    assert topo.period == max(1, (n - 1).bit_length())
    for k in range(2 * topo.period):
        p = topo.mixing_matrix(k)
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.sum(0), torch.ones(n, dtype=torch.float64))
        assert torch.equal(p, topo.mixing_matrix(k + topo.period))
        for i in range(n):
            (out,) = topo.neighbors(i, k)
            assert out == (i + 2 ** (k % topo.period)) % n and out != i
            assert p[i, i] == 0.5 and p[out, i] == 0.5
            assert topo.in_neighbors(out, k) == [i]
    # Over one period every node reaches every other (push-sum mixes).
    prod = torch.eye(n, dtype=torch.float64)
    for k in range(topo.period):
        prod = topo.mixing_matrix(k) @ prod
    assert (prod > 0).all()


def test_edges_file_parsing(tmp_path) -> None:
    path = _edges_file(tmp_path, "# a path 0-1-2-3 and a chord\n0 1\n\n2 1  # reversed\n"
                                 "1 0\n2 3\n   3 0\n")
    topo = make_topology("edges", 4, path=path)
    assert topo.edges() == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert topo.neighbors(0) == [1, 3]


@pytest.mark.parametrize("text,n,message", [
    ("0 1\n1 5\n", 4, "node id 5 on line 2 .* out of range for n=4; ids must be 0..3"),
    ("0 1\n-1 2\n", 4, "node id -1 on line 2"),
    ("0 1\n2 2\n", 3, "line 2 .* self loop"),
    ("0 1\n1 x\n", 3, "line 2 .* expected two node ids"),
    ("0 1 2\n", 3, "line 1 .* expected two node ids"),
    ("0 1\n2 3\n", 4, "disconnected: 2 components"),
    ("0 1\n1 2\n", 4, "disconnected: 2 components on 4 nodes .node 3"),
])
def test_edges_file_errors(tmp_path, text, n, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_topology("edges", n, path=_edges_file(tmp_path, text))


def test_edges_missing_file_or_option(tmp_path) -> None:
    with pytest.raises(ConfigError, match="edge list .* not found"):
        make_topology("edges", 3, path=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="needs the option path"):
        make_topology("edges", 3)


def test_make_topology_validates_names_and_options() -> None:
    with pytest.raises(ConfigError, match="unknown option cols for topology 'torus'; "
                                          "valid options: rows"):
        make_topology("torus", 12, cols=4)
    with pytest.raises(ConfigError, match="valid options: none"):
        make_topology("ring", 5, degree=2)
    with pytest.raises(ConfigError, match="unknown topology 'star'; choose one of: complete"):
        make_topology("star", 5)
    with pytest.raises(ConfigError, match="must be an integer >= 1, got 0"):
        make_topology("ring", 0)
    with pytest.raises(ConfigError, match="node 5 is out of range"):
        make_topology("ring", 5).neighbors(5)


def test_registry_descriptions_are_docstring_first_lines() -> None:
    assert set(TOPOLOGIES.names()) == {"complete", "ring", "torus", "hypercube",
                                       "random-regular", "exponential", "edges"}
    for entry in TOPOLOGIES.entries():
        cls = TOPOLOGIES.get(entry.name)
        assert cls.name == entry.name
        assert cls.__doc__.splitlines()[0] == entry.description
