"""``cpt quickstart --branches``: anneal branches and checkpoint averaging against a cosine run, offline on a CPU.

On the quickstart's generated corpora (a tiny GPT-NeoX from scratch on upstream text):

1. one trunk on an infinite schedule (warmup, cooldown to half the max LR, then constant), a checkpoint every
   ``every`` batches;
2. two anneal branches off it (``cpt anneal``), one mid-run and one that ends with the trunk's last batch;
3. the trunk's last checkpoints averaged (``cpt average``);
4. a cosine run (warmup, decay to 0.1x) of the same length, for comparison at equal tokens;
5. every final model evaluated the same way (the whole of both validation sets), ``cpt report`` over the
   trunk, its branches and the cosine run, and ``branches.md`` saying what held, with the numbers.
"""

from __future__ import annotations

import json
import os
import time

from cpt.io import storage
from cpt.pythia import save_tiny_pythia
from cpt.run.checkpoints import checkpoints
from cpt.tools import report
from cpt.tools.anneal import plan_branch
from cpt.tools.average import average
from cpt.tools.export import export
from cpt.tools.quickstart import MAX_LR, SEQ, base_config, make_corpora, train_yamls, write_config

STEPS, EVERY, LENGTH = 120, 20, 20


def evaluate(folder: str, splits: dict[str, str]) -> dict[str, float]:
    """Token-weighted cross-entropy of a Hugging Face folder over every sample of each split's domains."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from cpt.data.manifest import read

    model = GPTNeoXForCausalLM.from_pretrained(folder).eval()
    out = {}
    for name, split in splits.items():
        total, count = 0.0, 0
        for _, stats in sorted(read(split).domains.items()):
            for tokens in _samples(storage.join(split, stats.slug)):
                ids = torch.as_tensor(tokens.astype("int64"))[None]
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, :-1]
                total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        out[name] = total / count
    return out


def _samples(folder: str):
    """Every sample of a local MDS folder, in order."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=folder, shuffle=False, batch_size=1)
    for i in range(ds.num_samples):
        yield ds.get_item(i)["tokens"]


