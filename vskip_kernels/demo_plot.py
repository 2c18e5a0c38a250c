"""``vskip demo --plot``: accuracy vs layers skipped per mode, and the per-layer scores."""

from __future__ import annotations

import os

from .demo import BASELINES, MODES, SCORED


def check_plotting(path: str) -> None:
    """Fail early, with the fix, when the plot cannot be written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"--plot: output folder does not exist: {folder}")


def plot(result: dict, path: str) -> None:
    check_plotting(path)
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    rows = result["rows"]
    dense = rows[0]["accuracy"] * 100
    fig, axes = plt.subplots(1, len(MODES) + 1, figsize=(5 * (len(MODES) + 1), 4))
    for ax, (mode, metric) in zip(axes, MODES.items()):
        for method in (metric,) + BASELINES:
            pts = [(0, dense)] + [
                (r["n"], r["accuracy"] * 100) for r in rows if r["mode"] == mode and r["method"] == method
            ]
            ax.plot(*zip(*pts), marker="o", lw=2.5 if method == metric else 1.2, label=method)
        ax.axhline(dense, color="grey", ls=":", lw=1)
        ax.set(title=f"{mode} layers", xlabel="layers skipped (N)", ylabel="eval accuracy (%)", ylim=(0, 100))
        ax.legend(fontsize=8)
    ax = axes[-1]
    seen = set()
    for key, scores in result["scores"].items():
        mode, method = key.split("/")
        if method not in SCORED or method in seen:
            continue
        seen.add(method)  # cosine appears once per mode; its visual-token variant is enough here
        lo, hi = min(scores), max(scores)
        norm = [(s - lo) / (hi - lo) if hi > lo else 0.0 for s in scores]
        ax.plot(range(len(scores)), norm, marker=".", label=f"{method} ({mode})")
    ax.set(title="per-layer scores (min-max scaled; low = skipped first)", xlabel="decoder layer", ylabel="score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
