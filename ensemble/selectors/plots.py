"""Figure of the model correlation matrix with its dendrogram (the paper's Fig. 4b)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy.cluster.hierarchy import dendrogram  # noqa: E402

from ensemble.selectors.blocks import model_linkage  # noqa: E402
from ensemble.selectors.spec import EnsembleSpec  # noqa: E402


def plot_correlation(spec: EnsembleSpec, path: str | Path) -> Path:
    """Draw the dendrogram and the correlation heatmap, models in block order, to a PNG.

    The dendrogram (left) is the average-linkage tree on ``1 - correlation`` with each kind's cut
    drawn beside its models (kinds clustered apart join beyond the axis, at distance > 2); the
    heatmap (right) lists models in the dendrogram's leaf order, so each block is a square on the
    diagonal (outlined). Chosen members are printed in bold.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    corr = spec.correlation
    n = len(corr)
    size = max(5.0, 0.2 * n + 2.0)  # inches of heatmap
    # Columns, in inches: dendrogram, heatmap, room for the heatmap's row labels, colour bar.
    widths = [0.3 * size, size, 1.4, 0.25]
    fig, (ax_tree, ax_heat, ax_gap, ax_bar) = plt.subplots(
        1, 4, figsize=(sum(widths), size + 1.5), gridspec_kw={"width_ratios": widths, "wspace": 0.02}
    )
    ax_gap.axis("off")
    if n > 1:
        tree = dendrogram(
            model_linkage(corr, spec.kind_of()),
            orientation="left",
            labels=list(corr.index),
            color_threshold=0,
            no_labels=True,
            ax=ax_tree,
        )
        leaves = tree["ivl"]  # bottom-to-top; leaf i sits at y = 5 + 10 i
        for cut in spec.block_cuts.values():
            ys = [5 + 10 * leaves.index(m) for m in cut.models]
            ax_tree.vlines(cut.threshold, min(ys) - 4, max(ys) + 4, color="grey", linestyle="--", linewidth=1)
        ax_tree.set_xlim(left=min(ax_tree.get_xlim()[0], 2.1))
        order = leaves[::-1]  # top-to-bottom, as the heatmap's rows
        ax_tree.set_xlabel("1 - correlation")
    else:
        order = list(corr.index)
    ax_tree.set_yticks([])
    ax_tree.spines[["top", "right", "left"]].set_visible(False)

    values = corr.loc[order, order].to_numpy()
    image = ax_heat.imshow(values, cmap="viridis", vmin=min(0.0, values.min()), vmax=1.0, aspect="auto")
    ax_heat.set_xticks(range(n), order, rotation=90, fontsize=7)
    ax_heat.set_yticks(range(n), order, fontsize=7)
    ax_heat.yaxis.tick_right()
    members = set(spec.members.values())
    for label in [*ax_heat.get_xticklabels(), *ax_heat.get_yticklabels()]:
        if label.get_text() in members:
            label.set_fontweight("bold")
    position = {m: i for i, m in enumerate(order)}
    for models in spec.blocks.values():
        rows = [position[m] for m in models]
        start, width = min(rows), len(rows)
        outline = Rectangle((start - 0.5, start - 0.5), width, width, fill=False, edgecolor="red", linewidth=1.5)
        ax_heat.add_patch(outline)
    fig.colorbar(image, cax=ax_bar, label=f"Pearson correlation ({spec.correlation_kind.replace('_', ' ')})")
    ax_heat.set_title(f"{n} models, {len(spec.blocks)} blocks\n{spec.cuts_text()}", fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
