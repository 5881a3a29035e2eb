"""Device correctness, checked on a CPU-only machine (and on CUDA when present).

Two checks fail here, without a GPU, when code makes a tensor on the default device where
the worker's device is meant (the bug that crashed 8 of 10 algorithms on an H200):

- a walk over the source: every tensor factory names its device; a CPU-side one (a data
  set built in host memory, the wire's framing, a host scalar) is in ``HOST_SIDE`` with
  the reason;
- a conformance run of every algorithm (and every compressor and quantizer through each
  of its protocol forms) under :class:`devicekit.StrictDevices`, where a factory without
  ``device=`` makes a meta tensor and mixing it with the workers' CPU tensors raises.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import relaxsgd
from devicekit import DeviceMixError, StrictDevices, cuda_or_skip, drive
from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.compress.spec import make_compressor
from relaxsgd.quantize.lattice import LatticeQuantizer
from relaxsgd.quantize.qsgd_diff import QSGDDiffQuantizer
from relaxsgd.run import prepare, simulate
from simkit import tiny

SRC = pathlib.Path(relaxsgd.__file__).parent
FACTORIES = {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm",
             "arange", "range", "tensor", "as_tensor", "asarray", "linspace", "logspace",
             "eye", "scalar_tensor", "empty_strided", "tril_indices", "triu_indices",
             "from_numpy", "frombuffer"}
NO_DEVICE_ARG = {"from_numpy", "frombuffer"}  # always on the CPU

# (file under src/relaxsgd, function or "*") -> why its tensors are made on the CPU.
HOST_SIDE = {
    ("bank.py", "Bank.__init__"): "loss_sum: a metrics accumulator the host reads",
    ("devices.py", "to_host"): "the pinned host copy of a CUDA tensor, for the wire",
    ("quantize/lattice.py", "LatticeQuantizer.encode_value"): "eps as float32: a host scalar",
    ("quantize/lattice_rows.py", "wire_eps"): "eps as float32: host scalars, read back at once",
    ("distributed/wire.py", "*"): "the wire format's framing works in host memory; the "
                                  "executor/p2p boundary copies to and from the device",
    ("distributed/collectives.py", "all_gather"): "the encoded blob is host bytes; it is "
                                                  "copied to the backend's device to travel",
    ("lab/calibrate.py", "*"): "measures gloo collectives on the CPU",
    ("lab/paths.py", "*"): "times the runtime's path with host tensors, as the transport "
                           "carries them",
    ("distributed/receiving.py", "Receiving._read_frame"): "a received frame lands in host "
                                                            "memory; p2p moves it to the device",
    ("metrics.py", "Recorder.__init__"): "a seeded permutation drawn on the CPU generator, "
                                         "copied once to the evaluation's device",
    ("topology/base.py", "UndirectedGraph.mixing_matrix"): "pure data, read as Python floats",
    ("topology/exponential.py", "Exponential.mixing_matrix"): "pure data, read as floats",
    ("tasks/base.py", "subsample"): "data sets are built in host memory (Bank moves them)",
    ("tasks/logreg.py", "make_data"): "data sets are built in host memory",
    ("tasks/quadratic.py", "build"): "data sets are built in host memory",
    ("tasks/digits.py", "load"): "data sets are built in host memory",
    ("tasks/mnist.py", "*"): "the MNIST files are read into host memory",
    ("tasks/mnist1d.py", "*"): "the generated data set is built in host memory",
    ("tasks/cifar10.py", "_stack"): "the CIFAR-10 files are read into host memory",
    ("tasks/shakespeare.py", "*"): "the text is tokenized in host memory",
    ("tasks/splits.py", "*"): "the split's index lists live in host memory",
}


def _factory_calls(tree: ast.AST):
    """(qualified function name, call node) of every ``torch.<factory>(...)``."""
    stack: list[str] = []

    def visit(node: ast.AST):
        named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if named:
            stack.append(node.name)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "torch":
            yield ".".join(stack), node
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
        if named:
            stack.pop()

    yield from visit(tree)


def host_side_violations(src: pathlib.Path = SRC) -> tuple[list[str], set]:
    """Factory calls that name no device, and host-side ones not in HOST_SIDE; plus the
    HOST_SIDE entries used."""
    bad, used = [], set()
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        for func, call in _factory_calls(ast.parse(path.read_text())):
            dev = next((k.value for k in call.keywords if k.arg == "device"), None)
            host = call.func.attr in NO_DEVICE_ARG or (
                isinstance(dev, ast.Constant) and str(dev.value).startswith("cpu"))
            if dev is not None and not host:
                continue  # names the device of the data (x.device, device=device)
            key = next((k for k in ((rel, func), (rel, "*")) if k in HOST_SIDE), None)
            if key is not None and (host or key[1] == "*"):
                used.add(key)
                continue
            what = "makes a tensor on the CPU" if host else "names no device="
            bad.append(f"{rel}:{call.lineno} ({func}): torch.{call.func.attr} {what}")
    return bad, used


def test_every_tensor_factory_names_the_device_of_its_data() -> None:
    bad, used = host_side_violations()
    assert not bad, ("tensor factories without the device of their data (use x.new_zeros, "
                     "torch.zeros_like or device=x.device; a CPU-side one needs device='cpu' "
                     "and a HOST_SIDE entry with the reason):\n" + "\n".join(bad))
    assert not set(HOST_SIDE) - used, f"stale HOST_SIDE entries: {set(HOST_SIDE) - used}"


def test_the_source_walk_finds_a_bare_factory(tmp_path) -> None:
    (tmp_path / "compress").mkdir()
    (tmp_path / "compress" / "x.py").write_text(
        "import torch\nclass C:\n    def decompress(self, p):\n"
        "        return torch.zeros(p.numel)\n    def ok(self, x):\n"
        "        return torch.zeros(3, device=x.device)\n"
        "    def host(self):\n        return torch.ones(2, device='cpu')\n")
    bad, _ = host_side_violations(tmp_path)
    assert [b.split(" ", 1)[0] for b in bad] == ["compress/x.py:4", "compress/x.py:8"]


# -- the strict mode itself ------------------------------------------------------------------

def _in_package(source: str, name: str):
    """A function compiled as if it were in relaxsgd's source (the mode looks at files)."""
    scope: dict = {"torch": torch}
    exec(compile(source, str(SRC / "compress" / "topk.py"), "exec"), scope)
    return scope[name]


