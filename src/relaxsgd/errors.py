"""Errors that the command line turns into one clear line and a non-zero exit."""

from __future__ import annotations


class RelaxError(Exception):
    """Base of the errors relaxsgd reports to a user as one line (no traceback)."""

    exit_code = 2


class ConfigError(RelaxError, ValueError):
    """A config value, a flag, a name or a file is wrong; the message says what would be right."""


class DataError(ConfigError):
    """A data set could not be read (missing or malformed files); says where to get them."""


class Diverged(RelaxError, RuntimeError):
    """The loss became NaN or infinite; carries the step and the worker where it was seen."""

    exit_code = 3

    def __init__(self, step: int, worker: int, loss: float) -> None:
        super().__init__(f"diverged: loss {loss} at local step {step} of worker {worker}; "
                         "try a smaller --lr or a learning-rate warm-up")
        self.step = step
        self.worker = worker


class Deadlock(RelaxError, RuntimeError):
    """The simulator has no event left but some worker still waits: an algorithm bug."""

    exit_code = 4


class StoppedAtCheckpoint(KeyboardInterrupt):
    """The run was stopped by Ctrl-C or SIGTERM after saving a checkpoint: an interrupt
    (whatever handles one handles it), whose ``note`` says how to go on; the exit status
    is the signal's (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, note: str, signum: int) -> None:
        super().__init__(note)
        import signal

        # only these two stop a run (a number that arrived from a peer is not trusted)
        if signum not in (signal.SIGINT, signal.SIGTERM):
            signum = signal.SIGTERM
        self.note = note
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error line, cut to about ``limit`` characters, saying how
    long the value was: an error must never print a user's whole structure (a 1.3 million
    item list, an alias-expanded YAML document), nor spend time building its repr."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 6, 6, 4, 6
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit] + "..."
    if isinstance(value, (str, bytes)):
        cut = cut or len(value) > limit
    elif isinstance(value, (list, tuple, dict, set)):
        cut = cut or len(value) > 6
    if cut and isinstance(value, (str, bytes, list, tuple, dict, set)):
        unit = "characters" if isinstance(value, str) else \
            "bytes" if isinstance(value, bytes) else "items"
        text += f" (cut: {len(value):,} {unit})"
    return text
