"""The data a run reads, checked before Ray starts: the dataset, the segmenter's settings, and
whether the VID has the labels it needs (cell truth, or the zoo's ``integrity.labels_csv``).

Kaggle's data has no cell truth: :func:`data_notes` says once, up front, what a run cannot do
on it, and :func:`resolve_integrity` turns the VID off (or refuses ``--integrity on``) before any
image is read.
"""

from __future__ import annotations

import dataclasses
import inspect

from ensemble.zoo import Zoo

def check_segmenter(name: str, settings: dict) -> None:
    """Raise ValueError for a segmenter setting it does not take, or a weight file that is not there."""
    from ensemble.data.segment import ClassicalSettings

    if name == "classical":
        try:
            ClassicalSettings(**settings)
        except TypeError as error:
            raise ValueError(f"--segmenter-setting: {error}; the classical segmenter takes "
                             f"{[f.name for f in dataclasses.fields(ClassicalSettings)]}") from None
        return
    from ensemble.data.hpacellseg import HPACellSegmenter
    from ensemble.storage import exists

    try:
        inspect.signature(HPACellSegmenter).bind(**settings)
    except TypeError as error:
        takes = list(inspect.signature(HPACellSegmenter).parameters)
        raise ValueError(f"--segmenter-setting for hpacellseg: {error}; it takes {takes}") from None
    for key in ("nuclei_model_path", "cell_model_path"):
        if not exists(settings[key]):
            raise FileNotFoundError(f"--segmenter-setting {key}={settings[key]}: no such file")


def check_data(data: str) -> None:
    """Raise FileNotFoundError unless ``data`` looks like a dataset in the Kaggle layout."""
    from ensemble.storage import exists, is_dir, join

    if not (exists(join(data, "train.csv")) or is_dir(join(data, "train"))):
        raise FileNotFoundError(f"no dataset at {data}: expected train.csv and train/{{ID}}_{{red,green,blue,yellow}}.png")


INTEGRITY_MODES = ("on", "off", "auto")
"""``--integrity``: fit the VID, do not, or fit it when the zoo enables it and cell labels exist."""

GOOD_COLUMNS = ("image_id", "cell_id", "good")
"""The columns of the VID's hand labels (``integrity.labels_csv``)."""


def has_truth(data: str | None) -> bool:
    """Whether the dataset ``data`` has cell truth (``truth/cell_labels.csv``); None, a simulated one, has."""
    from ensemble.storage import exists, join

    return data is None or exists(join(data, "truth", "cell_labels.csv"))


def truth_note(data: str) -> str:
    """What a run on ``data`` without cell truth (Kaggle's data) cannot do, in one line."""
    return (f"{data} has no cell truth (truth/cell_labels.csv), as Kaggle's data: cells are scored against "
            "their image labels (a rough guide), fusion takes the paper's rule, CRA label quality is not "
            "measured, `ensemble evaluate` cannot score, and the VID needs integrity.labels_csv")


def check_good_csv(uri: str, where: str) -> None:
    """Raise FileNotFoundError or ValueError unless ``uri`` is a CSV with the VID's label columns.

    Only its header is read: the labels meet the cells only once the store is built.
    """
    from ensemble.storage import open_file

    check_data_file(uri, where)
    with open_file(uri, "rt") as handle:
        header = [name.strip() for name in handle.readline().split(",")]
    missing = [name for name in GOOD_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{where}: {uri} needs the columns {','.join(GOOD_COLUMNS)}; its header lacks {missing}")


def resolve_integrity(zoo: Zoo, data: str | None, mode: str = "auto") -> tuple[Zoo, str | None]:
    """The zoo with the VID on or off as ``mode`` and the dataset's labels decide, and a line saying why.

    The VID learns from good and bad cells: ``integrity.labels_csv`` (checked here, its header
    only), else the cell truth of ``data`` (``truth/cell_labels.csv``; a simulated dataset, ``data``
    None, has it). Nothing else of the dataset is read, so this runs before ``prepare``.

    Parameters
    ----------
    zoo : Zoo
    data : str or None
        The dataset root or URL; None when train-all simulates one.
    mode : {"on", "off", "auto"}
        ``on`` fits the VID even where the zoo does not enable it, and fails without labels;
        ``off`` never fits it; ``auto`` fits it when the zoo enables it and labels exist.

    Returns
    -------
    zoo : Zoo
        ``zoo.integrity.enabled`` set to what the run will do.
    note : str or None
        Why the VID is off where the zoo enables it and ``mode`` is ``auto``, with the fix (None
        when it runs as asked).

    Raises
    ------
    ValueError
        ``mode`` is ``on`` and there are no labels (the message names the fix), or ``mode`` is unknown.
    FileNotFoundError
        ``integrity.labels_csv`` does not exist.
    """
    if mode not in INTEGRITY_MODES:
        raise ValueError(f"--integrity must be one of {', '.join(INTEGRITY_MODES)}, got {mode!r}")
    wanted = mode == "on" or (mode == "auto" and zoo.integrity.enabled)
    labels_csv = zoo.integrity.labels_csv
    if wanted and labels_csv is not None:
        check_good_csv(labels_csv, f"{zoo.source or zoo.name}: integrity.labels_csv")
    source = None
    if wanted:
        source = labels_csv or ("the cell truth" if has_truth(data) else None)
    if wanted and source is None:
        fix = (f"give integrity.labels_csv ({','.join(GOOD_COLUMNS)}: hand labels of some cells) in "
               f"{zoo.source or 'the zoo'}")
        if mode == "on":
            raise ValueError(f"--integrity on: the VID learns from good and bad cells and {data} has no cell truth "
                             f"(truth/cell_labels.csv): {fix}, or run with --integrity off")
        note = f"VID off: zoo {zoo.name} enables it but {data} has no cell truth; {fix}, or --integrity off to say so"
    else:
        note = None
    enabled = wanted and source is not None
    return dataclasses.replace(zoo, integrity=dataclasses.replace(zoo.integrity, enabled=enabled)), note


def data_notes(zoo: Zoo, data: str | None, integrity: str = "auto") -> tuple[Zoo, list[str]]:
    """:func:`resolve_integrity`, and the lines a run on ``data`` says once before anything starts."""
    zoo, note = resolve_integrity(zoo, data, integrity)
    return zoo, [line for line in (None if has_truth(data) else truth_note(data), note) if line]


def check_data_file(uri: str, where: str) -> None:
    """Raise FileNotFoundError, naming ``where`` it was given, unless ``uri`` exists."""
    from ensemble.storage import exists

    if not exists(uri):
        raise FileNotFoundError(f"{where}: {uri} does not exist")
