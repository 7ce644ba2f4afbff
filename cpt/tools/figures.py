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
    """Lay the figure out, write it (its folder made) and free it. A panel whose every value is 0 shows 0 to 1
    (matplotlib would draw -0.04 to 0.04 around it)."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and all(float(y) == 0.0 for y in ys):
            ax.set_ylim(-0.02, 1.0)
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
