"""The Kaggle/HPA reader on small datasets written here, good and bad."""

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble.data.hpa import (
    BatchReport,
    DatasetError,
    channel_paths,
    iter_images,
    label_matrix,
    read_given_mask,
    read_image,
    read_index,
    read_truth,
)
from ensemble.labels import CHANNELS


def write_channels(root: Path, image_id: str, shape: tuple[int, int], bits: int, split="train") -> np.ndarray:
    """Write the 4 channel PNGs of one image; return the raw (H, W, 4) values written."""
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    dtype = np.uint8 if bits == 8 else np.uint16
    raw = rng.integers(0, np.iinfo(dtype).max, size=(*shape, len(CHANNELS)), endpoint=True).astype(dtype)
    (root / split).mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(channel_paths(root, image_id, split)):
        Image.fromarray(raw[..., i]).save(path)
    return raw


@pytest.fixture
def dataset(tmp_path):
    """Two good images (8-bit 32x48, 16-bit 40x40) and their train.csv."""
    raws = {
        "img8": write_channels(tmp_path, "img8", (32, 48), 8),
        "img16": write_channels(tmp_path, "img16", (40, 40), 16),
    }
    (tmp_path / "train.csv").write_text("ID,Label\nimg8,0|16\nimg16,18\n")
    return tmp_path, raws


def write_csv(root: Path, text: str) -> None:
    (root / "train.csv").write_text(text)


# --- the index ------------------------------------------------------------------------------


def test_index_parses_labels(dataset):
    root, _ = dataset
    index = read_index(root)
    assert list(index["ID"]) == ["img8", "img16"]
    assert list(index["labels"]) == [[0, 16], [18]]
    matrix = label_matrix(index["labels"])
    assert matrix.shape == (2, 19)
    assert matrix[0, [0, 16]].tolist() == [1, 1] and matrix.sum() == 3


def test_index_without_csv_lists_image_files(tmp_path):
    write_channels(tmp_path, "t2", (8, 8), 8, split="test")
    write_channels(tmp_path, "t1", (8, 8), 8, split="test")
    (tmp_path / "test" / "t3_green.png").write_bytes(b"")  # one channel only: still listed
    index = read_index(tmp_path, "test")
    assert list(index["ID"]) == ["t1", "t2", "t3"]
    assert all(labels == [] for labels in index["labels"])


def test_index_without_csv_or_directory(tmp_path):
    with pytest.raises(DatasetError, match="test.csv"):
        read_index(tmp_path, "test")


def test_label_outside_range_names_row_and_id(tmp_path):
    write_csv(tmp_path, "ID,Label\na,0\nb,3|19\n")
    with pytest.raises(DatasetError, match=r"train\.csv: data row 2 \(ID 'b'\): label id 19 is outside"):
        read_index(tmp_path)


def test_non_integer_label_names_row_and_id(tmp_path):
    write_csv(tmp_path, "ID,Label\na,0\nb,1\nc,2|x\n")
    with pytest.raises(DatasetError, match=r"train\.csv: data row 3 \(ID 'c'\): label 'x' is not an integer"):
        read_index(tmp_path)


def test_duplicate_ids_name_both_rows(tmp_path):
    write_csv(tmp_path, "ID,Label\na,0\nb,1\nc,2\nb,3\n")
    with pytest.raises(DatasetError, match=r"train\.csv: ID 'b' appears twice, in data rows 2 and 4"):
        read_index(tmp_path)


def test_missing_label_column(tmp_path):
    write_csv(tmp_path, "ID,Labels\na,0\n")
    with pytest.raises(DatasetError, match=r"train\.csv: missing column\(s\) \['Label'\]"):
        read_index(tmp_path)


def test_unparsable_csv(tmp_path):
    write_csv(tmp_path, "ID,Label\na,0\nb,1,extra,fields\n")
    with pytest.raises(DatasetError, match=r"train\.csv: malformed CSV"):
        read_index(tmp_path)


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id, full_scale", [("img8", 255), ("img16", 65535)])
def test_read_image_scales_and_keeps_channel_order(dataset, image_id, full_scale):
    root, raws = dataset
    image = read_image(root, image_id)
    assert image.dtype == np.float32 and image.shape == raws[image_id].shape
    np.testing.assert_allclose(image, raws[image_id] / full_scale, rtol=1e-6)
    raw = read_image(root, image_id, dtype=None)
    assert raw.dtype == raws[image_id].dtype
    np.testing.assert_array_equal(raw, raws[image_id])


def test_missing_channel_names_the_file(dataset):
    root, _ = dataset
    (root / "train" / "img8_yellow.png").unlink()
    with pytest.raises(DatasetError, match=r"img8_yellow\.png: file not found"):
        read_image(root, "img8")


