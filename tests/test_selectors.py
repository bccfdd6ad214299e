"""Tests of ensemble selection (ensemble.selectors) on synthetic OOF predictions with known structure."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import adjusted_rand_score, average_precision_score

from ensemble.labels import CLASS_NAMES, NUM_CLASSES
from ensemble.sim.oof import make_synthetic_oof
from ensemble.selectors import (
    EnsembleSpec,
    GreedyParams,
    Objective,
    OOFSet,
    apply_spec,
    average_precision,
    correlation_matrix,
    decide_fusion,
    find_blocks,
    greedy_selection,
    load_oof_dir,
    load_oof_mlflow,
    log_to_mlflow,
    mean_average_precision,
    plot_correlation,
    prediction_moments,
    select_ensemble,
)
from ensemble.oof import CELL_COLUMNS, align_labels
from ensemble.selectors.fusion import aggregate, stream_correlation

FAST_GREEDY = GreedyParams(n_bags=3, max_size=10)
OVER_LABELLED = (11, 12, 15)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_oof(n_images=240, cells_per_image=8, n_folds=4, seed=1)


@pytest.fixture(scope="module")
def spec(synthetic):
    # The synthetic OOF's image stream is built to help cell mAP; the recipe's steps are checked on it.
    return select_ensemble(synthetic.oof, synthetic.labels, aggregation="hierarchical", greedy=FAST_GREEDY,
                           objective="cell")


def _sklearn_map(truth: np.ndarray, score: np.ndarray) -> float:
    """Reference mAP, class-major inputs, classes without positives skipped."""
    return float(np.mean([average_precision_score(t, s) for t, s in zip(truth, score, strict=True) if t.any()]))


def _truth(synthetic) -> np.ndarray:
    return synthetic.labels[[f"label_{k}" for k in range(NUM_CLASSES)]].to_numpy(dtype=bool).T


# --- fast AP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_by_class", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("prevalence", [(0.01, 0.5), (0.6, 0.95)])  # the latter: positives outnumber negatives
def test_fast_average_precision_equals_sklearn(ties, dtype, class_by_class, prevalence, monkeypatch):
    from ensemble.selectors import scoring

    if class_by_class:  # as large predictions are scored
        monkeypatch.setattr(scoring, "ONE_PASS_VALUES", 0)
    rng = np.random.default_rng(0)
    truth = rng.random((6, 5000)) < np.linspace(*prevalence, 6)[:, None]
    score = rng.random((6, 5000)) + 0.5 * truth - 0.7  # negative scores too: keys must keep their order
    if ties:  # coarse scores: many positives and negatives share a value, -0.0 and 0.0 among them
        score = np.round(score, 1)
    score = score.astype(dtype)
    expected = [average_precision_score(t, s) for t, s in zip(truth, score, strict=True)]
    np.testing.assert_allclose(average_precision(truth, score), expected, rtol=0, atol=1e-9)
    ranked = rng.random(truth.shape) < 0.3
    expected = [average_precision_score(t[r], s[r]) for t, s, r in zip(truth, score, ranked, strict=True)]
    np.testing.assert_allclose(average_precision(truth, score, ranked), expected, rtol=0, atol=1e-9)


def test_fast_map_equals_the_project_metric(synthetic):
    from ensemble.metrics import cell_map

    truth, score = _truth(synthetic), synthetic.oof.cell[synthetic.oof.models[0]]
    assert mean_average_precision(truth, score) == pytest.approx(cell_map(truth.T, score.T).map, abs=1e-9)


def test_average_precision_is_nan_without_positives():
    truth = np.zeros((2, 10), dtype=bool)
    truth[0, 3] = True
    ap = average_precision(truth, np.random.default_rng(0).random((2, 10)))
    assert np.isfinite(ap[0]) and np.isnan(ap[1])


# --- correlation and blocks ----------------------------------------------------------------------


def test_streamed_correlation_equals_numpy(synthetic):
    oof = synthetic.oof
    stacked = np.stack([oof.cell[m] for m in oof.models]).astype(np.float64)  # (models, classes, cells)
    corr = correlation_matrix(oof, chunk_rows=100)  # many chunks, some straddling nothing
    np.testing.assert_allclose(corr.to_numpy(), np.corrcoef(stacked.reshape(len(oof.models), -1)), atol=1e-10)
    per_class = correlation_matrix(oof, per_class=True, chunk_rows=100)
    np.testing.assert_allclose(per_class[CLASS_NAMES[3]].to_numpy(), np.corrcoef(stacked[:, 3]), atol=1e-10)
    rows = oof.fold_slices()[2]
    keep = np.r_[0 : rows.start, rows.stop : oof.n_cells]
    without = prediction_moments(oof, chunk_rows=100).correlation(exclude_fold=2)
    expected = np.corrcoef(stacked[:, :, keep].reshape(len(oof.models), -1))
    np.testing.assert_allclose(without.to_numpy(), expected, atol=1e-10)


def test_blocks_recover_the_families(synthetic, spec):
    block_of = {m: b for b, models in spec.blocks.items() for m in models}
    models = synthetic.oof.models
    assert {kind: cut.rule for kind, cut in spec.block_cuts.items()} == {"image_stream": "silhouette",
                                                                          "cell_level": "silhouette"}
    assert adjusted_rand_score([synthetic.family[m] for m in models], [block_of[m] for m in models]) == 1.0
    assert spec.family_agreement() == spec.family_agreement(within_kinds=False) == 1.0
    assert "backbone families within each kind: ARI 1.000 (with family alone: 1.000)" in spec.report()


def _oof(predictions: dict[str, np.ndarray], n_folds: int = 4) -> OOFSet:
    """An OOFSet of class-major predictions, 6 cells per image, folds in contiguous quarters."""
    n = next(iter(predictions.values())).shape[1]
    cells = np.arange(n)
    index = pd.DataFrame({"image_id": [f"i{i // 6:04d}" for i in cells], "cell_id": cells % 6,
                          "fold": cells * n_folds // n})
    return OOFSet(index=index, cell={m: p.astype(np.float32) for m, p in predictions.items()})


def test_within_class_correlation_sees_families_through_the_priors():
    """Two families; in each, one model learnt the class priors and one stayed near p = 0.5.

    Flattened over classes, the shared priors make the two calibrated models look alike; within
    each class, where mAP ranks cells, the families show.
    """
    rng = np.random.default_rng(4)
    n = 2000
    prior = np.linspace(-4.0, 0.0, NUM_CLASSES)[:, None]  # log-odds from rare to common
    family = {f: rng.standard_normal((NUM_CLASSES, n)) for f in "ab"}
    predictions = {
        f"{f}_{calibrated}": 1 / (1 + np.exp(-(scale * prior + 0.5 * family[f] + 0.3 * rng.standard_normal((NUM_CLASSES, n)))))
        for f in "ab" for calibrated, scale in (("prior", 1.0), ("flat", 0.0))
    }
    moments = prediction_moments(_oof(predictions))
    within = moments.correlation(kind="within_class")
    per_class = moments.correlation(per_class=True)
    np.testing.assert_allclose(within.to_numpy(), np.mean([m.to_numpy() for m in per_class.values()], axis=0))
    families = {m: m[0] for m in predictions}
    for kind, recovered in (("within_class", True), ("flat", False)):
        blocks = find_blocks(moments.correlation(kind=kind)).block_of()
        ari = adjusted_rand_score([families[m] for m in predictions], [blocks[m] for m in predictions])
        assert (ari == 1.0) == recovered, (kind, blocks)
    with pytest.raises(ValueError, match="kind"):
        moments.correlation(kind="spearman")


def test_blocks_are_found_within_each_kind():
    """As on the quick zoo: a DSA and a CLA of one family share less than two models of one head.

    Cell-level siblings of a family share a strong component and form blocks; the three DSAs,
    one per family, share only their head and show no structure, so each is its own block.
    """
    rng = np.random.default_rng(6)
    n = 3000

    def noise():
        return rng.standard_normal((NUM_CLASSES, n))

    head, family = {h: noise() for h in ("dsa", "cla")}, {f: noise() for f in "abc"}
    logits = {f"dsa_{f}": head["dsa"] + 0.5 * family[f] + noise() for f in "abc"}
    for f in "abc":
        sibling = 1.5 * noise()
        logits |= {f"cla_{f}{j}": head["cla"] + 0.5 * family[f] + sibling + 0.7 * noise() for j in range(2)}
    corr = prediction_moments(_oof({m: 1 / (1 + np.exp(-x)) for m, x in logits.items()})).correlation()
    blocks = find_blocks(corr, kind_of={m: m.split("_")[0] for m in logits})
    assert sorted(sorted(models) for models in blocks.blocks.values()) == [
        ["cla_a0", "cla_a1"], ["cla_b0", "cla_b1"], ["cla_c0", "cla_c1"], ["dsa_a"], ["dsa_b"], ["dsa_c"]]
    assert blocks.cuts["cla"].rule == "silhouette" and blocks.cuts["cla"].silhouette > 0.5
    assert blocks.cuts["dsa"].rule.startswith("no structure") and blocks.cuts["dsa"].models == ["dsa_a", "dsa_b", "dsa_c"]
    mixed = find_blocks(corr).block_of()
    assert len({mixed[f"dsa_{f}"] for f in "abc"}) == 1  # one kind for all: the DSAs join each other
    with pytest.raises(ValueError, match=r"no kind for models \['dsa_a'\]"):
        find_blocks(corr, kind_of={m: "x" for m in logits if m != "dsa_a"})


def test_a_block_that_lowers_the_ensemble_is_left_out():
    """A block of two models that learnt nothing: one member per block would halve the signal."""
    rng = np.random.default_rng(5)
    n = 1200
    truth = rng.random((NUM_CLASSES, n)) < 0.1
    shared = rng.standard_normal(truth.shape)
    predictions = {
        **{f"good_{j}": 1.5 * truth + rng.standard_normal(truth.shape) for j in range(2)},
        **{f"junk_{j}": shared + 0.3 * rng.standard_normal(truth.shape) for j in range(2)},
    }
    oof = _oof({m: 1 / (1 + np.exp(-p)) for m, p in predictions.items()})
    options = {"fusion": "off", "greedy": False}
    pruned = select_ensemble(oof, truth.T.astype(float), **options)
    kept = select_ensemble(oof, truth.T.astype(float), prune=False, **options)
    junk_block = next(b for b, models in pruned.blocks.items() if "junk_0" in models)
    assert pruned.blocks[junk_block] in (["junk_0", "junk_1"], ["junk_1", "junk_0"])
    assert list(pruned.pruned) == [junk_block] and junk_block not in pruned.members
    assert "lowers the score in every fold" in pruned.pruned[junk_block] and f"{junk_block} left out" in pruned.report()
    assert kept.members[junk_block].startswith("junk") and not kept.pruned
    assert pruned.scores["hcpl"].nested_pooled > kept.scores["hcpl"].nested_pooled
    assert kept.scores["hcpl"].in_sample < kept.scores["best_single"].in_sample <= pruned.scores["hcpl"].in_sample


def test_fixed_threshold_cuts_where_told(spec):
    one_block = find_blocks(spec.correlation, threshold=1.99)
    singletons = find_blocks(spec.correlation, threshold=0.0)
    assert len(one_block.blocks) == 1 and len(singletons.blocks) == len(spec.models)


def test_best_member_of_each_block(synthetic, spec):
    """Members are ranked by the mean over folds of each fold's mAP: a fold's rows come from one network."""
    truth, folds = _truth(synthetic), synthetic.oof.index["fold"].to_numpy()

    def fold_mean(score):
        return np.mean([_sklearn_map(truth[:, folds == f], score[:, folds == f]) for f in np.unique(folds)])

    for block, models in spec.blocks.items():
        reference = {m: fold_mean(synthetic.oof.cell[m]) for m in models}
        assert spec.members[block] == max(reference, key=reference.get)
        assert spec.members[block].endswith("_0")  # the simulator's strongest model of the family
        assert spec.model_map[spec.members[block]] == pytest.approx(reference[spec.members[block]], abs=1e-9)


# --- scores --------------------------------------------------------------------------------------


def test_ensemble_beats_best_single(spec):
    assert spec.scores["hcpl"].in_sample > spec.scores["best_single"].in_sample
    assert spec.scores["hcpl"].nested_pooled > spec.scores["best_single"].nested_pooled
    assert spec.scores["greedy"].nested_pooled > spec.scores["best_single"].nested_pooled


def test_in_sample_and_nested_scores_come_in_the_same_two_forms(spec):
    hcpl = spec.scores["hcpl"]
    assert len(hcpl.nested_folds) == 4
    assert hcpl.nested_mean == pytest.approx(np.mean(list(hcpl.nested_folds.values())))
    # mean_all fits nothing: out of sample it is what it is in sample, in each form
    mean_all = spec.scores["mean_all"]
    assert mean_all.nested_pooled == pytest.approx(mean_all.in_sample)
    assert mean_all.nested_mean == pytest.approx(mean_all.in_sample_mean)
    assert mean_all.in_sample_mean != pytest.approx(mean_all.in_sample, abs=1e-4), "the two forms differ"


def test_the_nested_predictions_are_what_the_nested_scores_score_and_stay_out_of_the_json(spec, synthetic, tmp_path):
    predictions = spec.nested_predictions
    pd.testing.assert_frame_equal(predictions[["image_id", "cell_id", "fold"]], synthetic.oof.index)
    truth = align_labels(synthetic.labels, synthetic.oof).truth
    for fold, rows in synthetic.oof.fold_slices().items():
        score = predictions[CELL_COLUMNS].to_numpy()[rows].T
        assert _sklearn_map(truth[:, rows], score) == pytest.approx(spec.scores["hcpl"].nested_folds[fold])
    assert EnsembleSpec.from_json(spec.to_json(tmp_path / "spec.json")).nested_predictions is None


def _shuffle_fold(synthetic, fold: int, seed: int = 0):
    """The synthetic OOF and labels with one fold's labels, and each model's predictions, permuted among its cells."""
    rng = np.random.default_rng(seed)
    oof = synthetic.oof
    rows = np.flatnonzero(oof.index["fold"].to_numpy() == fold)

    def permuted(values):
        out = values.copy()
        out[:, rows] = values[:, rng.permutation(rows)]
        return out

    shuffled = OOFSet(index=oof.index, cell={m: permuted(v) for m, v in oof.cell.items()},
                      image={m: permuted(v) for m, v in oof.image.items()}, tags=oof.tags)
    labels = synthetic.labels.copy()
    held = np.flatnonzero(labels["fold"].to_numpy() == fold)
    columns = [f"label_{k}" for k in range(NUM_CLASSES)] + ["cell_truth"]
    order = rng.permutation(held)
    for column in columns:
        labels.loc[labels.index[held], column] = labels[column].to_numpy()[order]
    return shuffled, labels


@pytest.mark.parametrize("fusion", ["fit", "paper"])
def test_each_fitted_step_of_a_nested_refit_sees_only_its_training_folds(synthetic, monkeypatch, fusion):
    """Refitted without fold 0, the recipe finds the same correlation, blocks, members, pruning,
    fusion threshold and per-class overrides however fold 0's labels and predictions are
    shuffled; the full fit, which sees fold 0, does change."""
    from ensemble.selectors import select

    fits, fit = {}, select._fit

    def recording_fit(oof, moments, fold_maps, exclude_fold, *args):
        fits[exclude_fold] = fit(oof, moments, fold_maps, exclude_fold, *args)
        return fits[exclude_fold]

    monkeypatch.setattr(select, "_fit", recording_fit)
    runs = []
    for oof, labels in ((synthetic.oof, synthetic.labels), _shuffle_fold(synthetic, 0)):
        select_ensemble(oof, labels, fusion=fusion, prune=True, aggregation="hierarchical", greedy=False)
        runs.append(dict(fits))
    original, shuffled = runs[0][0], runs[1][0]
    pd.testing.assert_frame_equal(original.correlation, shuffled.correlation, check_exact=True)
    assert original.blocks == shuffled.blocks and original.members == shuffled.members
    assert original.pruned == shuffled.pruned and original.model_map == shuffled.model_map
    assert original.rho_th == shuffled.rho_th and original.fusion == shuffled.fusion
    assert runs[0][None].model_map != runs[1][None].model_map


def test_nested_scores_expose_selection_bias():
    """12 equally good, independent models: the in-sample best is partly luck, which nested scoring
    removes. With no block structure every model is its own block, and the ensemble averages them."""
    rng = np.random.default_rng(3)
    n = 600
    truth = rng.random((NUM_CLASSES, n)) < 0.1
    cells = np.arange(n)
    index = pd.DataFrame({"image_id": [f"i{i // 6:03d}" for i in cells], "cell_id": cells % 6, "fold": cells * 4 // n})
    noisy = {f"m{j}": 1 / (1 + np.exp(-(0.8 * truth + rng.standard_normal(truth.shape)))) for j in range(12)}
    oof = OOFSet(index=index, cell={m: p.astype(np.float32) for m, p in noisy.items()})
    spec = select_ensemble(oof, truth.T.astype(float), fusion="off", greedy=False)
    best = spec.scores["best_single"]
    assert best.in_sample > best.nested_pooled + 0.005
    assert len(spec.blocks) == 12 and spec.block_cuts["cell_level"].rule.startswith("no structure")
    assert spec.scores["hcpl"].nested_pooled > spec.scores["best_single"].nested_pooled + 0.05
    assert spec.fusion_check() is None and "classes fused" not in spec.report()  # nothing fused, nothing claimed


def test_apply_spec_reproduces_the_in_sample_score(synthetic, spec):
    frames = {m: synthetic.oof.to_frames()[m].drop(columns="fold") for m in spec.models}
    shuffled = {m: f.sample(frac=1.0, random_state=3) for m, f in frames.items()}  # rows in any order
    predicted = apply_spec(spec, shuffled)
    merged = synthetic.labels.merge(predicted, on=["image_id", "cell_id"])
    truth = merged[[f"label_{k}" for k in range(NUM_CLASSES)]].to_numpy(dtype=bool).T
    score = merged[[f"cell_{k}" for k in range(NUM_CLASSES)]].to_numpy().T
    assert _sklearn_map(truth, score) == pytest.approx(spec.scores["hcpl"].in_sample, abs=1e-9)


def test_hierarchical_aggregation_is_a_mean_of_group_means():
    predictions = {name: np.full((1, 2), value, dtype=np.float32) for name, value in zip("abc", (0.0, 0.2, 1.0))}
    flat = aggregate(predictions, {"all": ["a", "b", "c"]}, dict.fromkeys("abc", 1.0))
    grouped = aggregate(predictions, {"dsa": ["a", "b"], "cell": ["c"]}, {"a": 1.0, "b": 3.0, "c": 1.0})
    np.testing.assert_allclose(flat, 0.4, rtol=1e-6)
    np.testing.assert_allclose(grouped, (0.15 + 1.0) / 2, rtol=1e-6)


# --- fusion --------------------------------------------------------------------------------------


def test_fusion_products_where_the_image_stream_helps(spec):
    for k, name in enumerate(CLASS_NAMES):
        rule = spec.fusion[name]
        assert rule.rule == ("cell" if k in OVER_LABELLED else "product"), (name, rule)
        assert (rule.ap_product > rule.ap_cell) == (rule.rule == "product")
    low = max(spec.fusion[CLASS_NAMES[k]].correlation for k in OVER_LABELLED)
    assert low < spec.rho_th < min(r.correlation for r in spec.fusion.values() if r.rule == "product")
    # and out of sample: fused beats the same members' cell stream on every class fused
    fused, unfused = spec.scores["hcpl"].nested_per_class, spec.scores["hcpl_unfused"].nested_per_class
    product = [name for name, rule in spec.fusion.items() if rule.rule == "product"]
    assert all(fused[name] > unfused[name] for name in product)
    assert spec.fusion_check() == (len(product), 0, len(product))
    assert f"of the {len(product)} classes fused the product beat the cell stream alone on {len(product)}, lost on 0" \
        in spec.report()


def test_paper_and_off_fusion(synthetic):
    paper = select_ensemble(synthetic.oof, synthetic.labels, fusion="paper", rho_th=0.3, nested=False, greedy=False)
    assert paper.rho_th == 0.3
    assert all((r.rule == "product") == (r.correlation > 0.3) for r in paper.fusion.values())
    off = select_ensemble(synthetic.oof, synthetic.labels, fusion="off", nested=False, greedy=False)
    assert {r.rule for r in off.fusion.values()} == {"cell"} and off.image_models == []


def test_fusion_overrides_need_a_margin():
    correlation = np.full(NUM_CLASSES, 0.9)
    ap_product, ap_cell = np.full(NUM_CLASSES, 0.5), np.full(NUM_CLASSES, 0.6)
    ap_product[0] = 0.9  # product wins class 0 by far; cell wins the others by 0.1
    aps = {"ap_product": ap_product, "ap_cell": ap_cell}
    rules, rho = decide_fusion(correlation, mode="fit", rho_th=0.5, override_margin=0.2, **aps)
    assert rho == 0.5 and {r.rule for r in rules.values()} == {"product"}
    rules, _ = decide_fusion(correlation, mode="fit", rho_th=0.5, override_margin=0.05, **aps)
    assert rules[CLASS_NAMES[0]].rule == "product" and rules[CLASS_NAMES[1]].rule == "cell"
    assert "override" in rules[CLASS_NAMES[1]].reason


def test_fusion_overrides_must_hold_in_every_fold():
    correlation = np.full(NUM_CLASSES, 0.9)
    aps = {"ap_product": np.full(NUM_CLASSES, 0.5), "ap_cell": np.full(NUM_CLASSES, 0.6)}
    gain = np.full(NUM_CLASSES, -0.1)
    one_fold_disagrees = gain.copy()
    one_fold_disagrees[1] = 0.02  # class 1: the product is ahead in fold 3 although behind pooled
    no_positives = np.full(NUM_CLASSES, np.nan)
    rules, _ = decide_fusion(correlation, mode="fit", rho_th=0.5, override_margin=0.05, **aps,
                             fold_gain={0: gain, 3: one_fold_disagrees, 4: no_positives})
    assert rules[CLASS_NAMES[0]].rule == "cell" and "every fold" in rules[CLASS_NAMES[0]].reason
    assert rules[CLASS_NAMES[1]].rule == "product"
    assert rules[CLASS_NAMES[1]].reason.endswith("but not in fold 3")


# --- greedy baseline -----------------------------------------------------------------------------


def test_greedy_picks_complementary_models_not_the_bad_one():
    truth = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=bool)
    a = [[0.9, 0.8, 0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.4, 0.4, 0.6, 0.6]]  # right on class 0 only
    b = [[0.4, 0.4, 0.5, 0.5, 0.6, 0.6], [0.1, 0.1, 0.9, 0.8, 0.3, 0.3]]  # right on class 1 only
    bad = [[0.1, 0.1, 0.5, 0.5, 0.9, 0.9], [0.5, 0.5, 0.1, 0.1, 0.9, 0.9]]  # ranks negatives first
    predictions = np.array([a, b, bad], dtype=np.float32)
    result = greedy_selection(predictions, Objective.build("cell", truth, np.arange(truth.shape[1])), ["a", "b", "bad"], GreedyParams(n_init=1, n_bags=1, bag_fraction=1.0))
    assert result.weights == {"a": 0.5, "b": 0.5}
    assert result.history == [[pytest.approx(2 / 3), 1.0]]  # a alone: AP 1 and 2/6 (tied at the bottom)


def test_greedy_matches_a_naive_reference():
    rng = np.random.default_rng(5)
    truth = rng.random((4, 300)) < 0.2
    predictions = (rng.random((5, 4, 300)) + rng.random((5, 1, 1)) * truth).astype(np.float32)
    params = GreedyParams(n_init=2, max_size=8, n_bags=1, bag_fraction=1.0)
    result = greedy_selection(predictions, Objective.build("cell", truth, np.arange(truth.shape[1])), list("abcde"), params)

    single = [_sklearn_map(truth, p) for p in predictions]
    chosen = list(np.argsort(single)[::-1][:2])
    best = _sklearn_map(truth, predictions[chosen].mean(axis=0))
    while len(chosen) < params.max_size:
        gains = [_sklearn_map(truth, predictions[[*chosen, j]].mean(axis=0)) for j in range(5)]
        if max(gains) <= best + 1e-12:
            break
        chosen.append(int(np.argmax(gains)))
        best = max(gains)
    expected = {name: chosen.count(j) for j, name in enumerate("abcde") if j in chosen}
    assert result.bags[0] == expected
    assert result.history[0][-1] == pytest.approx(best, abs=1e-6)


# --- persistence and reporting -------------------------------------------------------------------


def test_json_round_trip(spec, tmp_path):
    path = spec.to_json(tmp_path / "spec.json")
    loaded = EnsembleSpec.from_json(path)
    assert loaded.to_dict() == spec.to_dict()
    assert loaded.fusion == spec.fusion and loaded.members == spec.members
    pd.testing.assert_frame_equal(loaded.correlation, spec.correlation)
    json.loads(path.read_text())  # strict JSON: no NaN literals
    old = spec.to_dict() | {"block_threshold": 0.3, "block_rule": "silhouette"}  # before blocks per kind
    del old["block_cuts"]
    cut = EnsembleSpec.from_dict(old).block_cuts["all"]
    assert (cut.models, cut.threshold, cut.rule) == (spec.models, 0.3, "silhouette")


def test_report_lists_members_blocks_rules_and_scores(spec):
    text = spec.report()
    for needle in [*spec.members.values(), *spec.blocks, CLASS_NAMES[15], "best_single", "greedy", "fold mean: in-sample",
                   "pooled: in-sample"]:
        assert needle in text


def test_load_oof_dir_round_trip(synthetic, tmp_path):
    for name, frame in synthetic.oof.to_frames().items():
        frame.sample(frac=1.0, random_state=0).to_parquet(tmp_path / f"{name}.parquet")
    (tmp_path / "models.json").write_text(json.dumps(synthetic.oof.tags))
    loaded = load_oof_dir(tmp_path)
    assert loaded.models == sorted(synthetic.oof.models) and loaded.tags == synthetic.oof.tags
    pd.testing.assert_frame_equal(loaded.index, synthetic.oof.index)
    for name in synthetic.oof.models:
        np.testing.assert_array_equal(loaded.cell[name], synthetic.oof.cell[name])
    assert set(loaded.image) == set(synthetic.oof.image)
    some = sorted(synthetic.oof.models)[:2]  # a zoo's models, where the folder holds an older zoo's too
    assert load_oof_dir(tmp_path, models=some).models == some
    with pytest.raises(FileNotFoundError, match="no OOF table of \\['gone'\\]"):
        load_oof_dir(tmp_path, models=[*some, "gone"])


# --- input validation ----------------------------------------------------------------------------


@pytest.fixture()
def frames(synthetic):
    return synthetic.oof.to_frames()


def test_misaligned_cells_are_named(frames, synthetic):
    first, second = list(frames)[:2]
    frames[second] = frames[second].iloc[5:]
    message = rf"misaligned: model '{second}' lacks 5 of the 1920 cells of model '{first}'.*image 'img_0000000' cell"
    with pytest.raises(ValueError, match=message):
        OOFSet.from_frames(frames)


def test_missing_fold_is_named(frames):
    name = list(frames)[3]
    frames[name] = frames[name][frames[name]["fold"] != 2]
    with pytest.raises(ValueError, match=rf"model '{name}' has no rows for fold\(s\) \[2\]"):
        OOFSet.from_frames(frames)


def test_nan_is_named(frames):
    name = list(frames)[1]
    frames[name].loc[[3, 7], "cell_4"] = np.nan
    with pytest.raises(ValueError, match=rf"model '{name}' has NaN in cell_4: 2"):
        OOFSet.from_frames(frames)


def test_conflicting_folds_are_caught(frames):
    name = list(frames)[1]
    frames[name].loc[0, "fold"] = (frames[name].loc[0, "fold"] + 1) % 4
    with pytest.raises(ValueError, match=rf"model '{name}' puts 1 cells in a different fold"):
        OOFSet.from_frames(frames)


def test_fusion_needs_an_image_stream(frames, synthetic):
    cla = [m for m in frames if m.startswith("cla")]
    with pytest.raises(ValueError, match=rf"image_models: model '{cla[0]}' has no image stream"):
        select_ensemble(frames, synthetic.labels, image_models=[cla[0]], nested=False, greedy=False)
    cell_only = {m: frames[m] for m in cla}
    with pytest.raises(ValueError, match="fusion='fit' needs a model with an image stream"):
        select_ensemble(cell_only, synthetic.labels, nested=False, greedy=False)
    spec = select_ensemble(cell_only, synthetic.labels, fusion="off", nested=False, greedy=False)
    assert set(spec.members.values()) <= set(cla)


def test_fit_needs_cell_level_truth(synthetic):
    labels = synthetic.labels.assign(cell_truth=False)
    with pytest.raises(ValueError, match="needs rows with cell-level truth"):
        select_ensemble(synthetic.oof, labels, nested=False, greedy=False)


def test_labels_must_cover_every_cell(synthetic):
    with pytest.raises(ValueError, match="labels are not aligned with the OOF: they lack 8 of the 1920 OOF cells"):
        select_ensemble(synthetic.oof, synthetic.labels.iloc[8:], nested=False, greedy=False)
    with pytest.raises(ValueError, match="labels array has shape"):
        select_ensemble(synthetic.oof, np.zeros((10, NUM_CLASSES)), nested=False, greedy=False)


def test_apply_spec_names_missing_predictions(spec, frames):
    with pytest.raises(ValueError, match="predictions lack the ensemble's models"):
        apply_spec(spec, {m: frames[m] for m in list(frames)[:1]})
    image_columns = [f"image_{k}" for k in range(NUM_CLASSES)]
    cell_only = {m: f.drop(columns=image_columns, errors="ignore") for m, f in frames.items()}
    with pytest.raises(ValueError, match=r"lack the image stream \(image_0..image_18\) that fusion needs"):
        apply_spec(spec, cell_only)


# --- MLflow --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One real SQLite tracking store for the module's MLflow tests (creating one takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    yield root
    mlflow.set_tracking_uri(None)


def test_log_to_mlflow_with_sqlite(spec, tracking):
    plot = plot_correlation(spec, tracking / "correlation.png")
    assert plot.stat().st_size > 10_000
    experiment = mlflow.create_experiment("selection", artifact_location=(tracking / "selection").as_uri())
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_to_mlflow(spec, [plot])
    with mlflow.start_run(experiment_id=experiment) as run:
        log_to_mlflow(spec, [plot])
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "ensemble")}
    assert logged == {"ensemble/ensemble_spec.json", "ensemble/correlation.png"}
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="ensemble/ensemble_spec.json", dst_path=str(tracking / "dl")
    )
    assert EnsembleSpec.from_json(local).members == spec.members
    metrics = client.get_run(run.info.run_id).data.metrics
    hcpl = spec.scores["hcpl"]
    assert metrics["map_hcpl_nested_pooled"] == pytest.approx(hcpl.nested_pooled)
    assert metrics["map_hcpl_nested_fold_mean"] == pytest.approx(hcpl.nested_mean)
    assert metrics["map_hcpl_in_sample_pooled"] == pytest.approx(hcpl.in_sample)
    assert metrics["map_hcpl_in_sample_fold_mean"] == pytest.approx(hcpl.in_sample_mean)
    assert metrics["blocks_family_ari"] == metrics["blocks_family_only_ari"] == 1.0


def test_load_oof_mlflow_concatenates_folds(synthetic, tracking):
    experiment = mlflow.create_experiment("zoo", artifact_location=(tracking / "zoo").as_uri())
    frames = synthetic.oof.to_frames()
    names = list(frames)[:3]
    for name in names:
        for fold, part in frames[name].groupby("fold"):
            with mlflow.start_run(experiment_id=experiment):
                mlflow.set_tags({"model": name, "fold": str(fold), **synthetic.oof.tags[name]})
                path = tracking / f"{name}_{fold}.parquet"
                part.to_parquet(path)
                mlflow.log_artifact(str(path), "oof")  # logged under its own name: not the contract's
                mlflow.log_artifact(str(path.rename(tracking / "oof.parquet")), "oof")
    with mlflow.start_run(experiment_id=experiment):  # a sweep trial: no model tag, no OOF
        mlflow.log_metric("loss", 1.0)
    loaded = load_oof_mlflow("zoo")
    assert loaded.models == sorted(names)
    assert loaded.tags[names[0]] == synthetic.oof.tags[names[0]]
    for name in names:
        np.testing.assert_array_equal(loaded.cell[name], synthetic.oof.cell[name])


def test_paper_fusion_correlates_over_the_images_that_carry_the_class(synthetic):
    """fusion="paper" thresholds the paper's statistic: per class, over the cells of the images
    labelled with it; both statistics are kept on every rule."""
    from ensemble.selectors.scoring import carried_by_image

    spec = select_ensemble(synthetic.oof, synthetic.labels, fusion="paper", nested=False, greedy=False)
    truth = _truth(synthetic)
    image_ids = synthetic.oof.index["image_id"].to_numpy()
    within = carried_by_image(truth, image_ids)
    members = spec.image_models
    image = aggregate({m: synthetic.oof.image[m] for m in members}, {"image": members}, dict.fromkeys(members, 1.0))
    cell = aggregate({m: synthetic.oof.cell[m] for m in spec.members.values()}, spec.groups, spec.weights)
    for k, name in enumerate(CLASS_NAMES):
        rule = spec.fusion[name]
        carriers = np.isin(image_ids, np.unique(image_ids[truth[k]]))
        np.testing.assert_array_equal(within[k], carriers)
        if carriers.sum() > 1:
            expected = np.corrcoef(image[k][carriers], cell[k][carriers])[0, 1]
            assert rule.correlation == rule.correlation_labelled == pytest.approx(expected, abs=1e-6)
        assert rule.correlation_all == pytest.approx(np.corrcoef(image[k], cell[k])[0, 1], abs=1e-6)
        assert rule.rule == ("product" if rule.correlation > spec.rho_th else "cell")


def test_stream_correlation_adds_up_over_folds():
    """A refit reads the correlation of the folds it sees from per-fold sums: it equals numpy's
    over those folds' cells, within the cells given per class; a constant stream correlates 0."""
    from ensemble.selectors.fusion import StreamMoments

    rng = np.random.default_rng(0)
    image, cell = rng.random((3, 90)).astype(np.float32), rng.random((3, 90)).astype(np.float32)
    cell[1] += 0.5 * image[1]
    image[2] = 0.25
    within = rng.random((3, 90)) < 0.6
    folds = [slice(0, 30), slice(30, 60), slice(60, 90)]
    moments = StreamMoments.of(image, cell, folds, within)
    seen = np.r_[0:30, 60:90]
    for k in range(2):
        rows = seen[within[k, seen]]
        expected = np.corrcoef(image[k, rows], cell[k, rows])[0, 1]
        assert moments.correlation(np.array([True, False, True]))[k] == pytest.approx(expected, abs=1e-12)
    assert moments.correlation(np.array([True, True, True]))[2] == 0.0
    np.testing.assert_allclose(stream_correlation(image, cell)[:2],
                               [np.corrcoef(image[k], cell[k])[0, 1] for k in range(2)], atol=1e-12)


