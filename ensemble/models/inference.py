"""Trained networks predicting cells: the one path that OOF tables and serving both take.

Training writes its out-of-fold table with :func:`predict_cells` and the registered ensemble
predicts new images with it, so a model scores cells at serving time exactly as selection saw it
score them. Bags (DSA): an image's cells, in cell id order, are cut into consecutive bags of
``cells_per_image`` (the last one padded), and the image stream of an image is the mean over its
bags. A bag is trained to say whether its image carries a class from the few cells it holds, so
each bag's output is one estimate of the same image-level probability: their mean stays on the
scale training saw whatever the image's cell count, where a max over bags would grow with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ensemble.labels import NUM_CLASSES
from ensemble.models.factory import cell_input

if TYPE_CHECKING:
    from ensemble.zoo import ModelSpec


@torch.no_grad()
def predict_cells(spec: ModelSpec, networks: Sequence[torch.nn.Module], crops: np.ndarray | torch.Tensor,
                  counts: Sequence[int],
                  device: torch.device, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of the cells of consecutive images: the mean over ``networks``.

    Parameters
    ----------
    spec : ModelSpec
        The networks' spec (head, ``cell_size``, ``cells_per_image``).
    networks : sequence of nn.Module
        One network (a training job's) or a member's fold networks, in eval mode on ``device``.
    crops : ndarray or tensor of uint8, shape (n, 4, S, S)
        Cells of consecutive images, each image's cells in cell id order. A tensor in pinned
        memory (a DataLoader's ``pin_memory``) is copied to a GPU asynchronously.
    counts : sequence of int
        Cells per image (summing to n).
    device : torch.device
    batch_size : int
        Cells per forward pass (DSA: ``batch_size // cells_per_image`` bags).

    Returns
    -------
    cell : ndarray (n, 19) float32
    image : ndarray (n, 19) float32 or None
        DSA only: the image stream, the same for every cell of an image: the mean over the
        image's bags and over ``networks``.
    """
    cells = crops if isinstance(crops, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(crops))
    n, k = len(cells), len(networks)
    cell = torch.zeros((n, NUM_CLASSES))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def as_input(x: torch.Tensor) -> torch.Tensor:
        return cell_input(x, spec.cell_size, device)

    if spec.head != "dsa":
        for start in range(0, n, batch_size):
            x = as_input(cells[start:start + batch_size])
            with torch.autocast(**autocast):
                for network in networks:
                    cell[start:start + batch_size] += torch.sigmoid(network(x).float()).cpu()
        return (cell / k).numpy(), None

    size = spec.cells_per_image
    offsets = np.r_[0, np.cumsum(counts)]
    bags = [(i, a, min(a + size, offsets[i + 1]))
            for i in range(len(counts)) for a in range(offsets[i], offsets[i + 1], size)]
    image = torch.zeros((len(counts), NUM_CLASSES))
    n_bags = torch.zeros(len(counts))
    per_step = max(1, batch_size // size)
    for step in range(0, len(bags), per_step):
        chunk = bags[step:step + per_step]
        x = torch.zeros((len(chunk), size, *cells.shape[1:]), dtype=cells.dtype)
        valid = torch.zeros((len(chunk), size), dtype=torch.bool)
        for j, (_, a, b) in enumerate(chunk):
            x[j, : b - a] = cells[a:b]
            valid[j, : b - a] = True
        x, on_device = as_input(x), valid.to(device)
        rows = torch.from_numpy(np.concatenate([np.arange(a, b) for _, a, b in chunk]))
        owners = [i for i, _, _ in chunk]
        with torch.autocast(**autocast):
            for network in networks:
                out = network(x, on_device)
                cell[rows] += torch.sigmoid(out.cell_logits.float()).cpu()[valid]
                image.index_add_(0, torch.tensor(owners), torch.sigmoid(out.image_logits.float()).cpu())
        n_bags.index_add_(0, torch.tensor(owners), torch.full((len(owners),), float(k)))
    image = (image / n_bags[:, None]).numpy()
    return (cell / k).numpy(), np.repeat(image, counts, axis=0)
