"""The follow-up paper's zero-shot tasks -> cpt's task files (local or s3://), once, where the hub is reachable.

    python convert/tasks.py --out s3://my-bucket/tasks [--tasks hellaswag,piqa] [--source DIR]

See cpt/eval/standard_tasks.py for the datasets, their fields and the prompts.
"""

import argparse
import sys

from cpt.eval.standard_tasks import TASKS, convert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for <task>.jsonl, local or s3://")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default: {','.join(TASKS)})")
    ap.add_argument("--source", help="offline: DIR/<task>.jsonl holds the dataset's rows as the hub serves them")
    args = ap.parse_args(argv)
    try:
        convert(args.out, [t for t in args.tasks.split(",") if t], args.source)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
