"""``cpt report`` on hand-written metric logs: resumed runs draw no point twice; s3 runs read like local ones."""

from __future__ import annotations

import json
import math

from cpt.cli import main
from cpt.io import storage
from cpt.tools import report


def rows(batches, up, down, lr):
    out = []
    for b, u, d, r in zip(batches, up, down, lr):
        out.append({"batch": b, "tokens": b * 100, "lr-AdamW/group0": r})
        out.append(
            {
                "batch": b,
                "tokens": b * 100,
                "metrics/eval/pile/all/LanguageCrossEntropy": u,
                "metrics/eval/pile/pile-cc/LanguageCrossEntropy": u + 0.1,
                "metrics/eval/slimpajama/all/LanguageCrossEntropy": d,
                "metrics/eval/slimpajama/redpajamac4/LanguageCrossEntropy": d - 0.1,
            }
        )
    return out


def write(path, items, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items) + tail)


def test_resumed_run_keeps_the_last_value_per_batch(tmp_path):
    first = rows([0, 4, 8], [2.0, 2.5, 2.4], [3.0, 2.8, 2.6], [0.0, 3e-4, 2e-4])
    # killed after batch 8 and resumed from the checkpoint at 4: batches 4 and 8 are logged again
    again = rows([4, 8, 12], [2.5, 2.45, 2.3], [2.8, 2.55, 2.2], [3e-4, 2e-4, 1e-4])
    write(tmp_path / "runs" / "a" / "metrics.jsonl", first + again, tail='{"batch": 12, "tok')  # partial line
    run = report.load(str(tmp_path / "runs" / "a"))
    assert run.label == "a"
    s = run.series("metrics/eval/pile/all/LanguageCrossEntropy")
    assert [b for b, _, _ in s] == [0, 4, 8, 12] and s[2][2] == 2.45 and s[3][1] == 1200


