"""A small generated corpus in the format of ``plays.txt.gz``, and a tiny LM task on it."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

TITLES = ["THE FIRST PART OF KING ALPHA", "A LOVER'S TALE", "THE TRAGEDY OF BETA",
          "KING GAMMA, SECOND PART", "TWELFTH DAY; OR, WHAT YOU WILL", "THE SHORT POEM"]
# How each title after the first meets the previous work's last line (as in the real
# file): on its own line, after a stage direction, after "THE END", after a sentence.
GLUE = ["\n", "[Exeunt.]", "THE END", "ere we clap."]
WORDS = ["the", "king", "and", "of", "my", "lord", "love", "sweet", "night", "thou",
         "art", "good", "to", "be", "not", "what", "is", "in", "heart", "that"]
NAMES = ["HAMLET", "KING", "QUEEN", "FOOL"]


def body(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        out.append(f"{rng.choice(NAMES)}. {words.capitalize()}.")
    return "\n".join(out)


def make_corpus(works: int = 6, seed: int = 0, short: int = 5) -> tuple[str, list[str]]:
    """The text of ``works`` works (the last one ``short`` lines long), and their titles."""
    rng = random.Random(seed)
    titles = [TITLES[i % len(TITLES)] + ("" if i < len(TITLES) else f" {i}")
              for i in range(works)]
    text = ""
    for i, t in enumerate(titles):
        if i:
            text += GLUE[(i - 1) % len(GLUE)]
        lines = short if i == works - 1 else rng.randint(60, 120)
        text += f"{t}\n\nby William Shakespeare\n\n\n\n{body(rng, lines)}"
        text += "\n\n[Exeunt.]\n\n" if (i % len(GLUE)) == 3 else "\n"
    return text, titles


def write_corpus(folder: Path, **kw: Any) -> list[str]:
    """``folder/plays.txt.gz`` with a generated corpus; returns the titles."""
    folder.mkdir(parents=True, exist_ok=True)
    text, titles = make_corpus(**kw)
    with gzip.open(folder / "plays.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    return titles


# A model small enough for unit tests: a few ms per step.
TINY_LM = {"context": 16, "d_model": 16, "layers": 1, "heads": 2, "sample_chars": 40}
