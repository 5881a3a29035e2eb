"""``relaxsgd report``: runs read back from their folders; plots titled with the setting."""

from __future__ import annotations

import json

import pytest

from relaxsgd.cli import main
from relaxsgd.report import plot_title, summary_table

QUICK = ["--task", "logreg", "--workers", "2", "--steps", "4", "--evals", "2",
         "--step-time", "0.01", "-q", "--set", "task.n_train=128", "--set", "task.n_test=64"]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("runs")
    main(["run", "--algo", "localsgd", *QUICK, "--out", str(base / "a")])
    main(["compare", "--algos", "allreduce,localsgd", *QUICK, "--network", "cloud",
          "--out", str(base / "cmp")])
    return {"a": str(base / "a"), "cmp": str(base / "cmp"), "base": str(base)}


def test_report_reads_runs_and_compare_folders_back(runs, tmp_path, capsys) -> None:
    md = tmp_path / "report.md"
    code, out, err = cli(capsys, "report", runs["a"], runs["cmp"], "--out",
                         str(tmp_path / "plots"), "--markdown", str(md))
    assert code == 0, err
    rows = out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["localsgd", "allreduce", "localsgd"]
    a = json.loads(open(f"{runs['a']}/result.json").read())
    assert f"{a['final']['accuracy_mean_model']:.4f}" in rows[0]
    assert (tmp_path / "plots" / "accuracy_vs_time.png").is_file()
    text = md.read_text()
    assert "| algorithm | acc mean" in text and "Setting: logreg, 2 workers, network mixed" in text
    assert "![accuracy_vs_time.png](plots/accuracy_vs_time.png)" in text
    assert text.count("| completed |") == 3


def test_report_of_a_stopped_run_and_of_foreign_folders(runs, tmp_path, capsys) -> None:
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    res = json.loads(open(f"{runs['a']}/result.json").read())
    res["status"], res["final"]["loss_mean_model"] = "running", None
    (stopped / "result.json").write_text(json.dumps(res))
    lines = open(f"{runs['a']}/metrics.csv").read().splitlines()
    (stopped / "metrics.csv").write_text("\n".join(lines) + "\n3,0.5,0.1")  # cut by a kill
    code, out, _ = cli(capsys, "report", str(stopped))
    assert code == 0 and out.splitlines()[2].split()[-1] == "running"
    assert " - " in out.splitlines()[2]  # the null loss shows as "-"
    half = tmp_path / "half"
    half.mkdir()
    (half / "result.json").write_text('{"algorithm": "x", "sta')
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "afile").write_text("x")
    for folder, needle in [(half, "is not valid JSON (a half-written or foreign file)"),
                           (empty, "is not a relaxsgd run folder (no result.json"),
                           (tmp_path / "afile", "is not a folder"),
                           (tmp_path / "none", "is not a folder")]:
        code, _, err = cli(capsys, "report", str(folder))
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    (tmp_path / "exists.md").write_text("x")
    code, _, err = cli(capsys, "report", runs["a"], "--markdown", str(tmp_path / "exists.md"))
    assert code == 2 and "exists; give a new file name or add --force" in err


def test_plots_are_titled_with_task_workers_and_network(runs, monkeypatch, tmp_path) -> None:
    res = json.loads(open(f"{runs['a']}/result.json").read())
    assert plot_title(res) == "logreg, 2 workers, network wan"
    titles = []
    import relaxsgd.report as report

    real = report.plot_runs

    def spy(runs_, out, prefix="", title="", **kw):
        titles.append(title)
        return real(runs_, out, prefix, title, **kw)

    monkeypatch.setattr(report, "plot_runs", spy)
    assert main(["run", "--algo", "allreduce", *QUICK, "--out", str(tmp_path / "t")]) == 0
    assert titles == ["logreg, 2 workers, network wan"]


def test_summary_table_shows_missing_figures_as_dashes() -> None:
    table = summary_table([{"algorithm": "x", "status": "interrupted", "final": None}])
    assert table.splitlines()[2].split() == ["x", *["-"] * 10, "interrupted"]
