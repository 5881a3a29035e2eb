"""Network arithmetic of the simulator, against the formulas by hand."""

from __future__ import annotations

import pytest

from relaxsgd.errors import ConfigError
from relaxsgd.sim.network import (
    PROFILES,
    Network,
    NetworkConfig,
    make_network_config,
    ps_time,
    ring_allgather_time,
    ring_allreduce_time,
)


def test_one_message_takes_latency_plus_bytes_over_bandwidth() -> None:
    net = Network(NetworkConfig(0.05, 1e6), n=4, seed=0)
    left, arrive, tries = net.p2p(0, 2_000_000, t=1.0)
    assert tries == 1
    assert left == pytest.approx(1.0 + 2.0)
    assert arrive == pytest.approx(1.0 + 2.0 + 0.05)


def test_messages_from_one_worker_serialise_but_other_links_do_not() -> None:
    net = Network(NetworkConfig(0.01, 1e6), n=3, seed=0)
    _, a1, _ = net.p2p(0, 1_000_000, t=0.0)
    _, a2, _ = net.p2p(0, 1_000_000, t=0.0)
    _, b1, _ = net.p2p(1, 1_000_000, t=0.0)
    assert a1 == pytest.approx(1.01)
    assert a2 == pytest.approx(2.01)  # waits for the first to leave the link
    assert b1 == pytest.approx(1.01)  # worker 1's own link is free


def test_ring_allreduce_matches_its_formula() -> None:
    n, b, lat, bw = 8, 4_000_000, 0.002, 1e8
    assert ring_allreduce_time(b, n, lat, bw) == pytest.approx(
        2 * (n - 1) * lat + 2 * (n - 1) / n * b / bw)
    assert ring_allreduce_time(b, 1, lat, bw) == 0.0
    assert ring_allgather_time(100, 4, 0.5, 100.0) == pytest.approx(3 * 0.5 + 3 * 1.0)
    assert ps_time([100, 100], 50, 0.5, 100.0) == pytest.approx(1.0 + 2.0 + 1.0)


def test_collectives_wait_for_busy_links() -> None:
    net = Network(NetworkConfig(0.0, 100.0), n=2, seed=0)
    net.p2p(1, 500, t=0.0)  # link 1 busy until 5 s
    assert net.collective(1.0, 2.0) == pytest.approx(7.0)


def test_loss_retransmits_and_jitter_varies_latency_deterministically() -> None:
    cfg = NetworkConfig(0.01, 1e9, jitter=0.5, loss=0.5)
    a = [Network(cfg, 2, seed=3).p2p(0, 10, 0.0) for _ in range(2)]
    assert a[0] == a[1]  # seeded
    arrivals = [Network(cfg, 2, seed=s).p2p(0, 10, 0.0) for s in range(40)]
    assert max(t for _, _, t in arrivals) > 1  # some messages were lost and resent
    assert len({round(x, 9) for _, x, _ in arrivals}) > 5


def test_profiles_and_errors() -> None:
    assert set(PROFILES) == {"datacenter", "cloud", "wan", "mobile"}
    assert PROFILES["wan"].latency_s > PROFILES["cloud"].latency_s > PROFILES[
        "datacenter"].latency_s
    c = make_network_config("wan", latency_s=0.1)
    assert c.latency_s == 0.1 and c.bandwidth_Bps == PROFILES["wan"].bandwidth_Bps
    with pytest.raises(ConfigError, match="lan.*datacenter"):
        make_network_config("lan")
    with pytest.raises(ConfigError, match="bandwidth"):
        make_network_config("custom", bandwidth_Bps=0)
    with pytest.raises(ConfigError, match="latency_ms"):
        make_network_config("cloud", latency_ms=1)
