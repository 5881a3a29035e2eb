"""Task plug-ins: data loaders (from generated files), splits, models, options."""

from __future__ import annotations

import gzip
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from relaxsgd.errors import ConfigError, DataError
from relaxsgd.tasks import TASKS
from relaxsgd.tasks import cifar10 as cifar_mod
from relaxsgd.tasks.models import build_model, resnet20
from relaxsgd.tasks.splits import split_indices
from simkit import fake_cifar as _fake_cifar

MNIST_FILES = {"train-images-idx3-ubyte": (2051, "train_x"),
               "train-labels-idx1-ubyte": (2049, "train_y"),
               "t10k-images-idx3-ubyte": (2051, "test_x"),
               "t10k-labels-idx1-ubyte": (2049, "test_y")}


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _fake_mnist(folder: Path, gz: bool, dotted: bool = False, n: int = 12,
                bad_magic: str | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (n, 28, 28)), "train_y": np.arange(n) % 10,
              "test_x": rng.integers(0, 256, (5, 28, 28)), "test_y": np.arange(5) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, (magic, key) in MNIST_FILES.items():
        data = _idx_bytes(arrays[key], 1234 if name == bad_magic else magic)
        fname = name.replace("-idx", ".idx") if dotted else name
        if gz:
            (folder / (fname + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / fname).write_bytes(data)
    return arrays


def _build(task: str, opts: dict | None = None, data_dir: str | None = None, seed: int = 0):
    return TASKS.get(task)(opts or {}, data_dir, seed)


# ---------------------------------------------------------------- MNIST

@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_mnist_reads_idx_files(tmp_path: Path, gz: bool, dotted: bool) -> None:
    arrays = _fake_mnist(tmp_path, gz, dotted)
    spec = _build("mnist", {}, str(tmp_path))
    d = spec.data
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert torch.equal(d.y_train, torch.as_tensor(arrays["train_y"]))
    raw = torch.as_tensor(arrays["test_x"][2], dtype=torch.float32) / 255
    assert torch.allclose(d.x_test[2, 0], (raw - 0.1307) / 0.3081, atol=1e-5)
    assert spec.model_fn()(d.x_train[:3]).shape == (3, 10)
    assert spec.batching == "loop"


def test_mnist_subfolder_env_var_and_subsample(tmp_path: Path, monkeypatch) -> None:
    _fake_mnist(tmp_path / "mnist", gz=True)
    monkeypatch.setenv("RELAXSGD_DATA_DIR", str(tmp_path))
    a = _build("mnist", {"n_train": 4, "n_test": 2, "model": "mlp"}, None, seed=1)
    b = _build("mnist", {"n_train": 4, "n_test": 2, "model": "mlp"}, None, seed=1)
    assert a.data.x_train.shape == (4, 1, 28, 28) and len(a.data.y_test) == 2
    assert torch.equal(a.data.x_train, b.data.x_train)
    assert a.batching == "vmap" and a.model_fn()(a.data.x_train).shape == (4, 10)
    with pytest.raises(ConfigError, match="n_train"):
        _build("mnist", {"n_train": 13}, None)


def test_mnist_bad_magic_and_missing_files(tmp_path: Path, monkeypatch) -> None:
    _fake_mnist(tmp_path / "bad", gz=True, bad_magic="t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic number 1234"):
        _build("mnist", {}, str(tmp_path / "bad"))
    with pytest.raises(DataError, match="does not exist"):
        _build("mnist", {}, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found") as err:
        _build("mnist", {}, str(tmp_path / "empty"))
    assert "\n" not in str(err.value)
    (tmp_path / "trunc").mkdir()
    _fake_mnist(tmp_path / "trunc", gz=False)
    path = tmp_path / "trunc" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        _build("mnist", {}, str(tmp_path / "trunc"))
    monkeypatch.delenv("RELAXSGD_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="RELAXSGD_DATA_DIR"):
        _build("mnist", {}, None)


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_reads_batches_from_folder_or_parent(tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path)
    for where in (tmp_path, folder):
        spec = _build("cifar10", {}, str(where))
        d = spec.data
        assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
        assert d.y_train.tolist()[:5] == [0, 1, 2, 3, 1] and d.y_train.dtype == torch.int64
    with (folder / "data_batch_2").open("rb") as f:
        raw = pickle.load(f)[b"data"][3].reshape(3, 32, 32)
    want = (torch.as_tensor(raw[1], dtype=torch.float32) / 255 - 0.4822) / 0.2435
    assert torch.allclose(spec.data.x_train[7, 1], want, atol=1e-5)
    assert spec.augment is not None and spec.batching == "loop"
    assert spec.model_fn()(d.x_train[:2]).shape == (2, 10)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        _build("cifar10", {}, str(tmp_path))
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        _build("cifar10", {}, str(tmp_path / "e"))


class _Boom:
    """Unpickling this would call os.system: the loader must refuse it before it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar10_batch_that_names_a_function_is_refused_and_nothing_runs(
        tmp_path: Path) -> None:
    folder = _fake_cifar(tmp_path)
    marker = tmp_path / "ran"
    with (folder / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": _Boom(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*names posix\.system"):
        _build("cifar10", {}, str(tmp_path))
    assert not marker.exists()
    # a file far larger than any batch is refused before it is read
    big = folder / "data_batch_3"
    with big.open("wb") as f:
        f.truncate(cifar_mod.MAX_BATCH_BYTES + 1)
    with pytest.raises(DataError, match="more than a batch"):
        _build("cifar10", {}, str(tmp_path))


def _is_crop_or_flip(out: torch.Tensor, img: torch.Tensor) -> bool:
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(2)):
                return True
    return False


def test_cifar10_augment_is_seeded_crop_and_flip() -> None:
    x = torch.randn(6, 3, 32, 32)
    a = cifar_mod.augment(x, torch.Generator().manual_seed(3))
    b = cifar_mod.augment(x, torch.Generator().manual_seed(3))
    c = cifar_mod.augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert all(_is_crop_or_flip(a[i], x[i]) for i in range(6))
    many = cifar_mod.augment(x.repeat(20, 1, 1, 1), torch.Generator().manual_seed(0))
    assert not torch.equal(many[0], x[0])  # 120 draws: some crop or flip happened


# ---------------------------------------------------------------- splits

def _labels(n: int = 1000, classes: int = 10) -> torch.Tensor:
    return torch.arange(n) % classes


def _check_partition(parts: list[torch.Tensor], total: int) -> None:
    allidx = torch.cat(parts)
    assert all(p.dtype == torch.int64 for p in parts)
    assert len(allidx) == total and torch.equal(allidx.sort()[0], torch.arange(total))


def _mean_entropy(parts: list[torch.Tensor], labels: torch.Tensor) -> float:
    ent = []
    for p in parts:
        freq = torch.bincount(labels[p], minlength=10).double() / len(p)
        ent.append(-(freq[freq > 0] * freq[freq > 0].log()).sum().item())
    return sum(ent) / len(ent)


def test_iid_split_covers_all_with_equal_sizes() -> None:
    y = _labels(1003)
    parts = split_indices(y, 10, "iid", seed=0)
    _check_partition(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}
    again = split_indices(y, 10, "iid", 0)
    assert all(torch.equal(p, q) for p, q in zip(parts, again, strict=True))
    assert not torch.equal(parts[0], split_indices(y, 10, "iid", 1)[0])


def test_shards_split_gives_few_labels() -> None:
    y = _labels()
    parts = split_indices(y, 10, "shards", seed=0, shards_per_worker=2)
    _check_partition(parts, 1000)
    assert max(len(torch.unique(y[p])) for p in parts) <= 2


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = _labels(2000)
    entropies = []
    for alpha in (100.0, 1.0, 0.05):
        parts = split_indices(y, 10, "dirichlet", seed=0, alpha=alpha)
        _check_partition(parts, 2000)
        assert min(len(p) for p in parts) >= 1
        entropies.append(_mean_entropy(parts, y))
    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] > 0.95 * math.log(10) and entropies[2] < 0.5 * math.log(10)


def test_dirichlet_min_size_by_rebalancing() -> None:
    y = _labels(500)
    parts = split_indices(y, 50, "dirichlet", seed=0, alpha=0.01, min_size=8)
    _check_partition(parts, 500)
    assert min(len(p) for p in parts) >= 8


def test_split_of_float_targets_bins_them() -> None:
    y = torch.randn(400)
    parts = split_indices(y, 10, "shards", seed=0, shards_per_worker=1)
    _check_partition(parts, 400)
    # 10 shards of 40 = the 10 quantile bins: each worker holds one range of the target
    ranges = sorted((y[p].min().item(), y[p].max().item()) for p in parts)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(ranges[:-1], ranges[1:], strict=True))


@pytest.mark.parametrize("kw,match", [
    ({"n": 4, "kind": "random"}, "unknown split 'random'; choose one of: iid, shards"),
    ({"n": 0, "kind": "iid"}, ">= 1"),
    ({"n": 101, "kind": "iid"}, "at most 100 workers"),
    ({"n": 4, "kind": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ({"n": 60, "kind": "shards"}, "shards"),
    ({"n": 10, "kind": "iid", "min_size": 11}, "min_size"),
])
def test_split_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_indices(_labels(100), seed=0, **kw)


# ---------------------------------------------------------------- tasks and models

SMALL = [
    ("logreg", {"n_train": 200, "n_test": 50}),
    ("logreg", {"n_train": 200, "n_test": 50, "model": "mlp", "hidden": [16, 8]}),
    ("quadratic", {"n_train": 100, "n_test": 20, "dim": 5}),
    ("digits", {}),
    ("digits", {"model": "mlp"}),
    ("digits", {"model": "cnn"}),
    ("mnist1d", {"num_samples": 200}),
    ("mnist1d", {"num_samples": 200, "model": "logreg"}),
    ("mnist1d", {"num_samples": 200, "model": "cnn"}),
]


@pytest.mark.parametrize("task,opts", SMALL)
def test_task_builds_and_model_runs(task: str, opts: dict) -> None:
    spec = _build(task, opts, seed=3)
    d = spec.data
    assert len(d.x_train) > len(d.x_test) > 0 and d.x_train.dtype == torch.float32
    out = spec.model_fn()(d.x_train[:4])
    classes = d.num_classes or 1
    assert out.shape == (4, classes)
    assert torch.isfinite(spec.loss_fn(out, d.y_train[:4]))
    if d.num_classes:
        assert d.y_train.dtype == torch.int64 and int(d.y_train.max()) < classes
        assert spec.metric == "accuracy"
    again = _build(task, opts, seed=3)
    assert torch.equal(again.data.x_train, d.x_train)  # seeded


@pytest.mark.parametrize("task,opts", [s for s in SMALL if s[0] != "digits"][:4])
def test_vmap_batching_models_are_buffer_free(task: str, opts: dict) -> None:
    spec = _build(task, opts)
    model = spec.model_fn()
    assert spec.batching == "vmap" and not list(model.buffers())
    params = {k: torch.stack([v.detach(), v.detach() + 1]) for k, v in model.named_parameters()}
    x = spec.data.x_train[:6].reshape(2, 3, *spec.data.x_train.shape[1:])
    out = vmap(lambda p, xb: functional_call(model, p, (xb,)))(params, x)
    assert out.shape[:2] == (2, 3)


def test_quadratic_optimum_has_zero_gradient() -> None:
    spec = _build("quadratic", {"n_train": 300, "dim": 8, "noise": 0.5}, seed=2)
    model = spec.model_fn()
    torch.nn.utils.vector_to_parameters(spec.optimum, model.parameters())
    loss = spec.loss_fn(model(spec.data.x_train), spec.data.y_train)
    grad = torch.autograd.grad(loss, list(model.parameters()))[0]
    assert spec.metric == "neg_loss" and spec.data.num_classes == 0
    assert grad.abs().max() < 1e-4 and 0.05 < loss.item() < 0.2  # about noise^2 / 2
    torch.nn.utils.vector_to_parameters(spec.optimum + 0.1, model.parameters())
    assert spec.loss_fn(model(spec.data.x_train), spec.data.y_train) > loss


def test_mnist1d_leaves_global_rng_alone() -> None:
    np.random.seed(5)
    random.seed(5)
    want_np, want_py = np.random.rand(), random.random()
    np.random.seed(5)
    random.seed(5)
    _build("mnist1d", {"num_samples": 100})
    assert np.random.rand() == want_np and random.random() == want_py


def test_mnist1d_rebuilt_gives_the_same_data_in_its_own_tensors() -> None:
    # the generated sets are kept for a rebuild (tune's trials); each build owns its tensors
    a = _build("mnist1d", {"num_samples": 120}, seed=11).data
    a.x_train.add_(1.0)
    a.y_test.zero_()
    b = _build("mnist1d", {"num_samples": 120}, seed=11).data
    assert not torch.equal(a.x_train, b.x_train) and int(b.y_test.max()) > 0
    c = _build("mnist1d", {"num_samples": 120}, seed=12).data  # another seed: other data
    assert not torch.equal(b.x_train, c.x_train)
    assert torch.allclose(b.x_train, a.x_train - 1.0, atol=1e-5)


def test_resnet20_size_norms_and_buffers() -> None:
    bn, gn = resnet20(10), resnet20(10, norm="gn", gn_groups=4)
    n_params = sum(p.numel() for p in bn.parameters())
    assert 260_000 < n_params < 280_000  # He et al. 2016: 0.27M
    assert sum(p.numel() for p in gn.parameters()) == n_params
    assert list(bn.buffers()) and not list(gn.buffers())
    x = torch.randn(2, 3, 32, 32)
    assert bn(x).shape == gn(x).shape == (2, 10)
    with pytest.raises(ConfigError, match="gn_groups"):
        resnet20(10, norm="gn", gn_groups=3)


def test_cifar10_gn_and_cnn_options(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    spec = _build("cifar10", {"norm": "gn", "augment": False, "n_train": 6}, str(tmp_path))
    assert spec.augment is None and len(spec.data.y_train) == 6
    assert not list(spec.model_fn().buffers())
    spec = _build("cifar10", {"model": "cnn"}, str(tmp_path))
    assert spec.model_fn()(spec.data.x_test[:2]).shape == (2, 10)


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg'; choose one of: logreg, mlp"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="model='resnet20'.*choose one of"):
        _build("digits", {"model": "resnet20"})


@pytest.mark.parametrize("task", TASKS.names())
def test_every_task_rejects_unknown_option(task: str) -> None:
    module = TASKS.module(task)
    assert isinstance(module.OPTIONS, dict) and "model" in module.OPTIONS
    with pytest.raises(ConfigError, match="unknown option 'lr_typo'.*choose one of:.*model"):
        _build(task, {"lr_typo": 1})


@pytest.mark.parametrize("task,opts,match", [
    ("logreg", {"dim": 0}, "dim=0"),
    ("logreg", {"hidden": [], "model": "mlp"}, "hidden"),
    ("digits", {"test_fraction": 1.5}, "test_fraction"),
    ("mnist1d", {"train_split": 0.0}, "train_split"),
])
def test_bad_option_values(task: str, opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _build(task, opts)
