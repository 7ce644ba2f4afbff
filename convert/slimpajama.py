"""Convert slimpajama JSONL (local or s3://, .jsonl/.zst/.gz) into per-domain MDS datasets. See --help."""

import sys

from cpt.data.cli import main

if __name__ == "__main__":
    sys.exit(main("slimpajama"))
