"""The shakespeare task: the works splitter, the tokenizer, the splits, the transformer,
the language-model metrics, a short run, errors, and a 2-process distributed run."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import torch

from lmkit import TINY_LM, write_corpus
from relaxsgd.config import from_dict
from relaxsgd.errors import ConfigError, DataError
from relaxsgd.run import prepare, simulate
from relaxsgd.tasks import TASKS
from relaxsgd.tasks.shakespeare import CharTokenizer, make_dataset, read_text, split_works
from relaxsgd.tasks.splits import split_indices
from relaxsgd.tasks.transformer import CharTransformer

REAL = Path(__file__).resolve().parents[1] / ".." / ".." / "shared" / "data" / "shakespeare"
REAL = REAL if (REAL / "plays.txt.gz").is_file() else Path("/work/shared/data/shakespeare")
HAVE_REAL = (REAL / "plays.txt.gz").is_file()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("shakespeare")
    return folder, write_corpus(folder)


def _spec(folder: Path, **opts):
    return TASKS.get("shakespeare")({**TINY_LM, **opts}, str(folder), 0)


def _cfg(folder: Path, **over):
    d = {"task": "shakespeare", "task_options": dict(TINY_LM), "data_dir": str(folder),
         "workers": 2, "steps": 8, "evals": 2, "compute": {"step_time_s": 0.01},
         "train": {"batch_size": 8}, "eval_samples": 32}
    d.update(over)
    return from_dict(d)


def test_generated_works_titles_including_glued_ones(corpus) -> None:
    folder, titles = corpus
    works = split_works(read_text(folder / "plays.txt.gz"))
    assert [t for t, _ in works] == titles
    assert all(w.startswith(t) for t, w in works)
    assert works[2][1].startswith("THE TRAGEDY OF BETA") and "THE END" in works[2][1][-40:]


@pytest.mark.skipif(not HAVE_REAL, reason="the real plays.txt.gz is not in ../shared/data")
def test_real_file_has_42_works_with_clean_titles() -> None:
    works = split_works(read_text(REAL / "plays.txt.gz"))
    titles = [t for t, _ in works]
    assert len(titles) == len(set(titles)) == 42
    assert titles[1] == "ANTONY AND CLEOPATRA" and titles[16] == "THE TRAGEDY OF KING LEAR"
    assert "LOVE'S LABOUR'S LOST" in titles and "THE LIFE OF KING HENRY V" in titles
    assert all(t == t.upper() and not t.startswith(("THE END", "'")) for t in titles)
    assert sum(len(w) for _, w in works) > 5_000_000


def test_tokenizer_round_trips_and_maps_unknown_to_zero() -> None:
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler?"
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.min() >= 1 and tok.decode(ids) == text and tok.vocab == len(set(text)) + 1
    assert tok.encode("Tz{").tolist() == [tok.encode("T").item(), 0, 0]
    assert tok.decode(tok.encode("éT")) == "\ufffdT"


def test_dataset_windows_targets_and_validation_tail(corpus) -> None:
    folder, titles = corpus
    text = read_text(folder / "plays.txt.gz")
    data, groups, tok, names = make_dataset(text, 16, 16, 0.1)
    assert names == titles and groups.shape[0] == data.x_train.shape[0]
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])  # next character
    first = split_works(text)[0][1]
    assert tok.decode(data.x_train[0]) + tok.decode(data.y_train[0][-1:]) == first[:17]
    assert tok.decode(data.x_train[1][:3]) == first[16:19]  # stride 16
    # validation comes from the held-out tail of every work, never the training part
    tail = "".join(w[len(w) - int(len(w) * 0.1):] for _, w in split_works(text))
    assert all(tok.decode(v) in tail for v in data.x_test[:10])
    assert set(groups.tolist()) == set(range(len(titles)))


def _check_whole_works(parts: list[torch.Tensor], groups: torch.Tensor, works: int) -> None:
    seen: list[set[int]] = [set(groups[p].tolist()) for p in parts]
    for a in range(len(seen)):
        assert seen[a], "a worker got no work"
        for b in range(a + 1, len(seen)):
            assert not seen[a] & seen[b], "a work is shared by two workers"
    assert set().union(*seen) == set(range(works))
    assert torch.equal(torch.cat(parts).sort()[0], torch.arange(groups.numel()))


def test_play_split_gives_disjoint_whole_works_covering_all(corpus) -> None:
    folder, titles = corpus
    spec = _spec(folder)
    for n in (1, 3, len(titles)):
        _check_whole_works(split_indices(spec.groups, n, "play", 5), spec.groups, len(titles))
    sizes = [p.numel() for p in split_indices(spec.groups, 2, "play", 5)]
    assert max(sizes) < 1.5 * min(sizes)  # balanced by size (the short work is tiny)
    with pytest.raises(ConfigError, match="6 works; use at most 6 workers"):
        split_indices(spec.groups, 7, "play", 0)


@pytest.mark.skipif(not HAVE_REAL, reason="the real plays.txt.gz is not in ../shared/data")
def test_play_split_of_the_real_file_covers_all_42_works() -> None:
    data, groups, _, _ = make_dataset(read_text(REAL / "plays.txt.gz"), 128, 128, 0.1)
    for n in (8, 42):
        parts = split_indices(groups, n, "play", 0)
        _check_whole_works(parts, groups, 42)
    sizes = [p.numel() for p in split_indices(groups, 8, "play", 0)]
    assert max(sizes) < 1.15 * min(sizes)  # measured: 4043..4518 windows


def test_dirichlet_uses_works_as_labels(corpus) -> None:
    folder, _ = corpus
    prep = prepare(_cfg(folder, workers=3, split="dirichlet", split_options={"alpha": 0.05}))
    owners = [len(set(prep.spec.groups[p].tolist())) for p in prep.shards]
    assert min(owners) < 6  # skewed by work, not iid


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_transformer_is_causal(positions: str) -> None:
    torch.manual_seed(0)
    model = CharTransformer(11, context=12, d=16, layers=2, heads=2, positions=positions)
    x = torch.randint(0, 11, (3, 12))
    out = model(x)
    assert out.shape == (3, 11, 12)
    for t in (0, 5, 10):
        x2 = x.clone()
        x2[:, t + 1:] = (x2[:, t + 1:] + 1) % 11
        out2 = model(x2)
        torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1])
        assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])


def test_transformer_ties_embedding_and_output() -> None:
    model = CharTransformer(11, context=8, d=16, layers=1, heads=2)
    assert model.head.weight is model.tok.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names  # counted (and averaged) once


def _unigram_bits(y: torch.Tensor) -> float:
    p = torch.bincount(y.reshape(-1).long()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def test_short_run_beats_the_unigram_entropy_and_writes_a_sample(corpus, tmp_path) -> None:
    folder, _ = corpus
    cfg = _cfg(folder, algo="allreduce", steps=120, evals=2, eval_samples=0,
               train={"batch_size": 16, "lr": 1e-2, "warmup_steps": 5})
    out = simulate(prepare(cfg), str(tmp_path))
    final = out.result["final"]
    unigram = _unigram_bits(out.bank.spec.data.y_test)
    assert final["bpc_mean_model"] < 0.75 * unigram, (final["bpc_mean_model"], unigram)
    assert final["bpc_mean_model"] == pytest.approx(final["loss_mean_model"] / math.log(2))
    assert 0.3 < final["accuracy_mean_model"] < 0.9  # next-character accuracy, a fraction
    head = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert head.endswith("bpc_mean_model,bpc_workers")
    sample = (tmp_path / "sample.txt").read_text()
    assert sample.startswith("ROMEO.\n") and len(sample) == len("ROMEO.\n") + 40 + 1
    assert "\ufffd" not in sample


def test_workers_own_bpc_is_the_mean_of_each_workers_model(corpus) -> None:
    from relaxsgd.bank import evaluate
    from relaxsgd.metrics import CommStats, Recorder
    from relaxsgd.training import flat_params

    folder, _ = corpus
    spec = _spec(folder)
    x0, _ = flat_params(spec.model_fn())
    X = torch.stack([x0, x0 + 0.05 * torch.randn_like(x0), x0 - 0.02])
    rec = Recorder(spec, None, 3, x0.numel(), 100, [], eval_samples=16)
    row = rec.record(step=1, samples=1, virtual_time=0.0, wall_time=0.0, X=X,
                     mean_buffers={}, w0_buffers={}, comm=CommStats(), train_loss=0.0,
                     extra={})
    own = [evaluate(spec, spec.model_fn(), X[i], {}, rec.x_test, rec.y_test)[0]
           for i in range(3)]
    assert row["bpc_workers"] == pytest.approx(sum(own) / 3 / math.log(2))
    assert row["bpc_mean_model"] == pytest.approx(row["loss_mean_model"] / math.log(2))
    assert len(set(own)) == 3


def test_data_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="plays.txt.gz.*not found") as err:
        _spec(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "plays.txt.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="cannot be read"):
        _spec(tmp_path)
    (tmp_path / "plays.txt.gz").unlink()
    (tmp_path / "plays.txt").write_bytes(b"TITLE\n\nby William Shakespeare\n\xff\xfe x")
    with pytest.raises(DataError, match="not UTF-8"):
        _spec(tmp_path)
    (tmp_path / "plays.txt").write_text("no marker here\n" * 100)
    with pytest.raises(DataError, match="no 'by William Shakespeare' line"):
        _spec(tmp_path)


def test_option_errors(corpus) -> None:
    folder, _ = corpus
    with pytest.raises(ConfigError, match="d_model=15 must be a multiple of heads=2"):
        _spec(folder, d_model=15)
    with pytest.raises(ConfigError, match="val_frac"):
        _spec(folder, val_frac=1.0)
    with pytest.raises(ConfigError, match="positions='alibi'"):
        _spec(folder, positions="alibi")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from relaxsgd.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_cli_errors_exit_2_with_one_line(corpus, tmp_path: Path, capsys) -> None:
    folder, _ = corpus
    code, err = _cli(capsys, "run", "--task", "shakespeare", "--data-dir", str(tmp_path),
                     "--steps", "1", "--out", str(tmp_path / "o1"))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("relaxsgd: error: Shakespeare file plays.txt.gz")
    code, err = _cli(capsys, "run", "--task", "shakespeare", "--data-dir", str(folder),
                     "--split", "play", "--workers", "9", "--steps", "1", "--set",
                     "task.context=16", "--out", str(tmp_path / "o2"))
    assert code == 2 and err.count("\n") == 1 and "use at most 6 workers" in err, err
    code, err = _cli(capsys, "run", "--task", "logreg", "--split", "play", "--steps", "1",
                     "--out", str(tmp_path / "o3"))
    assert code == 2 and "split 'play' deals whole works" in err, err


def test_defaults_are_adamw_and_about_a_million_parameters(corpus) -> None:
    folder, _ = corpus
    cfg = from_dict({"task": "shakespeare", "data_dir": str(folder), "algo": "diloco",
                     "workers": 2})  # the small corpus has 13 windows a worker for 8
    assert cfg.train.optimizer == "adamw" and cfg.train.schedule == "cosine"
    prep = prepare(cfg)
    assert prep.algo.cfg.nesterov and prep.algo.cfg.outer_lr == 0.7
    model = prep.spec.model_fn()
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 1_000_000
    assert model.context == 128


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_process_dist_run_keeps_own_works_and_matches_the_simulator(corpus,
                                                                       tmp_path) -> None:
    from distkit import run_job

    folder, _ = corpus
    cfg = {"task": "shakespeare", "task_options": dict(TINY_LM), "data_dir": str(folder),
           "algo": "allreduce", "split": "play", "steps": 6, "evals": 2,
           "train": {"batch_size": 8}, "eval_samples": 16}
    r = run_job(cfg, 2, str(tmp_path / "dist"), timeout=150)
    assert r.codes == [0, 0], "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    assert r.result["final"]["bpc_mean_model"] > 0
    assert (tmp_path / "dist" / "sample.txt").is_file()
    sim = simulate(prepare(from_dict({**cfg, "workers": 2,
                                      "compute": {"step_time_s": 0.01}})))
    assert r.models is not None
    torch.testing.assert_close(r.models, sim.bank.X, rtol=1e-4, atol=1e-5)


def test_gzip_bomb_is_refused(tmp_path: Path, monkeypatch) -> None:
    import relaxsgd.tasks.shakespeare as sh

    monkeypatch.setattr(sh, "MAX_BYTES", 1000)
    with gzip.open(tmp_path / "plays.txt.gz", "wt") as f:
        f.write("x" * 5000)
    with pytest.raises(DataError, match="more than"):
        _spec(tmp_path)


def test_compare_on_shakespeare_keeps_the_tasks_adamw(corpus, tmp_path, capsys) -> None:
    import yaml

    folder, _ = corpus
    sets = [x for k, v in TINY_LM.items() for x in ("--set", f"task.{k}={v}")]
    code, err = _cli(capsys, "compare", "--task", "shakespeare", "--data-dir", str(folder),
                     "--algos", "allreduce,diloco", "--workers", "2", "--steps", "4",
                     "--split", "play", "--evals", "1", "-q", "--out", str(tmp_path),
                     "--set", "eval_samples=8", *sets)
    assert code == 0, err
    for algo in ("allreduce", "diloco"):
        cfg = yaml.safe_load((tmp_path / algo / "config.yaml").read_text())
        assert cfg["train"]["optimizer"] == "adamw" and cfg["train"]["momentum"] == 0
        assert (tmp_path / algo / "sample.txt").is_file()
    assert (tmp_path / "summary.txt").is_file()
