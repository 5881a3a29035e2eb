"""Your own PyTorch training loop, with any relaxsgd algorithm doing the communication.

Run it on 4 processes of this machine (gloo on CPU; NCCL on GPUs):

    torchrun --standalone --nproc-per-node 4 examples/train_with_wrapper.py
    torchrun --standalone --nproc-per-node 4 examples/train_with_wrapper.py \
        --algo olco3 --opt s=1 --opt compressor=powersgd:rank=2

and across machines with torchrun's --nnodes/--rdzv-endpoint (docs/distributed.md).

Everything here is plain PyTorch (a data set, a DistributedSampler, a CNN, SGD with
momentum, a cosine learning-rate schedule) except three lines marked "relaxsgd". The data
is scikit-learn's bundled 8x8 digits, so nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import relaxsgd.distributed as rd


def data() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", default="localsgd", help="any name of 'relaxsgd list'")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an algorithm option, e.g. p=8 or compressor=topk:ratio=0.01")
    ap.add_argument("--topology", default="complete", help="for decentralized algorithms")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    a = ap.parse_args()
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in a.opt)}

    rank, world, device = rd.init()                                        # relaxsgd
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = data()
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler, drop_last=True)
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    steps = a.epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    relaxed = rd.wrap(model, opt, a.algo, total_steps=steps, options=options,  # relaxsgd
                      topology=a.topology)
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    relaxed.finish()                                                       # relaxsgd

    model.eval()
    with torch.no_grad():
        xt, yt = test.tensors
        acc = (model(xt.to(device)).argmax(1).cpu() == yt).float().mean().item()
    s = relaxed.stats()
    print(f"rank {rank}: test accuracy {acc:.4f} after {s['step']} steps; sent "
          f"{s['bytes_sent'] / 1e6:.2f} MB ({s['wire_bytes'] / 1e6:.2f} MB on the wire), "
          f"stalled {s['stall_s']:.2f} s of {s['time_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
