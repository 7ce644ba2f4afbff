"""Peak memory of ``cpt average``: near one model, however many checkpoints are averaged.

    python benchmarks/average.py [--hidden 512] [--layers 8]

Writes K Composer checkpoints (weights and AdamW state, as a run saves them) of a GPT-NeoX with Pythia's
vocabulary, then averages the last 1, 2, 4 and 8 in a fresh process each and prints that process's peak RSS,
next to the size of one model's weights in float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

AVERAGE = """
import json, resource, sys, time
from cpt.tools.average import average
t = time.perf_counter()
average(sys.argv[1], sys.argv[2], last=int(sys.argv[3]), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

BASELINE = """
import json, resource
import torch, transformers, composer.models.huggingface, tqdm  # what cpt average imports
from transformers import GPTNeoXForCausalLM
from cpt.tools import average, export
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_checkpoints(folder: Path, k: int, hidden: int, layers: int) -> int:
    """``k`` checkpoints with different weights; returns the model's parameter count."""
    import torch
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cpt.pythia import save_tokenizer

    cfg = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        intermediate_size=4 * hidden,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    hf = GPTNeoXForCausalLM(cfg)
    tok_dir = folder / "tok"
    save_tokenizer(str(tok_dir))
    from transformers import AutoTokenizer

    model = HuggingFaceModel(hf, tokenizer=AutoTokenizer.from_pretrained(tok_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = Trainer(model=model, optimizers=opt, device="cpu", progress_bar=False, log_to_console=False)
    for p in model.parameters():  # AdamW state of a model that has trained (what a run's checkpoint holds)
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    for i in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        trainer.save_checkpoint(str(folder / f"ep0-ba{(i + 1) * 100}-rank0.pt"))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cpt-average-bench-"))
    folder = tmp / "checkpoints"
    folder.mkdir()
    n = write_checkpoints(folder, 8, args.hidden, args.layers)
    size = sorted(folder.glob("*.pt"))[0].stat().st_size
    print(f"model: {n / 1e6:.1f}M parameters, {n * 4 / 2**20:.0f} MB in float32; one checkpoint {size / 2**20:.0f} MB")
    base = json.loads(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True).stdout)
    print(f"a process that imports what cpt average imports and does nothing: {base['peak_mb']:.0f} MB peak")
    print(f"{'checkpoints':>12} {'seconds':>8} {'peak MB':>8} {'above imports, MB':>18}")
    for k in (1, 2, 4, 8):
        proc = subprocess.run([sys.executable, "-c", AVERAGE, str(folder), str(tmp / f"out-{k}"), str(k)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{k:>12} {r['seconds']:>8.1f} {r['peak_mb']:>8.0f} {r['peak_mb'] - base['peak_mb']:>18.0f}")


if __name__ == "__main__":
    main()
