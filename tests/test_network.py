"""Network arithmetic of the simulator, against the formulas by hand."""

from __future__ import annotations

from typing import Any

import pytest

from relaxsgd.errors import ConfigError
from relaxsgd.sim.collectives import allgather_cost, allreduce_cost
from relaxsgd.sim.network import (
    PROFILES,
    Network,
    NetworkConfig,
    make_network_config,
    network_model_info,
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
    assert net.collective(1.0, 0.5, 2.0) == pytest.approx(5.0 + 2.0 + 0.5)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_gloo_costs_follow_the_measured_latency_counts(n: int) -> None:
    """gloo (measured in the lab, see sim/collectives.py): all-reduce 4(n-1) latencies and
    the ring's bytes; all-gather 2(n-1) latencies; the dist AllGather is two of them."""
    lat, bw, b = 0.025, 1e7, 4_000_000
    cfg = NetworkConfig(lat, bw)
    assert cfg.backend == "gloo"
    a, t = allreduce_cost(cfg, n, b)
    assert a == pytest.approx(4 * (n - 1) * lat)
    assert t == pytest.approx(2 * (n - 1) / n * b / bw)
    a, t = allgather_cost(cfg, n, [b // 2, b])
    assert a == pytest.approx(2 * 2 * (n - 1) * lat + (n - 1) * 8 / bw)
    assert t == pytest.approx((n - 1) * b / bw)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_nccl_and_ideal_costs_follow_their_formulas(n: int) -> None:
    lat, bw, b = 0.001, 1e9, 8_000_000
    ring = NetworkConfig(lat, bw, backend="nccl-ring")
    tree = NetworkConfig(lat, bw, backend="nccl-tree")
    ideal = NetworkConfig(lat, bw, backend="ideal")
    assert allreduce_cost(ring, n, b) == pytest.approx(
        (2 * (n - 1) * lat, 2 * (n - 1) / n * b / bw))
    hops = {2: 1, 3: 2, 4: 2, 8: 3}[n]
    assert allreduce_cost(tree, n, b)[0] == pytest.approx(2 * hops * lat)
    assert sum(allreduce_cost(ideal, n, b)) == pytest.approx(ring_allreduce_time(b, n, lat, bw))
    assert sum(allgather_cost(ideal, n, [100] * n)) == pytest.approx(
        ring_allgather_time(100, n, lat, bw))
    assert allreduce_cost(ring, 1, b) == (0.0, 0.0)


def test_two_overlapping_collectives_finish_earlier_than_in_sequence_but_not_before_the_link(
        ) -> None:
    lat_part, tx = 0.3, 0.1
    net = Network(NetworkConfig(0.05, 1e6), n=4, seed=0)
    first = net.collective(0.0, lat_part, tx)
    second = net.collective(0.0, lat_part, tx)  # issued together (another process group)
    assert first == pytest.approx(tx + lat_part)
    in_sequence = 2 * (tx + lat_part)
    assert second < in_sequence - 1e-9
    assert second >= 2 * tx  # both transmissions went through the same links
    assert second == pytest.approx(2 * tx + lat_part)
    # a message sent meanwhile waits for the transmissions, not for the latencies
    left, _, _ = net.p2p(2, 0, t=0.0)
    assert left == pytest.approx(2 * tx)


def test_a_calibrated_file_sets_latency_bandwidth_and_measured_collective_lines(
        tmp_path: Any) -> None:
    f = tmp_path / "lab.yaml"
    f.write_text("network: {latency_s: 0.02, bandwidth_Bps: 1.0e7, backend: gloo, "
                 "collectives: {allreduce: {'2': [0.09, 1.0e-7]}}}\n")
    cfg = make_network_config(str(f))
    assert (cfg.latency_s, cfg.bandwidth_Bps) == (0.02, 1e7)
    assert allreduce_cost(cfg, 2, 1000) == pytest.approx((0.09, 1e-4))  # the fit
    assert allreduce_cost(cfg, 3, 1000)[0] == pytest.approx(8 * 0.02)  # no fit: formula
    info = network_model_info(cfg, 2)
    assert info["collectives"]["fits_used"] == {"allreduce@2": [0.09, 1e-7]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("network: {latency_s: fast}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*latency_s"):
        make_network_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        make_network_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="backend.*gloo"):
        make_network_config("cloud", backend="mpi")


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


# -- TCP's slow start (initial_window_B) ---------------------------------------------------
# latency 50 ms (round trip 0.1 s), 1 MB/s (bandwidth-delay product 100 kB), window 10 kB
SLOW = NetworkConfig(0.05, 1e6, initial_window_B=10_000)


def test_slow_start_holds_a_message_back_a_round_trip_per_flight_until_it_fits() -> None:
    net = Network(SLOW, n=3, seed=0)
    # 35 kB on a fresh connection: 10 kB, a round trip, 20 kB, a round trip, 5 kB
    left, arrive, _ = net.p2p(0, 35_000, 0.0, dst=1)
    assert left == pytest.approx(0.1 + 0.1 + 0.005)
    assert arrive == pytest.approx(0.205 + 0.05)
    # the window (now 40 kB) stays open on that connection: the bytes at the link's rate
    _, arrive, _ = net.p2p(0, 35_000, 0.3, dst=1)
    assert arrive == pytest.approx(0.3 + 0.035 + 0.05)
    # another connection of the same worker starts its own slow start, and waiting for
    # acknowledgements does not keep the link busy: it starts when the bytes have left
    _, arrive, _ = net.p2p(0, 35_000, 0.3, dst=2)
    assert arrive == pytest.approx(0.335 + 0.205 + 0.05)
    # a message within the window is never held back
    _, arrive, _ = Network(SLOW, n=3, seed=0).p2p(1, 10_000, 0.0, dst=0)
    assert arrive == pytest.approx(0.01 + 0.05)
    # but it waits behind the bytes of an earlier message on its connection (one stream)
    net = Network(SLOW, n=3, seed=0)
    net.p2p(0, 35_000, 0.0, dst=1)  # its last byte leaves at 0.205
    _, arrive, _ = net.p2p(0, 1_000, 0.0, dst=1)
    assert arrive == pytest.approx(0.205 + 0.001 + 0.05)


def test_the_window_stops_growing_at_the_bandwidth_delay_product() -> None:
    net = Network(SLOW, n=2, seed=0)
    # 1 MB: flights of 10, 20, 40 and 80 kB (4 round trips), then 850 kB at 1 MB/s
    left, _, _ = net.p2p(0, 1_000_000, 0.0, dst=1)
    assert left == pytest.approx(0.4 + 0.85)
    assert net.windows[(0, 1)][0] == 160_000


def test_an_idle_connection_halves_its_window_for_each_timeout_past_the_first() -> None:
    net = Network(SLOW, n=2, seed=0)
    net.p2p(0, 1_000_000, 0.0, dst=1)  # window 160 kB, last byte left at 1.25 s
    rto = 0.1 + 0.2
    net.p2p(0, 1_000, 1.25 + rto * 0.9, dst=1)  # idle under one timeout: still open
    assert net.windows[(0, 1)][0] == 160_000
    last = net.windows[(0, 1)][1]
    net.p2p(0, 1_000, last + rto * 2.5, dst=1)  # 2.5 timeouts: halved twice
    assert net.windows[(0, 1)][0] == 40_000
    last = net.windows[(0, 1)][1]
    net.p2p(0, 1_000, last + 100.0, dst=1)  # long idle: back to the first window
    assert net.windows[(0, 1)][0] == 10_000
    keep = Network(NetworkConfig(0.05, 1e6, initial_window_B=10_000,
                                 restart_after_idle=False), n=2, seed=0)
    keep.p2p(0, 1_000_000, 0.0, dst=1)
    keep.p2p(0, 1_000, 100.0, dst=1)
    assert keep.windows[(0, 1)][0] == 160_000


def test_slow_start_on_the_servers_links_and_the_collectives() -> None:
    net = Network(SLOW, n=2, seed=0)
    got, _ = net.to_server(1, 35_000, 0.0)  # upload: held back like a message
    assert got == pytest.approx(0.205 + 0.05)
    a1, _ = net.from_server(35_000, 1.0, dst=0)  # each reply on its own connection
    a2, _ = net.from_server(35_000, 1.0, dst=1)
    assert a1 == pytest.approx(1.0 + 0.205 + 0.05)
    assert a2 == pytest.approx(1.035 + 0.205 + 0.05)
    # a collective carrying 35 kB a link (0.035 s at the link's rate), latency part 0.5 s:
    # the first pays the flights, the next does not: its connections were busy until the
    # first's end (from the last byte sent they would look idle for longer than an RTO,
    # 0.3 s, and the window would be halved)
    end = net.collective(10.0, 0.5, 0.035)
    assert end == pytest.approx(10.0 + 0.035 + 0.5 + 0.17)
    assert net.collective(end, 0.5, 0.035) == pytest.approx(end + 0.535)
    # off (the default): nothing changes
    plain = Network(NetworkConfig(0.05, 1e6), n=2, seed=0)
    assert plain.p2p(0, 35_000, 0.0, dst=1)[1] == pytest.approx(0.085)
    assert plain.collective(0.1, 0.2, 0.035) == pytest.approx(0.335)


def test_a_calibrated_window_is_recovered_from_the_extra_of_a_cold_transfer() -> None:
    from relaxsgd.lab.fit import fit_initial_window, slow_start_delay

    for w0, lat, bw in [(62e3, 0.025, 10e6), (14_600, 0.04, 12.5e6), (300e3, 0.025, 10e6)]:
        extra = slow_start_delay(4 << 20, w0, lat, bw)
        assert extra > 0
        assert fit_initial_window(extra, 4 << 20, lat, bw) == pytest.approx(w0, rel=0.01)
    # nothing held back (a fast link, or no extra measured): windows open
    assert fit_initial_window(0.001, 4 << 20, 0.025, 10e6) == 0.0
    assert fit_initial_window(0.01, 4 << 20, 50e-6, 1e9) == 0.0


def test_window_options_are_checked_and_read_from_a_profile_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="initial_window_B"):
        make_network_config("wan", initial_window_B=-1)
    with pytest.raises(ConfigError, match="restart_after_idle"):
        make_network_config("wan", restart_after_idle="yes")
    c = make_network_config("wan", initial_window_B=64e3, restart_after_idle=False)
    assert (c.initial_window_B, c.restart_after_idle) == (64e3, False)
    f = tmp_path / "p.yaml"
    f.write_text("network: {latency_s: 0.025, bandwidth_Bps: 1.0e7, initial_window_B: "
                 "36000, restart_after_idle: false}\n")
    c = make_network_config(str(f))
    assert (c.initial_window_B, c.restart_after_idle) == (36000.0, False)
    assert network_model_info(c, 2)["initial_window_B"] == 36000.0
    assert make_network_config("wan").initial_window_B == 0.0  # named profiles: open
    # a bad value in a file: the field's own line, naming the file
    for bad, line in [("initial_window_B: -5", "network initial_window_B must be >= 0"),
                      ("restart_after_idle: maybe", "restart_after_idle must be true or "
                                                    "false, got 'maybe'"),
                      ("overhead_s: -1", "network overhead_s must be >= 0")]:
        f.write_text(f"network: {{latency_s: 0.025, bandwidth_Bps: 1.0e7, {bad}}}\n")
        with pytest.raises(ConfigError) as e:
            make_network_config(str(f))
        assert str(e.value).startswith(f"network profile file {str(f)!r}: ")
        assert line in str(e.value)


def test_spawned_collectives_take_the_runtimes_process_groups_in_turn() -> None:
    """DiLoCo's outer all-reduce runs in a spawn: the dist runtime gives the main
    program's spawns its SPAWN_GROUPS process groups in turn, each with connections (and
    TCP windows) of its own; all-reduce SGD's blocking all-reduce uses the job's group."""
    from relaxsgd.distributed.options import DistOptions
    from relaxsgd.run import prepare
    from relaxsgd.sim.engine import SPAWN_GROUPS
    from relaxsgd.simulation import Simulation
    from simkit import tiny

    assert SPAWN_GROUPS == DistOptions.spawn_groups  # (the dist runtime's default)
    keys = {}
    for algo in ("diloco", "allreduce"):
        cfg = tiny(algo=algo, steps=48, evals=1, network="wan",
                   network_options={"initial_window_B": 64},
                   algo_options={"p": 4} if algo == "diloco" else {})
        keys[algo] = {k for k in Simulation(prepare(cfg)).run().engine.net.windows
                      if k[0] == "collectives"}
    assert keys["diloco"] == {("collectives", g) for g in range(SPAWN_GROUPS)}
    assert keys["allreduce"] == {("collectives", None)}


def test_a_bad_window_in_a_profile_file_is_one_line_and_exit_2(tmp_path) -> None:
    import subprocess
    import sys

    f = tmp_path / "p.yaml"
    f.write_text("network: {latency_s: 0.025, bandwidth_Bps: 1.0e7, initial_window_B: -5}\n")
    r = subprocess.run([sys.executable, "-m", "relaxsgd.cli", "run", "--network", str(f),
                        "--steps", "2", "-q", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"relaxsgd: error: network profile file {str(f)!r}: network initial_window_B must "
        "be >= 0 bytes (0: windows always open), got -5.0"]