@pytest.mark.parametrize("body", [
    "x + torch.zeros(x.numel())",                     # elementwise
    "torch.cat([x, torch.zeros(1)])",                 # gather of tensors
    "x.clone().add_(torch.ones(x.numel()), alpha=2)",  # silently accepted by torch itself
    "torch.zeros(x.numel()).index_put_((x.long(),), x)",
    "float(torch.tensor(1.5))",                       # a host read of a meta tensor
    "x @ torch.ones(x.numel(), 2)",                   # silently accepted by torch itself
    "x * torch.rand(x.shape, generator=torch.Generator())",
])
def test_strict_mode_catches_every_kind_of_mix(body: str) -> None:
    f = _in_package(f"def f(x):\n    return {body}\n", "f")
    x = torch.arange(4.0)
    f(x)  # fine without the mode
    with pytest.raises((DeviceMixError, RuntimeError, NotImplementedError)), StrictDevices():
        f(x)


def test_strict_mode_lets_device_aware_code_and_torch_internals_through() -> None:
    f = _in_package("def f(x):\n    return x + torch.zeros(x.numel(), device=x.device)"
                    " + x.new_ones(x.numel()) + torch.zeros_like(x)\n", "f")
    with StrictDevices():
        assert torch.equal(f(torch.arange(3.0)), torch.arange(3.0) + 1)
        lin = torch.nn.Linear(2, 2)  # torch's own factories keep the default device
        opt = torch.optim.Adam(lin.parameters())
        lin(torch.ones(1, 2, device="cpu")).sum().backward()
        opt.step()
    assert lin.weight.device.type == "cpu"