def branches_demo(work: str = "quickstart-branches", steps: int = STEPS, every: int = EVERY, length: int = LENGTH):
    """Run the demo into ``work``; returns the summary numbers (also ``summary.json``)."""
    t0 = time.perf_counter()
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    print("1/5 generating and converting upstream and downstream text", flush=True)
    make_corpora(work, work)
    arch = save_tiny_pythia(os.path.join(work, "tiny-arch"), seq_len=SEQ)
    infinite = {"name": "cpt_infinite", "t_warmup": "0.1dur", "t_cooldown": "0.3dur", "alpha_const": 0.5}
    cosine = {"name": "cpt_cosine", "t_warmup": "0.1dur", "t_max": "1dur", "alpha_f": 0.1}
    runs = {}
    print("2/5 the trunk (infinite schedule) and the cosine run", flush=True)
    for name, sched in (("trunk", infinite), ("cosine", cosine)):
        cfg = base_config(work, work, name, arch, ["upstream"], MAX_LR, sched, steps, True, eval_every=every)
        cfg["cpt"]["eval"].update(early=None)
        cfg["cpt"]["keep_checkpoints"] = 0
        cfg["save_interval"] = f"{every}ba"
        runs[name] = cfg
    train_yamls([write_config(c, work) for c in runs.values()], work, "trunk-and-cosine")
    trunk_folder = runs["trunk"]["save_folder"]
    print("3/5 anneal branches off the trunk", flush=True)
    branches = [
        plan_branch(trunk_folder, str(at), f"{length}ba", "1-sqrt", 0.1, os.path.join(work, "branches"))
        for at in (steps // 2, steps - length)
    ]
    train_yamls([b.path for b in branches], work, "branches")
    print("4/5 averaging the trunk's last three checkpoints", flush=True)
    averaged = os.path.join(work, "averaged")
    batches = average(trunk_folder, averaged, last=3, progress=False, overwrite=True)
    print("5/5 evaluating every final model, writing the report", flush=True)
    splits = {d: os.path.join(work, "data", d, "val") for d in ("upstream", "downstream")}
    finals = {
        "trunk (constant LR)": trunk_folder,
        f"branch at {branches[0].at}": branches[0].save_folder,
        f"branch at {branches[1].at} (ends with the trunk)": branches[1].save_folder,
        "cosine": runs["cosine"]["save_folder"],
    }
    losses = {}
    for label, folder in finals.items():
        newest = checkpoints(folder)[0][1]
        losses[label] = evaluate(
            export(storage.join(folder, newest), os.path.join(work, "hf", newest), overwrite=True), splits
        )
    losses[f"average of batches {batches}"] = evaluate(averaged, splits)
    run_dir = os.path.join(work, "runs")
    report.report(
        [report.load(os.path.join(run_dir, n)) for n in ("trunk", *(b.name for b in branches), "cosine")],
        work,
        "upstream",
        "downstream",
        overwrite=True,
    )
    summary = {"loss": losses, "steps": steps, "branch_length": length, "averaged_batches": batches}
    summary["law"] = law_check(run_dir, branches[1])
    _write(work, summary, branches)
    print(f"done in {time.perf_counter() - t0:.0f}s: {os.path.join(work, 'branches.md')}")
    return summary


def law_check(run_dir: str, branch) -> dict:
    """``cpt predict``'s law fitted on the trunk and the branch that ends with it (from scratch: no pre-training)
    predicts the cosine run, upstream and downstream: its error at the end and its mean absolute error."""
    from cpt.optim import law
    from cpt.tools import predict

    try:
        trunk = predict.read_run(os.path.join(run_dir, "trunk"))
        ending = predict.branch_curves(trunk, os.path.join(run_dir, branch.name), branch.at)
        cosine = predict.read_run(os.path.join(run_dir, "cosine"))
        return predict.predict_held([trunk, ending], cosine, law.Pretrain.of([]), ["upstream/all", "downstream/all"])
    except law.LawError as exc:
        return {"refused": str(exc)}


def _law_lines(found: dict) -> list[str]:
    if "refused" in found:
        return ["", f"The CPT law could not be fitted on the trunk and its last branch: {found['refused']}", ""]
    lines = [
        "",
        "The CPT law (`cpt predict`) fitted on the trunk and the branch that ends with it, predicting the cosine run:",
        "",
        "| domain | error at the end | mean abs. error | the fitted runs' ends differ by | the prediction's s.e. |",
        "|---|---|---|---|---|",
    ]
    for key, v in found.items():
        cells = f"{v['final_error']:+.4f} | {v['mae']:.4f} | {v['spread']:.4f} | {v['sd_end']:.2g}"
        lines.append(f"| {key.split('/')[0]} | {cells} |")
    return lines + [""]


def _write(work: str, summary: dict, branches) -> None:
    losses = summary["loss"]
    trunk, cosine = losses["trunk (constant LR)"], losses["cosine"]
    end_branch = next(v for k, v in losses.items() if k.endswith("(ends with the trunk)"))
    avg = next(v for k, v in losses.items() if k.startswith("average of"))
    gap = end_branch["upstream"] - cosine["upstream"]
    avg_gap = avg["upstream"] - end_branch["upstream"]
    held = {
        "the branch that ends with the trunk matches the cosine's final loss (within 0.02)": abs(gap) <= 0.02,
        "a branch improves on the trunk it leaves (the decay helps)": end_branch["upstream"] < trunk["upstream"],
        "averaging the trunk's last checkpoints improves on the trunk": avg["upstream"] < trunk["upstream"],
    }
    summary["held"] = held
    lines = [
        "# Anneal branches and checkpoint averaging",
        "",
        f"A tiny GPT-NeoX trained {summary['steps']} steps on upstream text with an infinite schedule (the trunk); "
        f"branches decay over {summary['branch_length']} steps (1-sqrt, to 0.1x) from batches "
        f"{', '.join(str(b.at) for b in branches)}; the trunk's checkpoints at {summary['averaged_batches']} are "
        "averaged; a cosine run of the same length for comparison. Every final model is evaluated on the whole of "
        "both validation sets:",
        "",
        "| model | upstream loss | downstream loss |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['upstream']:.4f} | {v['downstream']:.4f} |" for k, v in losses.items()]
    lines += [
        "",
        f"The branch that ends with the trunk minus the cosine: {gap:+.4f} (upstream). The average minus that branch: "
        f"{avg_gap:+.4f}.",
        "",
    ]
    lines += [f"- {'yes' if ok else 'NO'}: {claim}" for claim, ok in held.items()]
    lines += _law_lines(summary["law"])
    lines += ["", "![loss](loss.png)", "", "![learning rate](lr.png)", ""]
    with open(os.path.join(work, "branches.md"), "w") as fh:
        fh.write("\n".join(lines))
    with open(os.path.join(work, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print("\n".join(lines))
