"""Error feedback around any compressor (Seide et al. 2014 "1-bit SGD"; Stich et al. 2018;
Karimireddy et al., ICML 2019, "Error Feedback Fixes SignSGD").

Contract. ``ErrorFeedback(inner)`` has the state ``{"inner": inner state, "residual": e}``
with ``e`` float32 zeros of ``numel`` at start. ``compress(x)``: ``v = x + e``; the payload
is ``inner.compress(v)``; the new residual is ``e = v - inner.decompress(payload)``, so at
every call ``x + e_old = decompressed + e_new`` exactly (up to float rounding): nothing is
ever lost, only delayed. Payload, ``decompress`` and ``nbytes`` are the inner compressor's.

:meth:`ErrorFeedback.mean` runs ``inner.mean(v)`` and keeps ``e = v - own`` where ``own`` is
what this worker's own message decodes to. For PowerSGD that is the worker's local rank-r
approximation ``P_hat Q_i^T`` in the subspace shared by all workers, the standard of
Vogels et al. 2019 (not the all-reduced ``P_hat (mean Q)^T``, which mixes in the others'
updates).

Flags: summable if the inner compressor is; never flagged unbiased (the residual makes the
transmitted message depend on the past).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..algorithms.base import Program
from .base import Compressor, Layout, check_flat


class ErrorFeedback(Compressor):
    """error feedback: compress x + residual, keep what was not sent as the new residual"""

    name = "ef"
    unbiased = False

    def __init__(self, inner: Compressor) -> None:
        self.inner = inner
        self.summable = inner.summable

    @property
    def spec(self) -> str:
        return f"ef({self.inner.spec})"

    @property
    def codec_name(self) -> str:
        """Codec time goes by the inner compressor's costs (:mod:`relaxsgd.codec_meter`)."""
        return self.inner.name

    def init_state(self, numel: int, layout: Layout | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        return {"inner": self.inner.init_state(numel, layout, device),
                "residual": torch.zeros(numel, dtype=torch.float32, device=device)}

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[Any, dict[str, Any]]:
        check_flat(x)
        v = x.detach().float() + state["residual"]
        payload, inner_state = self.inner.compress(v, state["inner"], generator)
        residual = v - self.inner.decompress(payload)
        return payload, {"inner": inner_state, "residual": residual}

    def decompress(self, payload: Any) -> Tensor:
        return self.inner.decompress(payload)

    def nbytes(self, payload: Any) -> int:
        return self.inner.nbytes(payload)

    def residual_norm(self, state: dict[str, Any]) -> float:
        """The L2 norm of the residual in ``state`` (for metrics)."""
        return residual_norm(state)

    def mean(self, x: Tensor, state: dict[str, Any],
             generator: torch.Generator | None = None) -> Program:
        """Sub-program: ``inner.mean(x + e)``; returns ``(mean, own, state)`` with the new
        residual ``x + e - own``."""
        check_flat(x)
        v = x.detach().float() + state["residual"]
        mean, own, inner_state = yield from self.inner.mean(v, state["inner"], generator)
        return mean, own, {"inner": inner_state, "residual": v - own}


def residual_norm(state: dict[str, Any]) -> float:
    """The L2 norm of an :class:`ErrorFeedback` state's residual (for metrics)."""
    return float(state["residual"].norm())