# -- conformance: every algorithm, compressor and quantizer under the strict mode ---------

GOSSIP = {"swarm", "dpsgd", "adpsgd", "choco", "sgp"}
VARIANTS = [(name, {}) for name in ALGORITHMS.names()] + [
    ("efsgd", {"compressor": c}) for c in (
        "identity", "fp16", "bf16", "qsgd:bits=4,bucket=8", "randk:ratio=0.2",
        "randk:ratio=0.2,shared_seed=3", "sign", "powersgd:rank=1", "topk:ratio=0.2")] + [
    ("olco3", {"aggregation": "ps"}),
    ("olco3", {"compressor": "powersgd:rank=1"}),
    ("swarm", {"quantizer": "qsgd"}),
    ("swarm", {"quantizer": "lattice", "bits": 6}),
    ("choco", {"compressor": "qsgd:bits=4,bucket=8"}),
]


def _config(name: str, options: dict, **over):
    extra = {"topology": "ring"} if name in GOSSIP else {}
    return tiny(algo=name, algo_options=options, steps=6, evals=2, **extra, **over)


@pytest.mark.parametrize("name,options", VARIANTS,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                              for n, o in VARIANTS])
def test_every_algorithm_runs_under_the_strict_device_mode(name: str, options: dict) -> None:
    prep = prepare(_config(name, options))  # data sets are built in host memory, outside
    with StrictDevices():
        out = simulate(prep)
    assert out.bank.X.device.type == "cpu" and torch.isfinite(out.bank.X).all()


@pytest.mark.parametrize("name,options", [("olco3", {"p": 2, "s": 1}), ("swarm", {})])
def test_a_checkpoint_resumes_under_the_strict_device_mode(name: str, options: dict,
                                                           tmp_path) -> None:
    """The state read back from a checkpoint (``map_location="cpu"``) is moved to the
    workers' device: a resumed run mixes nothing either."""
    import dataclasses

    from relaxsgd.run import run
    from relaxsgd.sim import saving

    class Killed(BaseException):
        """Stands for SIGKILL: nothing catches it."""

    cfg = dataclasses.replace(_config(name, options, checkpoint_every=4), steps=12,
                              out=str(tmp_path / "run"))
    orig = saving.SimCheckpoints._take

    def take(self, engine) -> None:  # stop dead after the first checkpoint
        orig(self, engine)
        raise Killed

    saving.SimCheckpoints._take = take
    try:
        with pytest.raises(Killed):
            run(cfg, progress=False)
    finally:
        saving.SimCheckpoints._take = orig
    with StrictDevices():
        assert run(cfg, progress=False, resume=True)["status"] == "completed"


def test_the_language_model_with_diloco_and_its_sample_under_the_strict_mode(
        tmp_path) -> None:
    """The Shakespeare transformer (the issue's failing case), its data built, trained with
    DiLoCo, evaluated and sampled (``sample.txt``), all under the mode."""
    from lmkit import TINY_LM, write_corpus
    from relaxsgd.config import from_dict
    from relaxsgd.run import run

    write_corpus(tmp_path)
    cfg = from_dict({"task": "shakespeare", "task_options": dict(TINY_LM),
                     "data_dir": str(tmp_path), "workers": 2, "steps": 4, "evals": 1,
                     "algo": "diloco", "algo_options": {"p": 2},
                     "compute": {"step_time_s": 0.01}, "train": {"batch_size": 4},
                     "eval_samples": 16, "out": str(tmp_path / "run")})
    with StrictDevices():
        assert run(cfg, progress=False)["status"] == "completed"
    assert (tmp_path / "run" / "sample.txt").read_text().strip()


