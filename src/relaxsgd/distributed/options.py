"""Options of the distributed runtime, read from the environment of each process.

They are per-process launch settings, not part of an experiment's config (a simulated and
a distributed run of the same ``config.yaml`` train the same thing), so they come from
environment variables that ``torchrun``/``relaxsgd-launch`` pass to every worker:

==============================  =========  ==================================================
variable                        default    meaning
==============================  =========  ==================================================
``RELAXSGD_TIMEOUT``            120        seconds a collective (or any blocking wait) may
                                           take before the run fails naming the worker(s)
                                           behind; a worker whose process died is detected
                                           at once, whatever this says (start-up
                                           may take up to max(this, 300 s))
``RELAXSGD_PEER_TIMEOUT``       30         seconds an Exchange waits for its answer
                                           before ``PeerUnavailable`` is raised in the
                                           program (the partner is skipped and counted);
                                           above a partner's longest Compute when it
                                           answers with Deferred (a Recv waits up to
                                           RELAXSGD_TIMEOUT)
``RELAXSGD_BACKEND``            auto       gloo, nccl, or auto (nccl when CUDA is present)
``RELAXSGD_SPAWN_GROUPS``       4          process groups for collectives of spawned
                                           sub-programs (how many may be in flight at once)
``RELAXSGD_HOST``               (auto)     address this worker listens on for point-to-point
                                           messages (default: the interface that reaches
                                           ``MASTER_ADDR``)
``RELAXSGD_SAVE_MODELS``        0          1: rank 0 also writes ``models.pt``, every
                                           worker's final parameters (rows by rank)
``RELAXSGD_SECRET``             (none)     the job secret (16+ characters, the same on
                                           every worker) that peers prove to each other
                                           (:mod:`.auth`); the launcher makes one
``RELAXSGD_SECRET_FILE``        (none)     or: a file holding it
``RELAXSGD_INSECURE``           0          1: no secret, loopback-only runs (a public key)
``RELAXSGD_TLS_CERT``,          (none)     PEM certificate, key and CA: mutual TLS on the
``_KEY``, ``_CA``                          point-to-point connections
``RELAXSGD_MAX_MESSAGE_MB``     (auto)     the largest message accepted (default: 4 x the
                                           model and its buffers + 1 MiB)
==============================  =========  ==================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..checks import require_int
from ..errors import ConfigError

BACKENDS = ("auto", "gloo", "nccl")
STARTUP_S = 300.0  # rendezvous and connections: workers may start far apart


@dataclass(frozen=True)
class DistOptions:
    timeout_s: float = 120.0
    peer_timeout_s: float = 30.0
    backend: str = "auto"
    spawn_groups: int = 4
    host: str | None = None
    save_models: bool = False
    max_message_mb: float | None = None

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.peer_timeout_s > 0:
            raise ConfigError("RELAXSGD_TIMEOUT and RELAXSGD_PEER_TIMEOUT must be > 0 seconds")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown RELAXSGD_BACKEND {self.backend!r}; choose one of: "
                              f"{', '.join(BACKENDS)}")
        require_int(self.spawn_groups, "RELAXSGD_SPAWN_GROUPS", at_least=1)
        if self.max_message_mb is not None and not self.max_message_mb > 0:
            raise ConfigError("RELAXSGD_MAX_MESSAGE_MB must be > 0")

    def max_frame(self, model_bytes: int) -> int:
        """The largest message body accepted: the setting, else 4 x ``model_bytes`` (a
        snapshot, or a message of a model and its momentum, with room) + 1 MiB."""
        if self.max_message_mb is not None:
            return int(self.max_message_mb * (1 << 20))
        return 4 * model_bytes + (1 << 20)


def _num(name: str, default: float, kind: type = float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None


def from_env() -> DistOptions:
    return DistOptions(
        timeout_s=_num("RELAXSGD_TIMEOUT", 120.0),
        peer_timeout_s=_num("RELAXSGD_PEER_TIMEOUT", 30.0),
        backend=os.environ.get("RELAXSGD_BACKEND", "auto") or "auto",
        spawn_groups=int(_num("RELAXSGD_SPAWN_GROUPS", 4, int)),
        host=os.environ.get("RELAXSGD_HOST") or None,
        save_models=os.environ.get("RELAXSGD_SAVE_MODELS", "0") not in ("", "0", "false"),
        max_message_mb=_num("RELAXSGD_MAX_MESSAGE_MB", 0.0) or None,
    )
