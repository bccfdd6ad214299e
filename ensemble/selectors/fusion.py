"""Aggregating members' predictions and fusing the image stream with the cell stream per class.

Paper ("Multi-stream information fusion"): for classes where the correlation ``r`` between the
image-level and the cell-level predictions exceeds a threshold ``rho_th``, a cell's probability is
the product of the two; for the others (classes the image stream over-labels, such as mitotic
spindle, centrosome and aggresome) it is the cell-level prediction alone.

:func:`apply_spec` is the whole combination a selected ensemble applies to its members'
predictions, on OOF rows and on new images alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ensemble.labels import CLASS_NAMES
from ensemble.oof import CELL_COLUMNS, OOFSet

if TYPE_CHECKING:  # spec.py imports FusionRule from here
    from ensemble.selectors.spec import EnsembleSpec

PAPER_RHO_TH = 0.5
"""Default ``rho_th`` of the paper's rule. The paper does not publish its value; its low-correlation
classes sit well below 0.5 in Fig. 4a and the others above, so 0.5 separates them."""

FUSION_MODES = ("fit", "paper", "off")


@dataclass(frozen=True)
class FusionRule:
    """How one class is predicted, and why.

    Attributes
    ----------
    rule : {"product", "cell"}
        ``product``: image-stream x cell-stream probability; ``cell``: the cell stream alone.
    correlation : float or None
        Pearson correlation between the image and the cell stream for the class (None when there
        is no image stream).
    reason : str
    ap_product, ap_cell : float or None
        AP of each option on the rows with cell-level truth, where they were computed.
    correlation_labelled, correlation_all : float or None
        The two statistics, whichever ``correlation`` is: the paper's, over the cells of the
        images that carry the class (``fusion="paper"`` thresholds it), and over all cells
        (``fusion="fit"`` thresholds it).
    """

    rule: str
    correlation: float | None
    reason: str
    ap_product: float | None = None
    ap_cell: float | None = None
    correlation_labelled: float | None = None
    correlation_all: float | None = None


def aggregate(
    predictions: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]], weights: Mapping[str, float]
) -> np.ndarray:
    """Mean over groups of each group's weighted mean of its members' predictions.

    One group gives the plain weighted mean; the paper's hierarchical aggregation puts DSA and
    cell-level members in two groups, so each kind has half the say however many members it has.
    """
    means = []
    for members in groups.values():
        total = sum(weights[m] for m in members)
        acc = np.zeros_like(predictions[members[0]], dtype=np.float32)
        for m in members:
            acc += np.float32(weights[m] / total) * predictions[m]
        means.append(acc)
    return sum(means[1:], means[0]) / np.float32(len(means))


@dataclass(frozen=True)
class StreamMoments:
    """Per fold and class, the sums over cells that a Pearson correlation of two streams needs.

    Each attribute is (n_folds, n_classes) float64: the cells counted, the sums of ``x``
    (image stream), ``y`` (cell stream), their squares and their product.
    """

    n: np.ndarray
    x: np.ndarray
    y: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray, cell: np.ndarray, fold_rows: Sequence[slice | np.ndarray],
           within: np.ndarray | None = None) -> StreamMoments:
        """Sums of ``image`` and ``cell`` (n_classes, n_cells) over each fold's rows (and, per
        class, only the cells where ``within`` is True)."""
        sums = []
        for rows in fold_rows:
            x, y = image[:, rows].astype(np.float64), cell[:, rows].astype(np.float64)
            if within is None:
                n = np.full(x.shape[0], float(x.shape[1]))
            else:
                w = within[:, rows]
                x, y, n = np.multiply(x, w, out=x), np.multiply(y, w, out=y), w.sum(axis=1, dtype=np.float64)
            sums.append([n, x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)])
        return cls(*(np.array(column) for column in zip(*sums, strict=True)))

    def correlation(self, kept: np.ndarray) -> np.ndarray:
        """Per class, the Pearson correlation over the cells of the ``kept`` folds (bool mask);
        0 where either stream is constant or fewer than two cells count."""
        n, x, y, xx, yy, xy = (a[kept].sum(axis=0) for a in (self.n, self.x, self.y, self.xx, self.yy, self.xy))
        with np.errstate(invalid="ignore", divide="ignore"):
            cov, var_x, var_y = xy - x * y / n, xx - x * x / n, yy - y * y / n
            # A constant stream's variance comes out of the sums as rounding noise, not 0.
            constant = (var_x <= 1e-12 * xx) | (var_y <= 1e-12 * yy)
            return np.where((n >= 2) & ~constant, cov / np.sqrt(var_x * var_y), 0.0)


def stream_correlation(image: np.ndarray, cell: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation per class between image-stream and cell-stream predictions.

    Parameters
    ----------
    image, cell : ndarray, shape (n_classes, n_cells)
    within : ndarray of bool, shape (n_classes, n_cells), optional
        Correlate class ``k`` over the cells where ``within[k]`` only. The paper's statistic
        takes the cells of the images that carry the class (:func:`~ensemble.selectors.scoring.carried_by_image`); over all
        cells, where most are negatives that both streams put near 0, values run far higher.

    Returns
    -------
    ndarray, shape (n_classes,)
        0 for a class where either stream is constant (or fewer than two cells are kept).
    """
    return StreamMoments.of(image, cell, [slice(None)], within).correlation(np.array([True]))


