"""``vskip demo --plot``: the figure is written from a demo result (no model run needed)."""

import pytest

from vskip_kernels.demo import BASELINES, MODES


def _result():
    rows = [{"mode": "dense", "method": "-", "n": 0, "accuracy": 0.9}]
    scores = {}
    for mode, metric in MODES.items():
        for i, method in enumerate((metric,) + BASELINES):
            scores[f"{mode}/{method}"] = [float((j * (i + 3)) % 7) for j in range(12)]
            rows += [{"mode": mode, "method": method, "n": n, "accuracy": 0.9 - 0.05 * n} for n in (2, 4)]
    return {"rows": rows, "scores": scores, "budgets": [2, 4], "num_layers": 12}


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from vskip_kernels.demo_plot import plot

    out = tmp_path / "demo.png"
    plot(_result(), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_needs_matplotlib(monkeypatch, tmp_path):
    import sys

    from vskip_kernels.demo_plot import check_plotting

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        check_plotting(str(tmp_path / "x.png"))
