"""``relaxsgd calibrate`` in the lab writes a profile the simulator loads; a dist run in
the lab reports its start-up apart and the network it really used."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relaxsgd.cli import main
from relaxsgd.lab.calibrate import fit_line
from relaxsgd.lab.fit import fit_p2p, fit_server
from relaxsgd.sim.collectives import allreduce_cost
from relaxsgd.sim.network import Network, load_network_file
from test_lab import needs_lab

DELAY = 0.02
RELAX = [sys.executable, "-m", "relaxsgd.cli"]


def test_fit_line_recovers_a_line_and_clips_negative_terms() -> None:
    a, b = fit_line([[1e3, 0.1 + 1e3 * 2e-7], [1e6, 0.1 + 1e6 * 2e-7], [4e6, 0.1 + 0.8]])
    assert a == pytest.approx(0.1) and b == pytest.approx(2e-7)
    assert fit_line([[1.0, 0.5], [2.0, 0.4]])[1] == 0.0  # no negative cost per byte
    assert fit_line([[5.0, 0.3]]) == (0.3, 0.0)


def _synthetic(latency: float, overhead: float, bw: float, noise: float,
               outliers: dict[int, float]) -> list[list[float]]:
    """Round trips ``2 (latency + overhead) + 2 B / bw`` at calibrate's sizes, with a
    multiplicative noise of up to ``noise`` and some points multiplied (descheduled)."""
    rng = random.Random(0)
    sizes = [8, 1024, 65536, 262144, 4 * 93834, 16 * 93834, 2 << 20]
    pts = [[float(b), (2 * (latency + overhead) + 2 * b / bw)
            * (1 + noise * (2 * rng.random() - 1)) * outliers.get(k, 1.0)]
           for k, b in enumerate(sizes)]
    return pts + [[b, t * (1 + noise * (2 * rng.random() - 1))] for b, t in pts]


@pytest.mark.parametrize("lat,over,bw", [(2e-5, 3e-4, 1e9), (0.02, 3e-4, 1e7)],
                         ids=["loopback", "lab"])  # the lab: 20 ms, 80 Mbit/s
@pytest.mark.parametrize("noise,outliers", [(0.0, {}), (0.01, {}),
                                            (0.01, {1: 5.0, 5: 3.0})],
                         ids=["exact", "noisy", "outliers"])
def test_the_p2p_fit_recovers_a_known_overhead_and_bandwidth(
        lat: float, over: float, bw: float, noise: float, outliers: dict) -> None:
    pts = _synthetic(lat, over, bw, noise, outliers)
    o, b = fit_p2p(pts, lat)
    if noise == 0:
        assert o == pytest.approx(over, rel=1e-9) and b == pytest.approx(bw, rel=1e-9)
        return
    # 1% noise on a round trip moves its intercept by about that much of it
    assert o == pytest.approx(over, abs=0.02 * (lat + over))
    assert b == pytest.approx(bw, rel=0.03)
    if outliers:  # the descheduled points pull plain least squares far off
        xs, ts = [p[0] for p in pts], [p[1] for p in pts]
        mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
        slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts, strict=True)) / sum(
            (x - mx) ** 2 for x in xs)
        assert abs(2 / slope - bw) > 0.1 * bw or \
            abs((mt - slope * mx) / 2 - lat - over) > 0.1 * (lat + over)


@pytest.mark.parametrize("n", [2, 4])
def test_the_server_fit_recovers_the_simulators_server_link(n: int) -> None:
    """Worker 1's round times on the simulator's own network model (every worker but the
    server's host, worker 0, uploads B at t=0 on idle links; replies in rank order, 0's
    local) give back its server latency and bandwidth, the workers' overhead and
    bandwidth known."""
    from relaxsgd.sim.network import NetworkConfig

    cfg = NetworkConfig(0.003, 5e7, overhead_s=2e-4, server_latency_s=0.011,
                        server_bandwidth_Bps=2e8)
    points = []
    for b in (1024, 65536, 262144, 1 << 21):
        net = Network(cfg, n, 0)
        ready = max(net.to_server(r, b, 0.0)[0] for r in range(1, n))
        arrivals = [net.from_server(b, ready)[0] for _ in range(1, n)]
        points.append([float(b), arrivals[0]])
    lat, bw = fit_server(points, n, 2e-4, 5e7)
    assert lat == pytest.approx(0.011, rel=1e-6) and bw == pytest.approx(2e8, rel=1e-6)


def test_the_network_model_charges_the_fitted_overhead_on_every_message(tmp_path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"network": {"latency_s": 0.01, "bandwidth_Bps": 1e6,
                                                "overhead_s": 0.002}}))
    cfg = load_network_file(str(prof))
    assert cfg.overhead_s == 0.002
    net = Network(cfg, 2, seed=0)
    left, arrive, _ = net.p2p(0, 1000, 1.0)  # 2 ms overhead + 1 ms on the link, then 10 ms
    assert left == pytest.approx(1.003) and arrive == pytest.approx(1.013)
    lat, tx = allreduce_cost(cfg, 2, 0.0)  # gloo n=2: 4 latencies, 2 messages
    assert lat == pytest.approx(4 * 0.01 + 2 * 0.002) and tx == 0.0


def _lab(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*RELAX, "lab", "--workers", "2", "--latency", str(DELAY), "--",
                           *RELAX, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


@needs_lab
def test_calibrate_in_the_lab_writes_a_profile_that_the_simulator_uses(tmp_path: Path) -> None:
    prof = tmp_path / "lab.yaml"
    r = _lab(["calibrate", "--task", "logreg", "--out", str(prof)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forwarder" in r.stderr  # the lab reports its forwarder's statistics
    p = yaml.safe_load(prof.read_text())
    net, comp = p["network"], p["compute"]
    # lower bounds are physics; the upper ones are loose (a loaded machine adds time)
    assert DELAY <= net["latency_s"] < 3 * DELAY
    a, _ = net["collectives"]["allreduce"]["2"]
    assert 3.5 * DELAY < a < 8 * DELAY  # gloo, n=2: four one-way latencies, not two
    a, _ = net["collectives"]["allgather"]["2"]
    assert 3.5 * DELAY < a < 8 * DELAY  # the executor's: two gloo all-gathers of two each
    assert 0 <= net["overhead_s"] < DELAY  # the runtime's own cost per message
    # ... fitted from the round trips timed while the other workers compute (as in a run)
    busy = net["measured"]["exchange_busy"]["2"] + net["measured"]["sendrecv_busy"]["2"]
    assert net["overhead_s"] == pytest.approx(fit_p2p(busy, net["latency_s"])[0])
    idle = net["measured"]["exchange"]["2"] + net["measured"]["sendrecv"]["2"]
    assert net["overhead_idle_s"] == pytest.approx(fit_p2p(idle, net["latency_s"])[0])
    assert len(net["measured"]["server_busy"]["2"]) == len(net["measured"]["server"]["2"])
    # rank 0's server, one hop away (in the simulator too: worker 1 pays two overheads)
    assert DELAY - net["overhead_s"] <= net["server_latency_s"] < 3 * DELAY
    assert comp["step_time_s"] > 0 and comp["flops_per_s"] > 0
    assert comp["step_sigma"] >= 0 and comp["step_max_over_mean"] >= 1
    assert 0 < comp["decode_s"] < 1e-5 and 0 < comp["encode_s"] < 1e-5  # (ns an element)
    codecs = comp["codecs"]  # each codec's own, the lattice's as encode_s / decode_s
    assert set(codecs) >= {"lattice", "qsgd-diff", "topk", "randk", "qsgd", "powersgd"}
    assert codecs["lattice"] == {"encode_s": comp["encode_s"], "decode_s": comp["decode_s"]}
    assert all(0 <= c["encode_s"] < 1e-5 and 0 <= c["decode_s"] < 1e-5
               for c in codecs.values())
    out = tmp_path / "sim"
    assert main(["run", "--task", "logreg", "--workers", "2", "--steps", "4", "--algo",
                 "allreduce", "--network", str(prof), "--compute", str(prof), "-q",
                 "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["compute_model"]["step_time_s"] == comp["step_time_s"]
    assert res["compute_model"]["codec"] == {"encode_s": comp["encode_s"],
                                             "decode_s": comp["decode_s"], "codecs": codecs}
    assert res["network_model"]["collectives"]["fits_used"]["allreduce@2"] == \
        net["collectives"]["allreduce"]["2"]
    assert res["network_model"]["overhead_s"] == net["overhead_s"]
    assert res["network_model"]["server"]["latency_s"] == net["server_latency_s"]


def test_codec_time_is_the_lattice_codecs_time_per_element(monkeypatch) -> None:
    """Each of the 3 tensors (3000 values in all) takes 12 ms to encode and 1.5 ms to
    decode: 12 and 1.5 us a value (sleep only adds: the costs are at least that)."""
    import time

    import torch

    from relaxsgd.lab.calibrate import codec_time
    from relaxsgd.quantize.lattice import LatticeQuantizer

    enc, dec = LatticeQuantizer.encode_value, LatticeQuantizer.decode
    monkeypatch.setattr(LatticeQuantizer, "encode_value",
                        lambda *a, **k: (time.sleep(12e-3), enc(*a, **k))[1])
    monkeypatch.setattr(LatticeQuantizer, "decode",
                        lambda *a, **k: (time.sleep(1.5e-3), dec(*a, **k))[1])
    e, d = codec_time([torch.zeros(1000), torch.zeros(10, 100), torch.zeros(1000)], 3)
    assert 1.2e-5 <= e < 1e-4 and 1.5e-6 <= d < 1.2e-5  # (sleeps overrun under load)


@needs_lab
def test_a_dist_run_in_the_lab_reports_start_up_and_the_real_network(tmp_path: Path) -> None:
    out = tmp_path / "d"
    steps = 6
    r = _lab(["run", "--runtime", "dist", "--workers", "2", "--task", "logreg", "--steps",
              str(steps), "--algo", "allreduce", "--evals", "1", "-q", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["network"] == "real"
    assert res["network_model"]["kind"] == "real" and "0.02 s" in res["network_model"]["lab"]
    st = res["dist"]["startup_s"]
    assert st["rendezvous_s"] > 0 and st["data_s"] > 0 and st["imports_s"] > 0
    # every step's gloo all-reduce takes four one-way latencies through the lab
    assert res["final"]["virtual_time_s"] >= steps * 4 * DELAY
