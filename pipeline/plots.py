"""The report's figures, drawn with matplotlib's object-oriented API (no pyplot state, no display) and
returned as SVG bytes, so the HTML page stays one self-contained file."""

from __future__ import annotations

import io

import numpy as np

SVG_DPI = 72


def _svg(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", dpi=SVG_DPI)
    return buffer.getvalue()


def metric_distributions(values: dict[str, dict[str, list[float]]]) -> bytes:
    """Box plots of each metric's values per target class, one panel per metric.

    Args:
        values: metric -> target class -> the metric's defined values (undefined ones left out).
    """
    from matplotlib.figure import Figure

    metrics = [metric for metric, by_class in values.items() if any(by_class.values())]
    columns = min(3, max(1, len(metrics)))
    rows = max(1, -(-len(metrics) // columns))
    figure = Figure(figsize=(3.4 * columns, 2.5 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis, metric in zip(axes, metrics, strict=False):
        by_class = {name: data for name, data in sorted(values[metric].items()) if data}
        axis.boxplot(list(by_class.values()), tick_labels=[f"{n}\n(n={len(d)})" for n, d in by_class.items()])
        axis.set_title(metric)
        axis.tick_params(axis="x", labelsize=8)
    for axis in axes[len(metrics) :]:
        axis.set_axis_off()
    figure.suptitle("metric distributions per target class")
    return _svg(figure)


def success_rates(classes: list[str], edits: list[int], rates: dict[str, list[float | None]]) -> bytes:
    """Grouped bars: per source class, each rate (e.g. passed the filter, read as the target class).

    Args:
        classes: source class names (x axis).
        edits: number of edits per source class (shown under the names).
        rates: rate name -> one value in [0, 1] per class (None when undefined, drawn as no bar).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(4.5, 1.0 * len(classes) + 2), 2.8), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(classes))
    width = 0.8 / max(1, len(rates))
    for offset, (name, values) in enumerate(rates.items()):
        heights = [np.nan if value is None else value for value in values]
        axis.bar(positions + (offset - (len(rates) - 1) / 2) * width, heights, width, label=name)
    axis.set_xticks(positions, [f"{name}\n(n={count})" for name, count in zip(classes, edits, strict=True)])
    axis.set_ylim(0, 1)
    axis.set_ylabel("rate of edits")
    axis.set_title("success rate per source class")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside, not over, the bars
    return _svg(figure)