def decide_fusion(
    correlation: np.ndarray | None,
    *,
    mode: str,
    rho_th: float | None = None,
    ap_product: np.ndarray | None = None,
    ap_cell: np.ndarray | None = None,
    override_margin: float = 0.01,
    fold_gain: Mapping[int, np.ndarray] | None = None,
) -> tuple[dict[str, FusionRule], float | None]:
    """Choose ``product`` or ``cell`` for every class.

    Parameters
    ----------
    correlation : ndarray, shape (n_classes,), or None
        :func:`stream_correlation` of the aggregated streams; None without an image stream.
    mode : {"fit", "paper", "off"}
        ``paper``: product where ``correlation > rho_th`` (default :data:`PAPER_RHO_TH`).
        ``fit``: ``rho_th``, unless given, is the threshold maximising the mean over classes of
        the AP of the chosen option (``ap_product`` / ``ap_cell``, measured on cell-level
        truth), ties going to the paper's default or the nearest interval's midpoint; then a
        class switches to the other option where that option's AP is higher by more than
        ``override_margin``.
        ``off``: cell stream everywhere.
    rho_th : float, optional
    ap_product, ap_cell : ndarray, shape (n_classes,), optional
        Required for ``fit``; NaN for a class without positives (then the threshold decides).
    override_margin : float
        AP gain needed to override the threshold for one class; ``inf`` disables overrides.
    fold_gain : mapping of fold to ndarray, shape (n_classes,), optional
        ``ap_product - ap_cell`` in each fold fitted on (NaN where the fold has no positive of the
        class). With it, an override also needs its option ahead in every such fold: a pooled
        gain carried by one fold is noise, and did not hold out of sample on the quick zoo.

    Returns
    -------
    rules : dict of class name to FusionRule
    rho_th : float or None
        The threshold used (None for ``off``).
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}; got {mode!r}")
    if mode == "off":
        return {name: FusionRule("cell", None, "fusion off") for name in CLASS_NAMES}, None
    if correlation is None:
        raise ValueError(f"fusion={mode!r} needs an image stream")
    if mode == "fit":
        if ap_product is None or ap_cell is None:
            raise ValueError("fusion='fit' needs the AP of both options")
        if rho_th is None:
            rho_th = _fit_threshold(correlation, ap_product, ap_cell)
    elif rho_th is None:
        rho_th = PAPER_RHO_TH
    have_aps = ap_product is not None and ap_cell is not None
    rules = {}
    for k, name in enumerate(CLASS_NAMES):
        r = float(correlation[k])
        rule = "product" if r > rho_th else "cell"
        other = "cell" if rule == "product" else "product"
        reason = f"r = {r:.3f} {'>' if rule == 'product' else '<='} rho_th = {rho_th:.3f}"
        aps = dict.fromkeys(("product", "cell"))
        if have_aps:
            aps = {"product": float(ap_product[k]), "cell": float(ap_cell[k])}
        if mode == "fit" and aps[other] - aps[rule] > override_margin:  # False for NaN APs
            gain = f"AP {other} {aps[other]:.3f} > {rule} {aps[rule]:.3f} + {override_margin:g}"
            behind = _folds_behind(fold_gain, k, other)
            if behind:
                reason += f"; no override: {gain}, but not in fold {', '.join(map(str, behind))}"
            else:
                reason += f"; override: {gain}" + (" and in every fold" if fold_gain is not None else "")
                rule = other
        rules[name] = FusionRule(rule, r, reason, ap_product=aps["product"], ap_cell=aps["cell"])
    return rules, float(rho_th)


def fuse(cell: np.ndarray, image: np.ndarray | None, rules: Mapping[str, FusionRule]) -> np.ndarray:
    """Apply per-class rules: product of the streams or the cell stream, shape (n_classes, n_cells)."""
    out = cell.astype(np.float32, copy=True)
    for k, name in enumerate(CLASS_NAMES):
        if rules[name].rule == "product":
            out[k] *= image[k]
    return out


def _folds_behind(fold_gain: Mapping[int, np.ndarray] | None, k: int, option: str) -> list[int]:
    """The folds where ``option`` is not ahead for class ``k`` (a fold without positives is skipped)."""
    sign = 1.0 if option == "product" else -1.0
    return [fold for fold, gain in (fold_gain or {}).items() if sign * gain[k] <= 0]  # False for NaN


def _fit_threshold(correlation: np.ndarray, ap_product: np.ndarray, ap_cell: np.ndarray) -> float:
    """The rho_th maximising the summed AP of the threshold rule (a class without positives counts 0).

    Thresholds between two consecutive class correlations give the same rules, so the summed AP
    is a step function over intervals ``[r_i, r_i+1)``. Of the best intervals, the one nearest the
    paper's default wins, and within it the default itself if it lies inside, else the midpoint.
    """
    gain = np.nan_to_num(ap_product - ap_cell)  # what choosing product adds, per class
    edges = np.r_[-1.0, np.unique(np.clip(correlation, -1.0, 1.0)), 1.0]
    lows, highs = edges[:-1], edges[1:]
    totals = np.array([gain[correlation > t].sum() for t in lows])
    best = np.flatnonzero(np.isclose(totals, totals.max(), rtol=0.0, atol=1e-12))
    inside = best[(lows[best] <= PAPER_RHO_TH) & (PAPER_RHO_TH < highs[best])]
    if inside.size:
        return PAPER_RHO_TH
    mids = (lows[best] + highs[best]) / 2
    return float(mids[np.argmin(np.abs(mids - PAPER_RHO_TH))])


def apply_spec(spec: EnsembleSpec, predictions: OOFSet | Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The ensemble's per-cell probabilities: aggregation of the members, then fusion.

    A pure function of the spec and the members' predictions, used on OOF and on new images alike.

    Parameters
    ----------
    spec : EnsembleSpec
    predictions : OOFSet or mapping of model name to table
        At least the members' ``cell_0..cell_18`` and, for the image models, ``image_0..image_18``
        (``fold`` is not needed); other models are ignored.

    Returns
    -------
    DataFrame
        ``image_id, cell_id`` (and ``fold`` if known) and ``cell_0..cell_18``, one row per cell.
        Visual-integrity weighting, when ``spec.integrity_weighting`` is on, is applied on top
        by the caller.
    """
    members = [m for group in spec.groups.values() for m in group]
    image_models = spec.image_models if uses_image_stream(spec) else []
    if not isinstance(predictions, OOFSet):
        needed = dict.fromkeys([*members, *image_models])
        absent = [m for m in needed if m not in predictions]
        if absent:
            raise ValueError(f"predictions lack the ensemble's models {absent}")
        predictions = OOFSet.from_frames({m: predictions[m] for m in needed}, require_fold=False)
    absent = [m for m in members if m not in predictions.cell]
    if absent:
        raise ValueError(f"predictions lack the ensemble's members {absent}")
    absent = [m for m in image_models if m not in predictions.image]
    if absent:
        raise ValueError(f"predictions of {absent} lack the image stream (image_0..image_18) that fusion needs")
    fused = predict_rows(spec, predictions, slice(0, predictions.n_cells))
    return pd.concat([predictions.index, pd.DataFrame(dict(zip(CELL_COLUMNS, fused, strict=True)))], axis=1)


