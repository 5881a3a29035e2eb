"""Safe outputs: atomic writes, strict JSON, the output folder's checks, the final models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from relaxsgd.errors import ConfigError
from relaxsgd.outputs import (
    atomic_write,
    load_models,
    models_payload,
    prepare_out_dir,
    save_models,
    strict_json,
    worker_state,
)


def _strict_load(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_writes_null_for_non_finite_numbers_and_says_where() -> None:
    doc = {"status": "diverged", "final": {"loss": math.inf, "acc": 0.5,
                                           "hist": [1.0, math.nan, -math.inf]}}
    parsed = _strict_load(strict_json(doc))
    assert parsed["final"] == {"loss": None, "acc": 0.5, "hist": [1.0, None, None]}
    assert parsed["non_finite"] == {"final.loss": "inf", "final.hist[1]": "nan",
                                    "final.hist[2]": "-inf"}
    assert "non_finite" not in _strict_load(strict_json({"a": 1.0}))


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "result.json"
    atomic_write(str(path), "old")
    atomic_write(str(path), b"new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["result.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "result.json"
    atomic_write(str(path), "old")

    def boom(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_out_dir_refuses_files_non_empty_folders_and_unwritable_places(tmp_path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        prepare_out_dir(str(f), force=True)
    with pytest.raises(ConfigError, match="cannot write to output folder"):
        prepare_out_dir(str(f / "sub"), force=False)
    old = tmp_path / "old"
    (old / "localsgd").mkdir(parents=True)
    for name in ("result.json", "metrics.csv", "notes.txt", "checkpoint.pt",
                 "checkpoint-rank0-at12.5.pt", "checkpoint-rank1-at4.pt", "checkpoint-mine.pt"):
        (old / name).write_text("x")
    (old / "localsgd" / "config.yaml").write_text("x")
    with pytest.raises(ConfigError, match=r"is not empty .*add --force"):
        prepare_out_dir(str(old), force=False)
    prepare_out_dir(str(old), force=True)  # our files go, the user's stay
    assert sorted(os.listdir(old)) == ["checkpoint-mine.pt", "localsgd", "notes.txt"]
    assert os.listdir(old / "localsgd") == []
    assert prepare_out_dir(str(tmp_path / "new" / "deep"), force=False)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_models_file_round_trips_parameters_and_buffers(tmp_path) -> None:
    net = _bn_net()
    d = sum(p.numel() for p in net.parameters())
    X = torch.randn(3, d)
    bufs = []
    for i in range(3):
        b = {k: v.clone() for k, v in net.named_buffers()}
        b["1.running_mean"] += i
        bufs.append(b)
    mean_bufs = {"1.running_mean": bufs[1]["1.running_mean"].clone(),
                 "1.running_var": bufs[0]["1.running_var"].clone(),
                 "1.num_batches_tracked": bufs[0]["1.num_batches_tracked"]}
    path = str(tmp_path / "models.pt")
    save_models(path, models_payload(net, X, bufs, mean_bufs, [0, 1, 2]))
    m = load_models(path)
    assert m["ranks"] == [0, 1, 2] and m["param_names"][0] == "0.weight"
    torch.testing.assert_close(m["X"], X)
    fresh = _bn_net()
    fresh.load_state_dict(m["mean"])  # the mean model is a loadable state_dict
    flat = torch.cat([p.detach().reshape(-1) for p in fresh.parameters()])
    torch.testing.assert_close(flat, X.mean(0))
    torch.testing.assert_close(fresh[1].running_mean, bufs[0]["1.running_mean"] + 1)
    w2 = worker_state(m, 2)
    fresh.load_state_dict(w2)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in fresh.parameters()]),
                               X[2])
    torch.testing.assert_close(fresh[1].running_mean, bufs[2]["1.running_mean"])


def test_truncated_or_foreign_models_files_are_one_line(tmp_path) -> None:
    net = _bn_net()
    d = sum(p.numel() for p in net.parameters())
    path = tmp_path / "models.pt"
    save_models(str(path), models_payload(net, torch.zeros(2, d), [{}, {}], {}, [0, 1]))
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="is not a relaxsgd models file"):
        load_models(str(tmp_path / "cut.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="no format 'relaxsgd.models/1'"):
        load_models(str(tmp_path / "foreign.pt"))
    (tmp_path / "code.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle calling code
    with pytest.raises(ConfigError, match="cannot be read"):
        load_models(str(tmp_path / "code.pt"))
