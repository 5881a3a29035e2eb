"""Each codec charged its own cost per element (a calibrated profile's ``codecs``), the
parameter server's own compression charged too, and calibrate's per-codec timing; all
hand-computed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from relaxsgd.codec_meter import CodecWork, codec_name, metering
from relaxsgd.errors import ConfigError
from relaxsgd.sim.compute import ComputeConfig, ComputeModel, codec_table
from test_accounting import codec_program_times, run_codec_program

LAT_E, LAT_D, TOP_E, TOP_D, DEF_E, DEF_D = 1e-3, 2e-3, 4e-3, 5e-3, 7e-3, 8e-3


def _profile(tmp_path: Any) -> str:
    f = tmp_path / "codecs.yaml"
    f.write_text(f"compute: {{flops_per_s: 1.0e9, encode_s: {DEF_E}, decode_s: {DEF_D}, "
                 f"codecs: {{lattice: {{encode_s: {LAT_E}, decode_s: {LAT_D}}}, "
                 f"topk: {{encode_s: {TOP_E}, decode_s: {TOP_D}}}}}}}\n")
    return str(f)


def test_work_time_charges_each_codec_its_own_cost() -> None:
    """top-k 10 encoded, the lattice 20 decoded, sign (not listed: the default costs) 5
    and 5; speed factor 2: (10 x 4 + 20 x 2 + 5 x 7 + 5 x 8) ms x 2 = 0.31 s."""
    m = ComputeModel(ComputeConfig(heterogeneity="fixed", speed_factors=(1.0, 2.0)), 2, 1,
                     0.01, (DEF_E, DEF_D), {"lattice": (LAT_E, LAT_D), "topk": (TOP_E, TOP_D)})
    w = CodecWork()
    w.add(10, 0, "topk")
    w.add(0, 20, "lattice")
    w.add(5, 5, "sign")
    assert (w.encoded, w.decoded) == (15, 25)
    assert m.work_time(1, w) == pytest.approx(0.31)
    assert m.work_time(None, w) == pytest.approx(0.155)  # the server: factor 1
    assert m.work_time(1, w.merged(w)) == pytest.approx(0.62)


def test_the_engine_charges_each_codec_its_own_cost(tmp_path: Any) -> None:
    """simkit's codec program with lattice and top-k costs of their own
    (:func:`codec_program_times`: 0 and 1 code lattice values, 2 and 3 top-k). The default
    costs are charged for nothing."""
    seen = run_codec_program(_profile(tmp_path))
    for key, want in codec_program_times(LAT_E, LAT_D, TOP_E, TOP_D).items():
        assert seen[key] == pytest.approx(want), key


def test_codec_names_and_error_feedback_goes_by_its_inner_compressor() -> None:
    from relaxsgd.compress.spec import make_compressor
    from relaxsgd.quantize.lattice import LatticeQuantizer

    ef = make_compressor("ef(topk:ratio=0.5)")
    assert codec_name(ef) == "topk" and codec_name(LatticeQuantizer(8)) == "lattice"
    with metering() as work:
        ef.compress(torch.arange(8.0), ef.init_state(8))
    assert work.by == {"topk": [8, 0]}  # the outer call only, by the inner's name


def test_the_simulated_server_charges_its_own_compression(tmp_path: Any) -> None:
    """The echo server with a top-k server compressor: its serve encodes the mean of d
    values (top-k's cost), so worker 0's reply (no hop) comes d x TOP_E later than the
    identity server's."""
    from relaxsgd.algorithms.server import ParameterServer
    from relaxsgd.compress.spec import make_compressor
    from relaxsgd.run import prepare, simulate
    from simkit import tiny
    from test_server import _Echo

    def round_end(server_spec: str) -> tuple[float, int]:
        times: dict[int, tuple] = {}
        prep = prepare(tiny(network="custom", network_options={"latency_s": 0.1,
                                                               "bandwidth_Bps": 1e3},
                            compute={"codec": "on", "profile": _profile(tmp_path)}))
        algo = _Echo(prep.info, 100, 50, times)
        ident = make_compressor("identity")
        algo.server = lambda: ParameterServer(ident, make_compressor(server_spec),  # type: ignore[method-assign]
                                              False, 0)
        prep.algo = algo
        out = simulate(prep)
        return times[0][1] - times[0][0], out.bank.d

    plain, d = round_end("identity")
    assert round_end("topk:ratio=0.5")[0] - plain == pytest.approx(d * TOP_E, rel=1e-9)


def test_a_bad_codecs_table_is_one_clear_error(tmp_path: Any) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("compute: {flops_per_s: 1.0e9, codecs: {topk: {encode_s: -1, "
                 "decode_s: 0}}}\n")
    with pytest.raises(ConfigError, match="compute.codecs must map"):
        codec_table(ComputeConfig(profile=str(f), codec="on"))
    assert codec_table(ComputeConfig(profile=_profile(tmp_path), codec="off")) == {}


def test_calibrate_times_every_codec_per_element(monkeypatch: Any) -> None:
    """top-k's compress made 3 ms slower on a 3000-value model: at least 1 us an element
    more than the others measure; every codec of the table present, costs >= 0."""
    import time

    from relaxsgd.compress.topk import TopK
    from relaxsgd.lab.codecs import COMPRESSORS, compressor_costs

    params = [torch.randn(1000), torch.randn(20, 100)]
    orig = TopK.compress
    monkeypatch.setattr(TopK, "compress",
                        lambda *a, **k: (time.sleep(3e-3), orig(*a, **k))[1])
    got = compressor_costs(params, repeats=3)
    assert set(got) == set(COMPRESSORS)
    assert all(v["encode_s"] >= 0 and v["decode_s"] >= 0 for v in got.values())
    assert got["topk"]["encode_s"] >= 1e-6  # 3 ms over 3000 values
