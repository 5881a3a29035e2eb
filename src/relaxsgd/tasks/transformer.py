"""A small decoder-only transformer for character-level language modelling, in plain torch.

GPT-2's shape (Radford et al. 2019) at toy size: token embedding, ``layers`` pre-norm
blocks (LayerNorm -> causal multi-head self-attention -> residual, LayerNorm -> GELU MLP
of width 4 d -> residual), a final LayerNorm and an output layer tied to the token
embedding (Press and Wolf 2017). Attention is
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (under vmap, the same
formula in batched matrix products: :func:`causal_attention`). Positions are
``learned`` (an embedding added to the tokens) or ``rotary`` (Su et al. 2021, RoFormer:
queries and keys rotated by position; computed in the forward pass so that the model has
no buffers and stays vmap-able). No dropout: training is deterministic for a seed.

Contract (the repo's model contract, adapted to sequences): input ``(B, T)`` integer
tokens (any integer dtype, T <= ``context``), output logits ``(B, vocab, T)``: the class
dimension second, which is what ``F.cross_entropy`` takes with ``(B, T)`` targets and what
the evaluator's ``argmax(1)`` expects, so the task's loss is plain cross-entropy and the
accuracy column is next-character accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITIONS = ("learned", "rotary")


def rotate(x: Tensor) -> Tensor:
    """Rotary position embedding of ``x`` (B, H, T, Dh): pairs (i, i + Dh/2) rotated by
    angle t * 10000^(-2i/Dh) (the RoFormer / GPT-NeoX "rotate half" layout)."""
    t, dh = x.shape[-2], x.shape[-1]
    half = dh // 2
    freq = torch.pow(10000.0, -torch.arange(half, dtype=x.dtype, device=x.device) / half)
    ang = torch.arange(t, dtype=x.dtype, device=x.device)[:, None] * freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., :half], x[..., half:2 * half]
    out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if dh % 2 else out


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal scaled dot-product attention of (B, H, T, Dh) queries, keys and values.

    ``F.scaled_dot_product_attention`` outside ``torch.func`` transforms; inside them (the
    simulator's vmapped steps over stacked workers) the same formula in plain batched
    matrix products, because torch has no vmap batching rule for SDPA's fused kernels and
    falls back to one call per worker (a warning and a loop)."""
    if not torch._C._functorch.is_functorch_wrapped_tensor(q):  # vmap, or grad in vmap
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, d: int, heads: int, rotary: bool) -> None:
        super().__init__()
        self.heads, self.rotary = heads, rotary
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in (q, k, v))
        if self.rotary:
            q, k = rotate(q), rotate(k)
        a = causal_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class CharTransformer(nn.Module):
    """Decoder-only transformer over ``vocab`` tokens (see the module docstring)."""

    def __init__(self, vocab: int, context: int = 128, d: int = 128, layers: int = 4,
                 heads: int = 4, positions: str = "learned") -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not a multiple of heads={heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d) if positions == "learned" else None
        self.blocks = nn.ModuleList(Block(d, heads, positions == "rotary")
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        self._init(layers)

    def _init(self, layers: int) -> None:
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight",
                                                                     "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        t = x.shape[-1]
        h = self.tok(x)
        if self.pos is not None:
            h = h + self.pos.weight[:t]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h)).transpose(1, 2)


@torch.no_grad()
def generate(model: CharTransformer, prompt: Tensor, length: int, temperature: float,
             generator: torch.Generator, banned: int | None = None) -> Tensor:
    """``length`` tokens sampled after ``prompt`` (1-D), each from softmax(logits / T)
    of the last ``model.context`` tokens, never ``banned`` (the unknown-character id);
    deterministic for the generator's state."""
    model.eval()
    seq = prompt.long().to(next(model.parameters()).device, copy=True)
    for _ in range(length):
        logits = model(seq[-model.context:][None])[0, :, -1]
        if banned is not None:
            logits[banned] = -math.inf
        p = torch.softmax(logits.double() / temperature, dim=0)
        # drawn where the generator lives (the CPU): the same text on every device
        nxt = torch.multinomial(p.to(generator.device), 1, generator=generator).to(seq.device)
        seq = torch.cat([seq, nxt])
    return seq[prompt.numel():]


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
