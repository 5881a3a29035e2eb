"""Compressors: one file per family, one registry line each (see compress/base.py).

Build one from a spec string with :func:`relaxsgd.compress.spec.make_compressor`
(``"topk:ratio=0.01"``, ``"ef(qsgd:bits=4)"``). The description of each entry is the first
line of its class docstring; its options are the class's constructor keyword arguments.
"""

from ..registry import Registry

COMPRESSORS = Registry("compressor")
COMPRESSORS.add("identity", "relaxsgd.compress.identity:Identity",
                "no compression: float32 values, 4 bytes per element (the baseline)")
COMPRESSORS.add("fp16", "relaxsgd.compress.fp:FP16",
                "IEEE half precision (fp16) cast: 2 bytes per element, round to nearest")
COMPRESSORS.add("bf16", "relaxsgd.compress.fp:BF16",
                "bfloat16 cast: 2 bytes per element, float32's range with 8 bits of mantissa")
COMPRESSORS.add("qsgd", "relaxsgd.compress.qsgd:QSGD",
                "QSGD / uniform b-bit stochastic quantization per bucket (unbiased)")
COMPRESSORS.add("topk", "relaxsgd.compress.topk:TopK",
                "top-k sparsification: the k largest-magnitude entries, values + int32 indices")
COMPRESSORS.add("randk", "relaxsgd.compress.randk:RandK",
                "random-k sparsification: k uniformly random entries (optionally scaled by d/k)")
COMPRESSORS.add("sign", "relaxsgd.compress.sign:ScaledSign",
                "scaled sign (EF-SignSGD): 1 bit per element and one scale ||x||_1 / d")
COMPRESSORS.add("powersgd", "relaxsgd.compress.powersgd:PowerSGD",
                "PowerSGD: rank-r approximation P Q^T of each matrix, two all-reduces, warm start")
