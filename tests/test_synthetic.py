"""Tests of the HPA image simulator: files, determinism, label statistics, per-cell truth, difficulty."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ensemble.sim.images import (
    CLASS_SHARE,
    COUNT_SHARE,
    DIFFICULTIES,
    sample_image_labels,
    simulate,
    simulate_image,
)
from ensemble.labels import CHANNELS, NEGATIVE, NUM_CLASSES, parse_labels
from ensemble.sim.sheet import contact_sheet

SIZE = 192
SEED = 11


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return root, simulate(root, n_images=6, seed=SEED, size=SIZE)


def test_writes_the_kaggle_layout_and_the_truth(dataset):
    root, result = dataset
    rows = read_csv(root / "train.csv")
    assert list(rows[0]) == ["ID", "Label"]
    assert [r["ID"] for r in rows] == result.image_ids == [f"sim{SEED}-{i:05d}" for i in range(6)]
    for row in rows:
        for name in CHANNELS:
            png = Image.open(root / "train" / f"{row['ID']}_{name}.png")
            assert png.mode == "L" and png.size == (SIZE, SIZE)
        mask = Image.open(root / "truth" / "masks" / f"{row['ID']}.png")
        assert mask.mode == "I;16" and mask.size == (SIZE, SIZE)
    assert not (root / "masks").exists()  # truth only: the images must be segmented

    cells = read_csv(root / "truth" / "cell_labels.csv")
    assert list(cells[0]) == ["ID", "cell_id", "Label", "captured"]
    assert len(cells) == result.n_cells
    for row in rows:
        mask = np.asarray(Image.open(root / "truth" / "masks" / f"{row['ID']}.png"))
        nuclei = np.asarray(Image.open(root / "truth" / "nuclei" / f"{row['ID']}.png"))
        left_out = np.asarray(Image.open(root / "truth" / "left_out" / f"{row['ID']}.png"))
        ids = sorted(int(c["cell_id"]) for c in cells if c["ID"] == row["ID"])
        assert ids == sorted(np.unique(mask[mask > 0]).tolist())
        assert not (mask.astype(bool) & left_out.astype(bool)).any()
        # Annotated and left-out cells together are every cell drawn, numbered 1..n.
        drawn = set(ids) | set(np.unique(left_out[left_out > 0]).tolist())
        assert drawn == set(range(1, len(drawn) + 1))
        assert np.all(mask[nuclei > 0] == nuclei[nuclei > 0])  # a nucleus lies in its own cell

    settings = json.loads((root / "simulation.json").read_text())
    assert {k: settings[k] for k in ("seed", "n_images", "size", "difficulty")} == {
        "seed": SEED, "n_images": 6, "size": SIZE, "difficulty": "medium"}
    assert "simulator_version" in settings


def test_16_bit_images_hold_the_same_picture(tmp_path):
    simulate(tmp_path / "a", n_images=1, seed=3, size=128, bit_depth=8)
    simulate(tmp_path / "b", n_images=1, seed=3, size=128, bit_depth=16)
    low = Image.open(tmp_path / "a" / "train" / "sim3-00000_green.png")
    high = Image.open(tmp_path / "b" / "train" / "sim3-00000_green.png")
    assert low.mode == "L" and high.mode == "I;16"
    low, high = np.asarray(low) / 255.0, np.asarray(high) / 65535.0
    assert np.asarray(Image.open(tmp_path / "b" / "train" / "sim3-00000_green.png")).max() > 255
    assert np.abs(low - high).max() <= 0.5 / 255 + 1e-6


def test_kaggle_mode_writes_only_what_the_competition_gives(tmp_path, capsys):
    """16-bit channel PNGs and train.csv, nothing else: the same images as with truth, without it."""
    from ensemble.cli.main import main

    assert main(["simulate", str(tmp_path / "kaggle"), "--kaggle", "--images", "2", "--seed", "3",
                 "--image-px", "128"]) == 0
    assert "no truth/" in capsys.readouterr().out
    simulate(tmp_path / "full", n_images=2, seed=3, size=128, bit_depth=16)
    files = sorted(str(p.relative_to(tmp_path / "kaggle")) for p in (tmp_path / "kaggle").rglob("*") if p.is_file())
    assert files == ["train.csv", *sorted(f"train/sim3-0000{i}_{name}.png" for i in range(2) for name in CHANNELS)]
    for rel in files:
        assert (tmp_path / "kaggle" / rel).read_bytes() == (tmp_path / "full" / rel).read_bytes(), rel
    assert Image.open(tmp_path / "kaggle" / files[-1]).mode == "I;16"


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        simulate(tmp_path / name, n_images=2, seed=seed, size=128, id_prefix="x-")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 4 + 2 * 3 + 3  # channels; truth masks, nuclei, left out; CSVs and settings
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for name in CHANNELS:
        rel = Path("train") / f"x-00001_{name}.png"
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_label_sampler_matches_the_hpa_training_statistics():
    labels = [sample_image_labels(np.random.default_rng([2024, i])) for i in range(5000)]
    hits = np.zeros(NUM_CLASSES)
    for image in labels:
        hits[image] += 1
        assert NEGATIVE not in image or image == [NEGATIVE]
    np.testing.assert_allclose(hits / len(labels), CLASS_SHARE, atol=0.02)
    counts = Counter(len(image) for image in labels)
    share = np.array([counts[k] for k in range(1, 6)]) / len(labels)
    np.testing.assert_allclose(share, COUNT_SHARE / COUNT_SHARE.sum(), atol=0.02)


def test_rare_oversample_boosts_rare_classes_only():
    def share(factor):
        hits = np.zeros(NUM_CLASSES)
        for i in range(3000):
            hits[sample_image_labels(np.random.default_rng([7, i]), rare_oversample=factor)] += 1
        return hits / 3000

    base, boosted = share(1.0), share(5.0)
    assert boosted[11] > 3 * base[11] and boosted[15] > 3 * base[15]
    assert boosted[0] < base[0]  # the common classes give way


def test_image_label_is_the_union_of_cell_labels(dataset):
    root, _ = dataset
    cells = read_csv(root / "truth" / "cell_labels.csv")
    for index, row in enumerate(read_csv(root / "train.csv")):
        image = parse_labels(row["Label"])
        assert image == sample_image_labels(np.random.default_rng([SEED, index]))
        union = set().union(*(parse_labels(c["Label"]) for c in cells if c["ID"] == row["ID"]))
        assert union - {NEGATIVE} == set(image) - {NEGATIVE}
        if image == [NEGATIVE]:
            assert union == {NEGATIVE}


def test_weak_labels_differ_between_cells():
    spindle_share, aggresome_share = [], []
    for seed in range(8):
        sim = simulate_image([seed, 0], 256, labels=[11, 15, 16])
        carriers = {c: [i for i, labels in sim.cell_labels.items() if c in labels] for c in (11, 15, 16)}
        for c, ids in carriers.items():
            assert any(sim.captured[i] >= 0.5 for i in ids), c  # each class in a well-captured cell
        assert all(sim.cell_labels[i] == [11] and sim.captured[i] == 1.0 for i in carriers[11])
        n = len(sim.cell_labels)
        spindle_share.append(len(carriers[11]) / n)
        aggresome_share.append(len(carriers[15]) / n)
    assert np.mean(spindle_share) < 0.15
    assert 0.3 <= np.mean(aggresome_share) <= 0.6


def test_negative_images_have_only_negative_cells():
    sim = simulate_image([1, 2], 128, labels=[NEGATIVE])
    assert sim.image_labels == [NEGATIVE]
    assert all(labels == [NEGATIVE] for labels in sim.cell_labels.values())
    with pytest.raises(ValueError):
        simulate_image([1, 2], 128, labels=[NEGATIVE, 0])


def test_border_cuts_some_cells_and_the_truth_leaves_out_those_less_than_half_inside(dataset, tmp_path):
    root, result = dataset
    captured = np.array([float(c["captured"]) for c in read_csv(root / "truth" / "cell_labels.csv")])
    assert np.all((captured >= 0.5) & (captured <= 1))
    assert np.mean(captured < 1) > 0.05 and np.mean(captured == 1) > 0.3
    left_out = sum(len(np.unique(np.asarray(Image.open(p)))) - 1 for p in (root / "truth" / "left_out").glob("*.png"))
    assert left_out > 0
    everything = simulate(tmp_path, n_images=6, seed=SEED, size=SIZE, min_captured=0.0)
    assert everything.n_cells == result.n_cells + left_out
    captured_all = np.array([float(c["captured"]) for c in read_csv(tmp_path / "truth" / "cell_labels.csv")])
    assert np.sum(captured_all < 0.5) == left_out


def test_the_annotated_truth_keeps_ids_and_labels_of_the_cells_mostly_inside():
    sim = simulate_image([5, 1], 256, labels=[0, 16])
    mask, labels = sim.annotated(0.5)
    kept = {i for i, c in sim.captured.items() if c >= 0.5}
    assert set(labels) == kept and kept != set(sim.captured)
    assert all(labels[i] == sim.cell_labels[i] for i in kept)
    assert set(np.unique(mask[mask > 0]).tolist()) == kept
    np.testing.assert_array_equal(mask[mask > 0], sim.cell_mask[mask > 0])


def test_layout_scales_with_the_image_size():
    def cells(size):
        sim = simulate_image([4, 0], size, labels=[0])
        areas = np.bincount(sim.cell_mask.ravel())[1:]
        whole = [areas[i - 1] for i, c in sim.captured.items() if c == 1.0]
        return len(areas), np.median(2 * np.sqrt(np.array(whole) / np.pi))

    n_small, diameter_small = cells(256)
    n_large, diameter_large = cells(1024)
    assert 6 <= n_small <= 30 and abs(n_small - n_large) <= 2
    assert 35 <= diameter_small <= 75  # 80-140 px at 512
    assert 3.6 <= diameter_large / diameter_small <= 4.4


def green_snr(sim) -> float:
    """Nucleoplasm signal above background, in background noise standard deviations."""
    green = sim.image[..., 1]
    carriers = [i for i, labels in sim.cell_labels.items() if 0 in labels]
    signal = np.isin(sim.nucleus_mask, carriers)
    background = ndimage.binary_erosion(sim.cell_mask == 0, iterations=4)
    return (green[signal].mean() - green[background].mean()) / green[background].std()


def test_difficulty_lowers_the_green_signal_to_noise():
    snr = {d: np.median([green_snr(simulate_image([s, 0], 256, d, labels=[0])) for s in range(3)])
           for d in DIFFICULTIES}
    assert snr["easy"] > snr["medium"] > snr["hard"]
    assert snr["easy"] > 3 * snr["hard"]


def test_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError):
        simulate(tmp_path, n_images=1, bit_depth=12)
    with pytest.raises(ValueError):
        simulate(tmp_path, n_images=1, difficulty="extreme")


def test_contact_sheet_draws_a_png(dataset, tmp_path):
    root, _ = dataset
    out = contact_sheet(root, tmp_path / "sheet.png", n_images=2)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[0] > 400 and sheet.std() > 5
