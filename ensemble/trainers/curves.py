"""Learning curves of a training job, logged beside its run. Matplotlib through its object API and
the Agg canvas, so no display is needed."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def training_curves(history: list[dict], out_png: str | Path, title: str = "") -> str:
    """Loss and validation mAP per epoch of one training job, as a PNG; returns its path."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.2))
    loss_ax, map_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    for key in ("val_map", "val_map_image", "val_map_product"):
        if history and key in history[0]:
            map_ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    map_ax.set(xlabel="epoch", ylabel="held-out cell mAP")
    map_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return str(out_png)
