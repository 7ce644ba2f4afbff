"""Training throughput of the project's real path against a bare Composer Trainer, in one call.

    python benchmarks/train_throughput.py            # GPU: Pythia-410M shape, seq 2048, bf16
    python benchmarks/train_throughput.py --tiny     # CPU smoke run of the same code (tiny model)

- cpt: ``yamls/pythia-410m/cpt.yaml`` with its paths pointed at a local Pythia-410M-shaped folder (random
  weights) and MDS data written by ``cpt.data.convert`` from generated text; the registered ``cpt_cosine``
  schedule; evaluation off. Runs ``Plan.from_config(...).to_foundry()`` + llm-foundry's ``train()``, as
  ``cpt train`` does.
- bare: ``composer.Trainer`` with ``HuggingFaceModel(GPTNeoXForCausalLM)`` (SDPA), the same batch, random
  tokens, torch AdamW, the same precision.

Each variant runs in its own process, eager and with ``compile_config: {}``. Tokens/s is the speed monitor's
window over the last batches; MFU is tokens/s x FLOPs/token over the bf16 dense peak (989 TFLOP/s for H100
and H200 SXM); peak memory is ``torch.cuda.max_memory_allocated``.
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
    "410m": {"seq": 2048, "micro": 16, "steps": 40, "window": 10, "hidden": 1024, "layers": 24, "heads": 16},
    "tiny": {"seq": 128, "micro": 2, "steps": 8, "window": 3, "hidden": 64, "layers": 2, "heads": 4},
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
    from cpt.model import save_tokenizer

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


def run_cpt(work: Path, shape: dict, compile_: bool, device: str) -> dict:
    from cpt import config
    from cpt.run.plan import Plan

    cfg = config.load(
        str(PAPER),
        [
            f"variables.run_name=bench-{'compiled' if compile_ else 'eager'}",
            f"max_seq_len={shape['seq']}",
            f"global_train_batch_size={shape['micro']}",
            f"device_train_microbatch_size={shape['micro']}",
            f"max_duration={shape['steps']}ba",
            f"callbacks.speed_monitor.window_size={shape['window']}",
            "console_log_interval=1000ba",
        ],
    )
    cfg.cpt.model = str(work / "model")
    cfg.cpt.train = {"synthetic": {"path": str(work / "data" / "train"), "proportion": 1.0}}
    cfg.cpt.eval.datasets = {}
    cfg.cpt.run_dir = str(work / "runs")
    cfg.save_folder = None
    if device == "cpu":
        cfg.precision = "fp32"
        cfg.cpt.num_workers = 0
        del cfg["fsdp_config"]
    if compile_:
        cfg.compile_config = {}
    from llmfoundry.command_utils import train

    train(Plan.from_config(cfg, str(PAPER)).to_foundry())
    rows = [json.loads(line) for line in (work / "runs" / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_sec": [r["throughput/tokens_per_sec"] for r in rows if "throughput/tokens_per_sec" in r][-1]}


def run_bare(work: Path, shape: dict, compile_: bool, device: str) -> dict:
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

    shape = SHAPES[args.shape]
    device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn = run_cpt if args.child == "cpt" else run_bare
    result = fn(Path(args.work), shape, args.compile, device)
    cfg = gpt_neox_config(shape).to_dict()
    result.update(
        variant=f"{args.child} {'compiled' if args.compile else 'eager'}",
        seconds=time.perf_counter() - t0,
        gflop_per_token=flops_per_token(cfg, shape["seq"]) / 1e9,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "gpu" else None,
        device=torch.cuda.get_device_name() if device == "gpu" else "cpu",
        torch=torch.__version__,
    )
    result["mfu"] = result["tokens_per_sec"] * result["gflop_per_token"] * 1e9 / PEAK_BF16 if device == "gpu" else None
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, not the speed")
    ap.add_argument("--no-compile", action="store_true", help="eager runs only")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--child", choices=["cpt", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="410m", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    shape_name = "tiny" if args.tiny else "410m"
    work = Path(tempfile.mkdtemp(prefix="cpt-throughput-"))
    os.environ.setdefault("CPT_CACHE", str(work / "cache"))
    prepare(work, SHAPES[shape_name])
    results = []
    for compile_ in [False] if args.no_compile else [False, True]:
        for variant in ("bare", "cpt"):
            cmd = [sys.executable, __file__, "--child", variant, "--shape", shape_name, "--work", str(work)]
            cmd += ["--compile"] if compile_ else []
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=work)
            except subprocess.TimeoutExpired:
                print(f"{variant} compile={compile_}: timed out after {args.timeout}s", flush=True)
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{variant} compile={compile_} failed:\n{proc.stderr[-4000:]}", flush=True)
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
    shape = SHAPES[shape_name]
    print(
        f"\nshape {shape_name}: seq {shape['seq']}, micro-batch {shape['micro']}, {shape['steps']} steps, "
        f"device {results[0]['device'] if results else '?'}, torch {results[0]['torch'] if results else '?'}"
    )
    print(f"{'variant':<16} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'vs bare (same mode)':>20}")
    bare = {r["variant"].split()[1]: r["tokens_per_sec"] for r in results if r["variant"].startswith("bare")}
    for r in results:
        mode = r["variant"].split()[1]
        ratio = r["tokens_per_sec"] / bare[mode] if mode in bare else float("nan")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['variant']:<16} {r['tokens_per_sec']:>10,.0f} {mfu:>7} {mem:>9} {ratio:>19.2f}x")


if __name__ == "__main__":
    main()
