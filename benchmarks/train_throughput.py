"""Training throughput of the project's real path against a bare Composer Trainer, lever by lever, in one call.

    python benchmarks/train_throughput.py            # GPU: Pythia-410M shape, seq 2048, bf16
    python benchmarks/train_throughput.py --tiny     # CPU smoke run of the same code (tiny model)

- bare: ``composer.Trainer`` with ``HuggingFaceModel(GPTNeoXForCausalLM)`` (SDPA), random tokens, torch AdamW,
  the same batch and precision, compiled: the reference (``--eager`` adds bare and cpt without compile).
- cpt: ``yamls/pythia-410m/cpt.yaml`` with its paths pointed at a local Pythia-410M-shaped folder (random
  weights) and MDS data written by ``cpt.data.convert`` from generated text; ``Plan.from_config(...)
  .to_foundry()`` + llm-foundry's ``train()``, as ``python -m cpt.train`` does; evaluation off.
  - "cpt today": the plain loss (full logits), micro-batch 16, compiled;
  - each lever alone, on top of "cpt today compiled": the fused linear cross-entropy (``cpt.loss.impl``
    ``liger`` and ``chunked``), micro-batch x2 (32), ``torch.compile`` mode ``max-autotune-no-cudagraphs``, 2
    data-loader workers instead of 8. FSDP's settings (``limit_all_gathers``, ``forward_prefetch``,
    ``use_orig_params``) need two or more GPUs: llm-foundry turns FSDP off on one, so they are not measured
    on one;
  - the best combination: every lever that beat "cpt today compiled", together;
  - the best combination with evaluation at the paper's cadence: the measured cost of one evaluation (every
    domain of a two-domain split at ``cpt.eval.tokens_per_domain``) times the evaluations the paper's cadence
    holds over its 131,296 steps, as a share of its training time.

Each variant runs in its own process. Tokens/s is the speed monitor's window over the last batches; MFU is
tokens/s x FLOPs/token over the GPU's bf16 dense peak (``cpt.run.mfu``; 989 TFLOP/s for an H100 or H200
SXM); peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "yamls" / "pythia-410m" / "cpt.yaml"
PEAK_BF16 = 989e12

SHAPES = {
    "410m": {
        "seq": 2048,
        "micro": 16,
        "steps": 40,
        "window": 10,
        "hidden": 1024,
        "layers": 24,
        "heads": 16,
        "eval_every": 10,
        "eval_tokens": 4194304,
    },  # fmt: skip
    "tiny": {
        "seq": 128,
        "micro": 2,
        "steps": 8,
        "window": 3,
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "eval_every": 4,
        "eval_tokens": 1024,
    },  # fmt: skip
}


def gpt_neox_config(shape: dict):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=4 * shape["hidden"],
        max_position_embeddings=shape["seq"],
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def prepare(work: Path, shape: dict) -> None:
    """A Pythia-shaped folder and enough MDS data for the run."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from cpt.data import synthetic
    from cpt.data.convert import convert
    from cpt.pythia import save_tokenizer

    torch.manual_seed(0)
    GPTNeoXForCausalLM(gpt_neox_config(shape)).save_pretrained(work / "model")
    save_tokenizer(str(work / "model"))
    tokens_needed = shape["seq"] * shape["micro"] * (shape["steps"] + 2)
    docs = tokens_needed // 250 + 100
    synthetic.write_jsonl(
        work / "text.jsonl",
        {"Pile-CC": "prose", "Github": "code"},
        docs=docs,
        seed=0,
        domain_key="meta.redpajama_set_name",
        words=(150, 300),
    )
    convert(
        [str(work / "text.jsonl")],
        str(work / "data"),
        "train",
        str(ROOT / "cpt" / "assets" / "tokenizer.json"),
        "meta.redpajama_set_name",
        seq_len=shape["seq"],
        progress=False,
    )
    # a two-domain held-out split with the paper's per-domain evaluation budget in each domain
    synthetic.write_jsonl(
        work / "val.jsonl",
        {"Pile-CC": "prose", "Github": "code"},
        docs=2 * (shape["eval_tokens"] // 250 + 20),
        seed=1,
        domain_key="meta.redpajama_set_name",
        words=(150, 300),
    )
    convert(
        [str(work / "val.jsonl")],
        str(work / "data"),
        "val",
        str(ROOT / "cpt" / "assets" / "tokenizer.json"),
        "meta.redpajama_set_name",
        seq_len=shape["seq"],
        progress=False,
    )


def run_cpt(work: Path, shape: dict, compile_: bool, device: str, overrides: list[str], evals: bool = False) -> dict:
    from cpt import config
    from cpt.run.plan import Plan

    cfg = config.load(
        str(PAPER),
        [
            f"variables.run_name=bench-{abs(hash((compile_, tuple(overrides), evals)))}",
            f"max_seq_len={shape['seq']}",
            f"global_train_batch_size={shape['micro']}",
            f"device_train_microbatch_size={shape['micro']}",
            f"max_duration={shape['steps']}ba",
            f"callbacks.speed_monitor.window_size={shape['window']}",
            "console_log_interval=1000ba",
            "cpt.loss.impl=plain",
        ],
    )
    cfg.cpt.model = str(work / "model")
    cfg.cpt.train = {"synthetic": {"path": str(work / "data" / "train"), "proportion": 1.0}}
    cfg.cpt.eval.datasets = {"heldout": {"path": str(work / "data" / "val")}} if evals else {}
    cfg.cpt.eval.interval = f"{shape['eval_every']}ba"
    cfg.cpt.eval.early = None
    cfg.cpt.eval.tasks = {}  # task files live in the user's bucket; the perplexity evaluation stands for evaluation
    cfg.cpt.eval.first = False
    cfg.cpt.eval.tokens_per_domain = shape["eval_tokens"]
    cfg.cpt.run_dir = str(work / "runs")
    cfg.save_folder = None
    if device == "cpu":
        cfg.precision = "fp32"
        cfg.cpt.num_workers = 0
        del cfg["fsdp_config"]
    if compile_:
        cfg.compile_config = {}
    from llmfoundry.command_utils import train
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))

    t0 = time.perf_counter()
    train(Plan.from_config(cfg, str(PAPER)).to_foundry())
    rows = [json.loads(line) for line in (work / "runs" / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens_per_sec": [r["throughput/tokens_per_sec"] for r in rows if "throughput/tokens_per_sec" in r][-1],
        "wall_s": time.perf_counter() - t0,
        "evaluations": len({r["batch"] for r in rows if any(k.startswith("metrics/eval/") for k in r)}),
    }


def run_bare(work: Path, shape: dict, compile_: bool, device: str, overrides: list[str], evals: bool = False) -> dict:
    import torch
    from composer import Trainer
    from composer.callbacks import SpeedMonitor
    from composer.loggers import InMemoryLogger
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader, Dataset
    from transformers import GPTNeoXForCausalLM

    class RandomTokens(Dataset):
        def __len__(self):
            return shape["micro"] * (shape["steps"] + 2)

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            ids = torch.randint(2, 50277, (shape["seq"],), generator=g)
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM._from_config(gpt_neox_config(shape), attn_implementation="sdpa")
    model = HuggingFaceModel(hf, tokenizer=None, use_logits=True, shift_labels=True)
    mem = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(RandomTokens(), batch_size=shape["micro"], num_workers=2),
        optimizers=torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1),
        max_duration=f"{shape['steps']}ba",
        precision="fp32" if device == "cpu" else "amp_bf16",
        device_train_microbatch_size=shape["micro"],
        callbacks=[SpeedMonitor(window_size=shape["window"])],
        loggers=[mem],
        progress_bar=False,
        log_to_console=False,
        compile_config={} if compile_ else None,
        device=device,
    )
    trainer.fit()
    return {"tokens_per_sec": mem.data["throughput/tokens_per_sec"][-1][1]}