def predict_rows(spec: EnsembleSpec, oof: OOFSet, rows: slice | np.ndarray, fused: bool = True) -> np.ndarray:
    """Aggregate and (unless ``fused`` is False) fuse the spec's members on ``rows``: (n_classes, n_rows) float32."""
    members = [m for group in spec.groups.values() for m in group]
    cell = aggregate({m: oof.cell[m][:, rows] for m in members}, spec.groups, spec.weights)
    return fuse_rows(spec, oof, rows, cell) if fused else cell


def fuse_rows(spec: EnsembleSpec, oof: OOFSet, rows: slice | np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``cell``, the spec's aggregated cell stream on ``rows``, fused per class with its image
    stream (a new array): for a caller that wants both the fused and the unfused predictions."""
    image = None
    if uses_image_stream(spec):
        image = aggregate(
            {m: oof.image[m][:, rows] for m in spec.image_models},
            {"image": spec.image_models},
            member_weights(spec.weights, spec.image_models),
        )
    return fuse(cell, image, spec.fusion)


def member_weights(weights: Mapping[str, float] | None, members: Sequence[str]) -> dict[str, float]:
    """Each member's weight: as given, or 1."""
    return {m: float((weights or {}).get(m, 1.0)) for m in members}


def uses_image_stream(spec: EnsembleSpec) -> bool:
    return any(rule.rule == "product" for rule in spec.fusion.values())