COMPRESSORS = ["identity", "fp16", "bf16", "qsgd:bits=3,bucket=4", "topk:k=3",
               "randk:k=3", "randk:k=3,scale=true,shared_seed=5", "sign", "powersgd:rank=1",
               "ef(topk:k=2)", "ef(powersgd:rank=1)", "ef(sign)"]
LAYOUT = [("w", torch.Size([3, 4])), ("b", torch.Size([3]))]


def _compressor_forms(spec: str, device: str) -> list[torch.Tensor]:
    """Every protocol form, two rounds each: compress/decompress and mean (all-reduce or
    all-gather); the decoded tensors and the state's tensors."""
    c = make_compressor(spec)
    x = torch.linspace(-1.0, 1.0, 15, device=device)
    out = []
    for form in ("pair", "mean"):
        state = c.init_state(15, LAYOUT, torch.device(device))
        gen = torch.Generator().manual_seed(1)
        for k in range(2):
            if form == "pair":
                payload, state = c.compress(x * (k + 1), state, gen)
                out.append(c.decompress(payload))
            else:
                mean, own, state = drive(c.mean(x * (k + 1), state, gen), n=2)
                out += [mean, own]
        out += [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    return out


@pytest.mark.parametrize("spec", COMPRESSORS)
def test_every_compressor_form_runs_under_the_strict_device_mode(spec: str) -> None:
    with StrictDevices():
        got = _compressor_forms(spec, "cpu")
    assert all(t.device.type == "cpu" for t in got)


def _quantizer_rounds(q, device: str) -> list[torch.Tensor]:
    ref = torch.linspace(-1.0, 1.0, 10, device=device)
    gen = torch.Generator().manual_seed(2)
    out = []
    for k in range(2):
        x = ref + 0.01 * (k + 1)
        p = q.encode(x, eps=0.01, generator=gen, reference=ref)
        x_hat, ok = q.decode(p, ref)
        out += [x_hat, torch.tensor(float(ok), device=device)]
    return out


@pytest.mark.parametrize("q", [LatticeQuantizer(bits=6), LatticeQuantizer(bits=8),
                               QSGDDiffQuantizer(bits=4, bucket_size=4)],
                         ids=["lattice6", "lattice8", "qsgd4"])
def test_every_quantizer_runs_under_the_strict_device_mode(q) -> None:
    with StrictDevices():
        got = _quantizer_rounds(q, "cpu")
    assert all(t.device.type == "cpu" for t in got)


# -- CUDA: the same matrix on the GPU, the same numbers as on the CPU --------------------

@pytest.mark.cuda
@pytest.mark.parametrize("spec", COMPRESSORS)
def test_every_compressor_form_gives_the_cpu_values_on_cuda(spec: str) -> None:
    cuda_or_skip()
    cpu, gpu = _compressor_forms(spec, "cpu"), _compressor_forms(spec, "cuda")
    assert all(t.device.type == "cuda" for t in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("q", [LatticeQuantizer(bits=6), QSGDDiffQuantizer(bits=4, bucket_size=4)],
                         ids=["lattice6", "qsgd4"])
def test_every_quantizer_gives_the_cpu_values_on_cuda(q) -> None:
    cuda_or_skip()
    for a, b in zip(_quantizer_rounds(q, "cpu"), _quantizer_rounds(q, "cuda"), strict=True):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a)


@pytest.mark.cuda
@pytest.mark.parametrize("name,options", VARIANTS,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                              for n, o in VARIANTS])
def test_every_algorithm_runs_with_its_workers_on_cuda(monkeypatch, name: str,
                                                       options: dict) -> None:
    cuda_or_skip()
    import relaxsgd.run as run_mod

    cpu = simulate(prepare(_config(name, options))).bank.X
    real = run_mod.Bank
    monkeypatch.setattr(run_mod, "Bank", lambda *a, **k: real(*a, **{**k, "device": "cuda"}))
    gpu = simulate(prepare(_config(name, options))).bank.X
    assert gpu.device.type == "cuda"
    # the same random draws on both devices: the models differ by float rounding only
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
