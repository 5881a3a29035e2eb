"""Quantizers decoded against a reference (SwarmSGD's messages), one registry line each.

Both share one API, so an algorithm can switch between them by name:

- ``encode(x, eps=None, generator=None, reference=None) -> payload``;
- ``decode(payload, reference) -> (x_hat, ok)``: ``ok`` False reports a detected decode
  failure (lattice only; the caller falls back to a full-precision exchange);
- ``nbytes(payload) -> int``: the size as it would travel.

``lattice`` needs no shared state (the receiver's own model is the reference) but fails when
the models are farther apart than its range; ``qsgd`` never fails but needs a reference
held identically by both sides. See each module's docstring.
"""

from ..registry import Registry

QUANTIZERS = Registry("quantizer")
QUANTIZERS.add("lattice", "relaxsgd.quantize.lattice:LatticeQuantizer",
               "modular quantization decoded against the receiver's model "
               "(Davies et al. 2021)")
QUANTIZERS.add("qsgd", "relaxsgd.quantize.qsgd_diff:QSGDDiffQuantizer",
               "unbiased b-bit stochastic quantization of the difference to a shared "
               "reference")