def test_the_competition_objective_ranks_a_class_only_within_the_images_that_carry_it():
    """A score that orders cells within an image but puts an image without the class above scores
    low in cell mAP and perfectly in the competition's ranking; selection defaults to the latter."""
    truth = np.zeros((1, 8), dtype=bool)
    truth[0, 0] = True                                     # image "a" carries the class in one cell
    image_ids = np.array(["a"] * 4 + ["b"] * 4)
    score = np.array([[0.5, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9]])
    cell, competition = (Objective.build(kind, truth, image_ids) for kind in ("cell", "competition"))
    assert cell.map(score) == pytest.approx(average_precision_score(truth[0], score[0])) == pytest.approx(0.2)
    assert competition.map(score) == pytest.approx(average_precision_score(truth[0, :4], score[0, :4])) == 1.0
    assert competition.on(slice(4, 8)).map(score[:, 4:]) != competition.on(slice(4, 8)).map(score[:, 4:])  # NaN


def test_selection_reports_both_metrics_and_chooses_by_its_objective(synthetic, spec):
    chosen = select_ensemble(synthetic.oof, synthetic.labels, aggregation="hierarchical", greedy=FAST_GREEDY)
    assert chosen.objective == "competition" and set(chosen.metric_scores) == {"competition", "cell"}
    assert chosen.scores == chosen.metric_scores["competition"]
    truth, image_ids = _truth(synthetic), synthetic.oof.index["image_id"].to_numpy()
    folds = synthetic.oof.index["fold"].to_numpy()
    competition = Objective.build("competition", truth, image_ids, folds)
    assert chosen.model_map == pytest.approx({m: competition.map(synthetic.oof.cell[m]) for m in synthetic.oof.models})
    by_fold = [Objective.build("competition", truth[:, folds == f], image_ids[folds == f]).map(
        synthetic.oof.cell[m][:, folds == f]) for f in np.unique(folds) for m in [synthetic.oof.models[0]]]
    assert chosen.model_map[synthetic.oof.models[0]] == pytest.approx(np.mean(by_fold))
    assert competition.pooled().map(synthetic.oof.cell[synthetic.oof.models[0]]) != pytest.approx(np.mean(by_fold))
    assert spec.metric_scores["cell"]["hcpl"].nested_mean == spec.scores["hcpl"].nested_mean
    assert "competition mAP (the objective)" in chosen.report() and "cell mAP" in chosen.report()
    assert EnsembleSpec.from_dict(json.loads(json.dumps(chosen.to_dict()))).metric_scores == chosen.metric_scores