def child(args) -> None:
    import torch

    from cpt.model import flops_per_token
    from cpt.run import mfu

    shape = SHAPES[args.shape]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn = run_cpt if args.child == "cpt" else run_bare
    result = fn(Path(args.work), shape, args.compile, device, json.loads(args.overrides), args.evals)
    cfg = gpt_neox_config(shape).to_dict()
    name = torch.cuda.get_device_name() if device == "gpu" else "cpu"
    peak = (mfu.peak_flops(name, "amp_bf16") or PEAK_BF16) if device == "gpu" else None
    result.update(
        seconds=time.perf_counter() - t0,
        gflop_per_token=flops_per_token(cfg, shape["seq"]) / 1e9,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "gpu" else None,
        device=name,
        torch=torch.__version__,
    )
    result["mfu"] = result["tokens_per_sec"] * result["gflop_per_token"] * 1e9 / peak if peak else None
    print("RESULT " + json.dumps(result), flush=True)


LEVERS = {  # name -> overrides on top of "cpt today compiled"
    "fused CE (liger)": ["cpt.loss.impl=liger"],
    "fused CE (chunked)": ["cpt.loss.impl=chunked"],
    "micro-batch x2": ["__micro__=2"],
    "compile max-autotune-no-cudagraphs": ["compile_config={mode: max-autotune-no-cudagraphs}"],
    "2 loader workers": ["cpt.num_workers=2"],
}


