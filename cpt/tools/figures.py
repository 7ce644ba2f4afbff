"""What every figure cpt draws shares: a headless pyplot, the token axis in the unit that fits, and saving."""

from __future__ import annotations

import os


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int = 110) -> None:
    """Lay the figure out, write it (its folder made) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def token_axis(max_tokens: float) -> tuple[float, str]:
    """A figure's token axis in the unit that fits the run: ``(divisor, label)``."""
    for div, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if max_tokens >= div:
            return div, f"tokens ({unit})"
    return 1.0, "tokens"