def test_truncated_png_names_the_file(dataset):
    root, _ = dataset
    path = root / "train" / "img16_blue.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"img16_blue\.png: unreadable or truncated PNG"):
        read_image(root, "img16")


def test_garbage_bytes_name_the_file(dataset):
    root, _ = dataset
    (root / "train" / "img8_red.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DatasetError, match=r"img8_red\.png: unreadable or truncated PNG"):
        read_image(root, "img8")


def test_channels_of_different_sizes_name_both_sizes(dataset):
    root, _ = dataset
    Image.fromarray(np.zeros((30, 48), np.uint8)).save(root / "train" / "img8_green.png")
    message = r"img8_green\.png: size 48x30 \(WxH\) differs from img8_red\.png: 48x32"
    with pytest.raises(DatasetError, match=message):
        read_image(root, "img8")


def test_colour_png_is_rejected(dataset):
    root, _ = dataset
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "train" / "img8_blue.png")
    with pytest.raises(DatasetError, match=r"img8_blue\.png: image mode 'RGB' is not 8- or 16-bit grayscale"):
        read_image(root, "img8")


def test_mixed_bit_depths_are_rejected(dataset):
    root, _ = dataset
    Image.fromarray(np.zeros((32, 48), np.uint16)).save(root / "train" / "img8_blue.png")
    with pytest.raises(DatasetError, match=r"mixes 8- and 16-bit channels .*img8_blue\.png: uint16"):
        read_image(root, "img8")


def test_batch_goes_on_past_bad_images_and_reports_them(dataset):
    root, raws = dataset
    write_channels(root, "cut", (16, 16), 16)
    cut = root / "train" / "cut_green.png"
    cut.write_bytes(cut.read_bytes()[:-40])
    report = BatchReport()
    read = dict(iter_images(root, ["img8", "absent", "cut", "img16"], report=report))
    assert list(read) == ["img8", "img16"]
    np.testing.assert_allclose(read["img16"], raws["img16"] / 65535, rtol=1e-6)
    assert report.n_ok == 2
    assert [image_id for image_id, _ in report.skipped] == ["absent", "cut"]
    assert "absent_red.png: file not found" in report.skipped[0][1]
    assert "cut_green.png: unreadable or truncated PNG" in report.skipped[1][1]
    assert report.summary().startswith("2 images read, 2 skipped; absent: ")


# --- masks and truth ------------------------------------------------------------------------


def test_given_mask_is_optional(dataset):
    root, _ = dataset
    assert read_given_mask(root, "img8") is None
    labels = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) % 300
    (root / "masks").mkdir()
    Image.fromarray(labels).save(root / "masks" / "img8.png")
    mask = read_given_mask(root, "img8")
    assert mask.dtype == np.uint16
    np.testing.assert_array_equal(mask, labels)


def test_truth_cells_and_masks(dataset):
    root, _ = dataset
    assert read_truth(root) is None
    (root / "truth" / "masks").mkdir(parents=True)
    mask = np.zeros((40, 40), np.uint16)
    mask[:20], mask[20:] = 1, 2
    Image.fromarray(mask).save(root / "truth" / "masks" / "img16.png")
    (root / "truth" / "cell_labels.csv").write_text(
        "ID,cell_id,Label,captured\nimg16,1,0|5,1.0\nimg8,1,18,0.5\nimg16,2,7,0.25\n"
    )
    truth = read_truth(root)
    assert truth.image_ids == ["img16", "img8"]
    assert truth.cells["captured"].tolist() == [1.0, 0.5, 0.25]
    np.testing.assert_array_equal(truth.mask("img16"), mask)
    cell_ids, labels = truth.cell_labels("img16")
    assert cell_ids.tolist() == [1, 2]
    assert [np.flatnonzero(row).tolist() for row in labels] == [[0, 5], [7]]
    assert truth.cell_labels("nothing")[1].shape == (0, 19)


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a,0,1\n", r"data row 1 \(ID 'a'\): cell_id '0' is not a positive integer"),
        ("a,1,1\nb,1,2\na,1,3\n", r"ID 'a', cell_id 1 appears twice, in data rows 1 and 3"),
        ("a,1,1\na,2,20\n", r"data row 2 \(ID 'a'\): label id 20 is outside"),
    ],
)
def test_bad_truth_table_names_the_row(tmp_path, rows, message):
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "cell_labels.csv").write_text("ID,cell_id,Label\n" + rows)
    with pytest.raises(DatasetError, match=r"cell_labels\.csv: " + message):
        read_truth(tmp_path)