def test_weak_labels_fall_back_to_cell_map(synthetic):
    labels = synthetic.labels.assign(cell_truth=False)
    with pytest.warns(UserWarning, match="selecting on cell mAP"):
        weak = select_ensemble(synthetic.oof, labels, fusion="paper", nested=False, greedy=False)
    assert weak.objective == "cell" and set(weak.metric_scores) == {"cell"}


def test_integrity_weighting_is_decided_without_the_fold_it_scores():
    """Weights that help fold 0 a lot and hurt folds 1 and 2: each fold is weighted as the other
    folds decide, so fold 0 is not, and the nested score is below the better of the two."""
    from ensemble.selectors.weighting import decide_weighting

    one = np.array([1, 0, 0, 0], dtype=bool)
    truth = np.tile(one, 3)[None]
    scores = np.r_[[0.2, 0.9, 0.9, 0.9], [0.9, 0.5, 0.2, 0.2], [0.9, 0.5, 0.2, 0.2]][:, None]
    weights = np.r_[[1, 0.1, 0.1, 0.1], [0.5, 1, 1, 1], [0.5, 1, 1, 1]]
    folds = np.repeat([0, 1, 2], 4)
    objective = Objective.build("competition", truth, folds.astype(str))
    decision = decide_weighting(scores, weights, objective, folds)
    assert decision.fold_decisions == {0: False, 1: True, 2: True} and not decision.weighting
    assert decision.without == pytest.approx((0.25 + 1 + 1) / 3)
    assert decision.with_weights == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert decision.nested == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert decide_weighting(scores, weights, objective, folds, "off").nested == decision.without
    with pytest.raises(ValueError, match="weighting must be one of"):
        decide_weighting(scores, weights, objective, folds, "sometimes")


def test_the_selector_is_a_scikit_learn_estimator(synthetic):
    """Parameters declared once (get_params/set_params/clone), checked in fit; fit returns self with
    spec_ and scores_; predict applies the spec; select_ensemble is the same selection."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    from ensemble.selectors import HCPLSelector

    selector = HCPLSelector(fusion="paper", nested=False, greedy=False)
    assert clone(selector).get_params() == selector.get_params() and selector.get_params()["fusion"] == "paper"
    with pytest.raises(NotFittedError):
        selector.predict(synthetic.oof)
    assert selector.fit(synthetic.oof, synthetic.labels) is selector
    assert selector.scores_ is selector.spec_.scores and selector.objective_ == "competition"
    function = select_ensemble(synthetic.oof, synthetic.labels, fusion="paper", nested=False, greedy=False)
    assert function.members == selector.spec_.members and function.scores == selector.scores_
    pd.testing.assert_frame_equal(selector.predict(synthetic.oof), apply_spec(function, synthetic.oof))
    with pytest.raises(ValueError, match="objective must be one of"):
        selector.set_params(objective="auc").fit(synthetic.oof, synthetic.labels)