def paper_evaluations() -> int:
    """Evaluations the paper's YAML holds over its run: the cadence of ``cpt.run.plan`` and ``EvalCadence``."""
    from cpt import config
    from cpt.eval.domains import EvalCadence
    from cpt.run.plan import cadence as cadence_args

    checked = config.check(config.load(str(PAPER)), str(PAPER))
    e = checked.section.eval
    cadence = EvalCadence(**cadence_args(checked))
    total = checked.total_batches
    return sum(cadence.due(b) for b in range(1, total + 1)) + int(e.first) + int(not cadence.due(total))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not the speed")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--eager", action="store_true", help="also bare and cpt without torch.compile")
    ap.add_argument("--child", choices=["cpt", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--evals", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="410m", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    shape_name = "tiny" if args.tiny else "410m"
    shape = SHAPES[shape_name]
    work = Path(tempfile.mkdtemp(prefix="cpt-throughput-"))
    os.environ.setdefault("CPT_CACHE", str(work / "cache"))
    prepare(work, shape)
    gpu = not args.tiny

    def run(label: str, kind: str, compile_: bool, overrides: list[str], evals: bool = False) -> dict | None:
        overrides = [o.replace("__micro__=2", f"device_train_microbatch_size={2 * shape['micro']}") for o in overrides]
        if any(o.startswith("device_train_microbatch_size=") for o in overrides):
            overrides.append(f"global_train_batch_size={2 * shape['micro']}")
        cmd = [sys.executable, __file__, "--child", kind, "--shape", shape_name, "--work", str(work)]
        cmd += (
            ["--overrides", json.dumps(overrides)]
            + (["--compile"] if compile_ else [])
            + (["--evals"] if evals else [])
        )
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=work)
        except subprocess.TimeoutExpired:
            print(f"{label}: timed out after {args.timeout}s", flush=True)
            return None
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{label}: failed\n{proc.stderr[-3000:]}", flush=True)
            return None
        result = {"variant": label, **json.loads(lines[-1][len("RESULT ") :])}
        print(json.dumps(result), flush=True)
        return result

    eager = [run("bare eager", "bare", False, []), run("cpt today eager", "cpt", False, [])] if args.eager else []
    results = [run("bare compiled", "bare", True, []), run("cpt today compiled", "cpt", True, []), *eager]
    today = results[1]
    winners = []
    for name, overrides in LEVERS.items():
        if not gpu and "liger" in name:
            continue  # Triton: CUDA only
        r = run(f"+ {name}", "cpt", True, overrides)
        results.append(r)
        if r and today and r["tokens_per_sec"] > today["tokens_per_sec"]:
            if not ("fused CE" in name and any("loss.impl" in o for o in winners)):  # one loss at a time
                winners += overrides
    best = run("best: " + (" + ".join(w for w in winners) or "(none)"), "cpt", True, winners)
    results.append(best)
    with_eval = run("best, evaluating", "cpt", True, winners, evals=True)

    reference = results[0]
    print(
        f"\nshape {shape_name}: seq {shape['seq']}, micro-batch {shape['micro']}, {shape['steps']} steps, "
        f"device {reference['device'] if reference else '?'}, torch {reference['torch'] if reference else '?'}"
    )
    print(f"{'variant':<44} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'vs bare compiled':>17}")
    for r in results:
        if r is None:
            continue
        ratio = r["tokens_per_sec"] / reference["tokens_per_sec"] if reference else float("nan")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['variant'][:44]:<44} {r['tokens_per_sec']:>10,.0f} {mfu:>7} {mem:>9} {ratio:>16.2f}x")
    if best and reference:
        target = best["tokens_per_sec"] >= 200_000 and best["tokens_per_sec"] >= 1.2 * reference["tokens_per_sec"]
        print(f"\ntarget (>= 200k tokens/s and >= 1.2x bare compiled): {'met' if target else 'NOT met'}")
    if best and with_eval and with_eval["evaluations"]:
        per_eval = max(0.0, with_eval["wall_s"] - best["wall_s"]) / with_eval["evaluations"]
        step_s = shape["micro"] * (2 if any("microbatch" in w for w in winners) else 1) * shape["seq"]
        step_s /= best["tokens_per_sec"]
        n, steps = paper_evaluations(), 131_296
        share = n * per_eval / (steps * step_s)
        print(
            f"evaluation: {per_eval:.1f}s each ({with_eval['evaluations']} measured); the paper's cadence holds {n} "
            f"over {steps:,} steps of {step_s:.2f}s: {share:.1%} of the training time (goal <= 5%)"
        )


if __name__ == "__main__":
    main()