def test_report_from_local_and_s3(tmp_path, s3_bucket, capsys):
    write(tmp_path / "runs" / "rewarm" / "metrics.jsonl", rows([0, 10], [2.0, 2.6], [3.0, 2.0], [0.0, 3e-4]))
    local = tmp_path / "runs" / "const" / "metrics.jsonl"
    write(local, rows([0, 10], [2.0, 2.1], [3.0, 2.7], [3e-5, 3e-5]))
    storage.upload_file(str(local), f"{s3_bucket}/runs/const/checkpoints/metrics.jsonl")
    out = tmp_path / "report"
    assert (
        main(["report", str(tmp_path / "runs" / "rewarm"), f"{s3_bucket}/runs/const/checkpoints", "--out", str(out)])
        == 0
    )
    text = (out / "summary.md").read_text()
    # start, peak in batches 2..2 (the first quarter of 10: no evaluation there, so the start), end; forgetting,
    # adaptation
    assert "| rewarm | 10 | 2.0000 | 2.0000 | 2.6000 | 3.0000 | 3.0000 | 2.0000 | +0.6000 | +1.0000 |" in text
    assert "| const | 10 | 2.0000 | 2.0000 | 2.1000 | 3.0000 | 3.0000 | 2.7000 | +0.1000 | +0.3000 |" in text
    assert f"| redpajamac4 | {math.exp(1.9):.2f} | {math.exp(2.6):.2f} |" in text
    for png in ("loss.png", "lr.png", "forgetting.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_trunk_and_its_branches_are_drawn_as_one_family(tmp_path):
    write(
        tmp_path / "runs" / "t" / "metrics.jsonl",
        rows([0, 4, 8, 12], [2.0, 2.4, 2.3, 2.2], [3, 2.8, 2.6, 2.5], [0] * 4),
    )
    write(tmp_path / "runs" / "t-anneal8-cosine-4ba" / "metrics.jsonl", rows([10, 12], [2.2, 2.1], [2.4, 2.3], [0, 0]))
    write(tmp_path / "runs" / "t-anneal4-linear-8ba" / "metrics.jsonl", rows([6, 12], [2.3, 2.2], [2.5, 2.4], [0, 0]))
    write(tmp_path / "runs" / "other" / "metrics.jsonl", rows([0, 12], [2.0, 2.5], [3.0, 2.4], [0, 0]))
    names = ("t", "t-anneal8-cosine-4ba", "other", "t-anneal4-linear-8ba")
    runs = [report.load(str(tmp_path / "runs" / n)) for n in names]
    assert report.families(runs) == {"t-anneal8-cosine-4ba": "t", "t-anneal4-linear-8ba": "t"}
    styles = report._family_style(runs)
    first, second = styles["t-anneal8-cosine-4ba"], styles["t-anneal4-linear-8ba"]
    assert first["color"] == second["color"] == styles["t"]["color"] and first["ls"] != "-"
    assert (first["ls"], first["marker"]) != (second["ls"], second["marker"])  # two branches are told apart
    assert styles["other"]["color"] != styles["t"]["color"]
    # the branch's curve starts at the trunk's point where it leaves it (batch 8, named; its own first is at 10)
    key = "metrics/eval/pile/all/LanguageCrossEntropy"
    joined = report._with_trunk(runs[1], key, {r.label: r for r in runs}, report.families(runs))
    assert [(b, v) for b, _, v in joined] == [(8, 2.3), (10, 2.2), (12, 2.1)]
    report.report(runs, str(tmp_path / "out"))
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "- `t-anneal8-cosine-4ba` leaves `t` at batch 8" in text and (tmp_path / "out" / "families.png").is_file()


def test_directions_with_a_baseline_and_task_accuracy(tmp_path, capsys):
    """Three runs by hand: the peak early is looked for in each run's first quarter, the six directions are
    judged against the named baseline, and each task gets a column and a panel."""
    up = {"const": [2.0, 2.05, 2.1, 2.2, 2.2], "lo": [2.0, 2.3, 2.5, 2.4, 2.3], "hi": [2.0, 2.6, 2.9, 2.6, 2.5]}
    down = {"const": [3.0, 2.95, 2.9, 2.5, 2.15], "lo": [3.0, 3.1, 2.8, 2.5, 2.2], "hi": [3.0, 3.3, 2.7, 2.3, 2.1]}
    lr = {"const": 1e-4, "lo": 1e-3, "hi": 2e-3}
    for name in up:
        items = rows([0, 2, 4, 8, 16], up[name], down[name], [lr[name]] * 5)
        items += [{"batch": b, "tokens": b * 100, "metrics/tasks/nw/0-shot/InContextLearningMultipleChoiceAccuracy": a}
                  for b, a in ((0, 0.25), (16, 0.5 if name == "hi" else 0.3))]  # fmt: skip
        write(tmp_path / name / "metrics.jsonl", items)
    out = tmp_path / "out"
    args = ["report", *(str(tmp_path / n) for n in up), "--out", str(out), "--baseline", "const"]
    assert main(args) == 0
    text = (out / "summary.md").read_text()
    # first quarter of 16 batches: batches 0..4 -> hi's upstream peak 2.9 (batch 4), downstream 3.3 (batch 2);
    # const's downstream falls from its start: its peak is the start itself (3.0), never below it
    assert (
        "| hi | 16 | 2.0000 | 2.9000 | 2.5000 | 3.0000 | 3.3000 | 2.1000 | +0.5000 | +0.9000 | 0.250 -> 0.500 |" in text
    )
    assert (
        "| const | 16 | 2.0000 | 2.1000 | 2.2000 | 3.0000 | 3.0000 | 2.1500 | +0.2000 | +0.8500 | 0.250 -> 0.300 |"
        in text
    )
    # C1 against the baseline's own rise: const rises 0.1 upstream, lo 0.5 and hi 0.9 rise beyond it
    assert "- yes: re-warming raises the upstream loss at first, beyond const's own rise" in text
    assert "`hi` every 2 batch(es) to +4" in text and "Warning" not in text  # one cadence: no warning
    # forgetting 0.2 < lo 0.3 < hi 0.5, downstream end hi 2.1 < lo 2.2; but const adapts 0.85 > lo's 0.8
    assert text.count("- yes: ") == 5 and "- NO: no re-warming (const) adapts least" in text
    assert (out / "tasks.png").read_bytes()[:4] == b"\x89PNG"
    assert main([*args[:-1], "nope"]) == 2 and "--baseline 'nope' is not one of the runs" in capsys.readouterr().err


def test_a_panel_of_zeros_shows_zero_to_one(tmp_path):
    from cpt.tools.figures import pyplot, save

    fig, (zeros, other) = pyplot().subplots(1, 2)
    zeros.plot([0, 1, 2], [0.0, 0.0, 0.0])
    other.plot([0, 1], [0.5, 0.6])
    save(fig, str(tmp_path / "f.png"))
    assert zeros.get_ylim() == (-0.02, 1.0) and other.get_ylim()[0] > 0.4


def test_runs_sampled_differently_early_are_flagged(tmp_path):
    write(
        tmp_path / "a" / "metrics.jsonl", rows([0, 1, 2, 3, 4, 16], [2.0, 2.3, 2.5, 2.4, 2.3, 2.2], [3] * 6, [1e-3] * 6)
    )
    write(tmp_path / "b" / "metrics.jsonl", rows([0, 4, 16], [2.0, 2.3, 2.2], [3] * 3, [1e-4] * 3))
    runs = [report.load(str(tmp_path / n)) for n in ("a", "b")]
    assert [report.early_cadence(r, "pile") for r in runs] == [(1, 2, 3, 4), (4,)]
    report.report(runs, str(tmp_path / "out"))
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "**Warning:** the runs were evaluated at different batches" in text
    assert "`a` every 1 batch(es) to +4; `b` every 4 batch(es) to +4" in text
