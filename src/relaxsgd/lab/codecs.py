"""Each codec's own cost per element, for ``relaxsgd calibrate`` (the ``codecs`` mapping
of a compute profile; :meth:`relaxsgd.sim.compute.ComputeModel.work_time` charges each
codec its own).

Timed on the run's model as one message (its parameters flattened, as the algorithms send
them), in this process, medians of a few repeats after one warm-up: a compressor's
``compress`` (encode) and ``decompress`` (decode) at the options the algorithms use by
default (:data:`COMPRESSORS`), per element of the model. The lattice quantizer is timed
by :func:`relaxsgd.lab.calibrate.codec_time` (its tensors one by one, as SwarmSGD codes
them), and QSGD's differential quantizer here on the flat model against a reference.
The names are :func:`relaxsgd.codec_meter.codec_name`'s (error feedback goes by its inner
compressor's).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# codec name -> the spec timed (the algorithms' defaults: top-k and random-k 1%, PowerSGD
# rank 2, QSGD 8 bits)
COMPRESSORS = {"topk": "topk:ratio=0.01", "randk": "randk:ratio=0.01", "qsgd": "qsgd",
               "powersgd": "powersgd:rank=2", "sign": "sign", "fp16": "fp16",
               "bf16": "bf16"}


def _median(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compressor_costs(params: list[torch.Tensor], repeats: int = 5
                     ) -> dict[str, dict[str, float]]:
    """{name: {encode_s, decode_s}} per element of each compressor of :data:`COMPRESSORS`
    on the flattened ``params``."""
    from ..compress.spec import make_compressor

    x = torch.cat([p.detach().reshape(-1).float() for p in params])
    layout = [(f"p{i}", p.shape) for i, p in enumerate(params)]
    g = torch.Generator(device=x.device).manual_seed(0)
    d = max(x.numel(), 1)
    out = {}
    for name, spec in COMPRESSORS.items():
        c = make_compressor(spec)
        state = c.init_state(x.numel(), layout, x.device)
        payload, _ = c.compress(x, state, g)
        enc = _median(lambda c=c, state=state: c.compress(x, state, g), repeats)
        dec = _median(lambda c=c, payload=payload: c.decompress(payload), repeats)
        out[name] = {"encode_s": enc / d, "decode_s": dec / d}
    return out


def qsgd_diff_costs(params: list[torch.Tensor], repeats: int = 5) -> dict[str, float]:
    """{encode_s, decode_s} per element of the differential QSGD quantizer (8 bits)."""
    from ..quantize.qsgd_diff import QSGDDiffQuantizer

    x = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = x + 1e-3
    q, g = QSGDDiffQuantizer(8), torch.Generator(device=x.device).manual_seed(0)
    payload = q.encode(x, None, g, reference=ref)
    d = max(x.numel(), 1)
    enc = _median(lambda: q.encode(x, None, g, reference=ref), repeats)
    dec = _median(lambda: q.decode(payload, ref), repeats)
    return {"encode_s": enc / d, "decode_s": dec / d}
