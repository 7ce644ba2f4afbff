"""``cpt``: schedule, convert, verify, train, quickstart, sweep, report, anneal, average, eval, export, predict.

Each subcommand is a few lines over the modules that do the work; ``main`` turns every refusal (a bad config, an
unreachable or untrusted file, a bad argument) into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from cpt import config
from cpt.io.storage import StorageError


def _schedule(args: argparse.Namespace) -> int:
    from cpt.io.storage import local_only
    from cpt.tools.schedule import describe, preview, write_csv, write_png

    for flag in ("csv", "png"):
        if getattr(args, flag):
            local_only(getattr(args, flag), f"--{flag}")
    paths = [args.config, *(args.compare or [])]
    previews = []
    for i, path in enumerate(paths):
        overrides = args.overrides if i == 0 else []
        checked = config.check(config.load(path, overrides), path)
        label = " ".join([os.path.splitext(os.path.basename(path))[0], *overrides])
        previews.append(preview(checked, label))
    for p in previews:
        print(describe(p))
    if args.csv:
        write_csv(previews, args.csv)
        print(f"wrote {args.csv}")
    if args.png:
        write_png(previews, args.png)
        print(f"wrote {args.png}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cpt.data.cli import run

    return run(args, args.corpus)


def _train(args: argparse.Namespace) -> int:
    from cpt.train import main as train_main

    return train_main([args.config, *args.overrides])


def _quickstart(args: argparse.Namespace) -> int:
    from cpt.io.storage import local_only

    if args.branches:
        from cpt.tools.branches import branches_demo

        branches_demo(local_only(args.out or "quickstart-branches", "--out"))
        return 0
    from cpt.tools.quickstart import quickstart

    quickstart(local_only(args.out or "quickstart", "--out"), args.s3)
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        from cpt.tools.evaluate import evaluate, read_tasks
    except ImportError as exc:  # lm-eval is an extra
        print(f"error: cpt eval needs lm-evaluation-harness: pip install -e '.[eval]' ({exc})", file=sys.stderr)
        return 2
    tasks = read_tasks(args.config, args.overrides)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(tasks))
        if unknown:
            raise ValueError(f"--only {unknown[0]!r} is not a task of {args.config} ({', '.join(tasks)})")
        tasks = {k: v for k, v in tasks.items() if k in args.only.split(",")}
    evaluate(args.model, tasks, args.out, args.device, args.batch_size, args.budget, args.overwrite, args.log_samples)
    print(f"wrote {args.out.rstrip('/')}/eval.md and eval.json")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from cpt.io.storage import local_only
    from cpt.tools.sweep import sweep

    for flag in ("out", "png"):
        if getattr(args, flag):
            local_only(getattr(args, flag), f"--{flag}")
    sweep(args.group, args.out, args.gpus, args.dry_run, args.png)
    return 0


def _report(args: argparse.Namespace) -> int:
    from cpt.tools import report

    runs = [report.load(r) for r in args.runs]
    law = None
    if args.law:
        from cpt.tools.predict import overlay

        law = overlay(runs, args.law)
    path = report.report(runs, args.out, args.upstream, args.downstream, args.baseline, args.early, args.overwrite, law)
    print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cpt.tools.export import export

    print(f"wrote {export(args.checkpoint, args.out, args.overwrite)}")
    return 0


def _anneal(args: argparse.Namespace) -> int:
    from cpt.io.storage import local_only
    from cpt.tools.anneal import plan_branch

    branch = plan_branch(args.trunk, args.at, args.length, args.shape, args.to, local_only(args.out, "--out"))
    print(
        f"{branch.name}: leaves the trunk at batch {branch.at} (LR x {branch.m_start:.4g}), decays over "
        f"{branch.length} batches to x {args.to:g}; checkpoints in {branch.save_folder}\nwrote {branch.path}"
    )
    if args.run:
        from cpt.train import main as train_main

        return train_main([branch.path])
    print(branch.command(args.gpus))
    return 0


def _average(args: argparse.Namespace) -> int:
    from cpt.tools.average import average

    batches = average(args.save_folder, args.out, args.last, args.start, args.end, args.ema, overwrite=args.overwrite)
    print(f"averaged batches {batches} of {args.save_folder}\nwrote {args.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cpt.data.verify import verify

    failed = 0
    for split in args.splits:
        checked, bad = verify(split)
        for path in bad:
            print(f"corrupt shard: {path} (its xxh64 hash does not match {split}/index.json)")
        print(f"{split}: {checked} shards checked, {len(bad)} corrupt")
        failed += len(bad)
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    from cpt.tools import predict

    if args.action == "fit":
        doc = predict.fit(args.runs, args.pretrain, args.out)
        head = f"{'domain':<36} {'points':>6} {'R2':>7} {'RMSE':>8} {'max |res|':>9}"
        print(f"{head}  L0, A, alpha, C, B, E, beta (+- 1 s.e.)")
        for key, f in doc["domains"].items():
            shown = ", ".join(f"{v:.3g}+-{f['stderr'][n]:.2g}" for n, v in f["params"].items())
            fit = f"{f['points']:>6} {f['r2']:>7.4f} {f['rmse']:>8.4f} {f['max_abs_residual']:>9.4f}"
            note = "" if f["converged"] else "  (stopped at the iteration limit: not converged)"
            print(f"{key:<36} {fit}  {shown}{note}")
        print(f"wrote {args.out}")
    elif args.action == "curve":
        curves, sds = predict.curve(args.law, args.config, args.overrides, args.out)
        for key, y in sorted(curves.items()):
            print(f"{key:<36} start {y[0]:.4f}  max {y.max():.4f}  end {y[-1]:.4f} +- {sds[key][-1]:.2g} (1 s.e.)")
        print(f"wrote {args.out}.csv and {args.out}.png")
    else:
        rows = predict.sweep(
            args.law, args.config, args.overrides, args.grid, args.weight, args.png, args.upstream, args.downstream
        )
        print(f"{'rank':>4} {'upstream':>17} {'downstream':>17} {'score':>8}  candidate  (+- 1 s.e.)")
        for i, r in enumerate(rows, 1):
            mark = ("  (Pareto front)" if r["pareto"] else "") + ("  (extrapolated)" if r["extrapolated"] else "")
            up = f"{r['upstream']:.4f}+-{r['upstream_sd']:.2g}"
            down = f"{r['downstream']:.4f}+-{r['downstream_sd']:.2g}"
            print(f"{i:>4} {up:>17} {down:>17} {r['score']:>8.4f}  {r['candidate']}{mark}")
        if any(r["extrapolated"] for r in rows):
            print("warning: candidates marked (extrapolated) spend more forward area than any fitted run")
        if args.png:
            print(f"wrote {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt", description="Continual pre-training of Pythia models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedule", help="preview a train config's learning-rate schedule (no GPU needed)")
    p.add_argument("config", help="train YAML, the same file training uses")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    p.add_argument("--csv", help="write the LR curve against tokens as CSV")
    p.add_argument("--png", help="write the LR curve as a PNG plot with phases marked")
    p.add_argument("--compare", nargs="+", metavar="YAML", help="overlay these configs' schedules")
    p.set_defaults(fn=_schedule)

    from cpt.data.cli import add_arguments

    p = sub.add_parser("convert", help="convert Pile or SlimPajama JSONL into per-domain MDS")
    add_arguments(p, None)
    p.set_defaults(fn=_convert)

    p = sub.add_parser("verify", help="check converted splits' shards against their recorded hashes")
    p.add_argument("splits", nargs="+", metavar="SPLIT", help="split folders holding index.json, local or s3://")
    p.set_defaults(fn=_verify)

    p = sub.add_parser("train", help="train one process (use `composer -n N -m cpt.train` for N GPUs)")
    p.add_argument("config", help="train YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(fn=_train)

    p = sub.add_parser("quickstart", help="the whole method offline on a CPU in a few minutes, with a report")
    p.add_argument("--out", help="work folder (default: ./quickstart, or ./quickstart-branches)")
    p.add_argument("--branches", action="store_true", help="the second demo: anneal branches and averaging vs cosine")
    p.add_argument("--s3", help="s3:// prefix for data and checkpoints (set S3_ENDPOINT_URL for a local store)")
    p.set_defaults(fn=_quickstart)

    p = sub.add_parser("sweep", help="list a group of runs (yamls/paper/*.yaml) and write their launch commands")
    p.add_argument("group", help="a sweep group file, e.g. yamls/paper/warmup.yaml")
    p.add_argument("--out", help="where each run's config is written (default: sweeps/<group>/)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per run in the launch commands (default: 8)")
    p.add_argument("--dry-run", action="store_true", help="validate every run and preview its schedule")
    p.add_argument("--png", help="with --dry-run: overlay the runs' LR schedules in one plot")
    p.set_defaults(fn=_sweep)

    p = sub.add_parser("report", help="figures and a summary from runs' metrics.jsonl (local or s3://)")
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl (runs/<name> or an s3:// save folder)")
    p.add_argument("--out", default="report", help="output folder, local or s3:// (default: ./report)")
    p.add_argument("--upstream", help="upstream dataset name (default: pile, or upstream)")
    p.add_argument("--downstream", help="downstream dataset name (default: slimpajama, or downstream)")
    p.add_argument("--law", help="a law from cpt predict fit: each run's predicted curves drawn over its measured ones")
    p.add_argument("--baseline", help="the run without re-warming (its label): check the papers' six directions")
    p.add_argument(
        "--early", type=float, default=0.25, help="'at first': each run's first fraction of batches (default: 0.25)"
    )
    _overwrite(p)
    p.set_defaults(fn=_report)

    p = sub.add_parser("anneal", help="a decay branch off a trunk run's checkpoint: its own run and save folder")
    p.add_argument("trunk", help="the trunk's save folder (local or s3://), as its YAML's save_folder")
    p.add_argument("--at", required=True, help="the trunk's checkpoint: its batch (e.g. 1000) or its name")
    p.add_argument("--length", required=True, help="the decay's length: ba, tok or dur (of the trunk's run)")
    p.add_argument("--shape", default="linear", choices=["linear", "cosine", "1-sqrt", "exp"], help="decay shape")
    p.add_argument("--to", type=float, default=0.0, help="the final LR multiplier alpha_f (default: 0)")
    p.add_argument("--out", default="branches", help="where the branch's YAML is written (default: ./branches)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the printed launch command (default: 8)")
    p.add_argument("--run", action="store_true", help="train the branch now, in this process")
    p.set_defaults(fn=_anneal)

    p = sub.add_parser("average", help="average a save folder's checkpoints into a Hugging Face folder")
    p.add_argument("save_folder", help="a run's save folder, local or s3://")
    p.add_argument("out", help="the Hugging Face folder to write, local or s3://")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--last", type=int, help="the newest K checkpoints")
    group.add_argument("--from", dest="start", type=int, help="the first batch to include")
    p.add_argument("--to", dest="end", type=int, help="the last batch to include (with --from)")
    p.add_argument("--ema", type=float, help="exponential average with this decay, oldest first (default: uniform)")
    _overwrite(p)
    p.set_defaults(fn=_average)

    p = sub.add_parser("eval", help="task accuracy offline with lm-evaluation-harness, on a run's task files")
    p.add_argument("model", help="a Hugging Face folder, a cpt checkpoint or a run's save folder (local or s3://)")
    p.add_argument("config", help="a train YAML (its cpt.eval.tasks) or a YAML with a top-level tasks:")
    p.add_argument("overrides", nargs="*", help="key=value overrides of that YAML (e.g. variables.bucket=s3://b)")
    p.add_argument("--only", help="comma-separated task names (default: all)")
    p.add_argument("--out", default="eval", help="output folder, local or s3:// (default: ./eval)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (default: 8)")
    p.add_argument("--budget", action="store_true", help="each task's first `examples` only, as in the loop")
    p.add_argument("--log-samples", action="store_true", help="per question: log-likelihoods, tokens, both picks")
    _overwrite(p)
    p.set_defaults(fn=_eval)

    p = sub.add_parser("export", help="a Composer checkpoint (local or s3://) -> a Hugging Face GPT-NeoX folder")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the Hugging Face folder to write, local or s3://")
    _overwrite(p)
    p.set_defaults(fn=_export)

    p = sub.add_parser("predict", help="fit the CPT loss law on short runs, then predict any schedule's curves")
    acts = p.add_subparsers(dest="action", required=True)
    q = acts.add_parser("fit", help="fit the law per domain on runs' metrics.jsonl")
    q.add_argument("runs", nargs="+", metavar="RUN", help="run folders (local or s3://) holding metrics.jsonl")
    q.add_argument("--pretrain", help="the base model's pre-training: a run folder or a schedule YAML")
    q.add_argument("--out", required=True, help="where to write the law (JSON, local or s3://)")
    q.set_defaults(fn=_predict)
    q = acts.add_parser("curve", help="a candidate run's predicted curves (CSV and PNG)")
    q.add_argument("law", help="law.json from cpt predict fit")
    q.add_argument("config", help="the candidate's train YAML")
    q.add_argument("overrides", nargs="*", help="key=value overrides, as for training")
    q.add_argument("--out", default="predicted", help="writes OUT.csv and OUT.png (default: predicted)")
    q.set_defaults(fn=_predict)
    q = acts.add_parser("sweep", help="rank a grid of candidates by predicted final losses, with the Pareto front")
    q.add_argument("law", help="law.json from cpt predict fit")
    q.add_argument("config", help="the candidates' train YAML")
    q.add_argument("overrides", nargs="*", help="key=value overrides common to every candidate")
    q.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="the values to try per key")
    q.add_argument("--weight", type=float, default=0.5, help="upstream's weight in the score (default: 0.5)")
    q.add_argument("--png", help="draw the candidates and the Pareto front")
    q.add_argument("--upstream", help="upstream dataset name (default: pile, or upstream)")
    q.add_argument("--downstream", help="downstream dataset name (default: slimpajama, or downstream)")
    q.set_defaults(fn=_predict)
    return parser


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="clear what OUT already holds (default: refuse)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.fn is _train:  # the command line: a CPU run keeps freed memory (cpt.run.cpu)
        from cpt.run.cpu import apply_on_cpu

        apply_on_cpu()
    try:
        return args.fn(args)
    except config.ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (StorageError, ValueError, FileNotFoundError) as exc:  # untrusted input and bad arguments, named
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
