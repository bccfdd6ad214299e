"""Files by URL: a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec protocol.

Every path the package reads or writes (dataset, masks, truth, cell store, workdir, checkpoints,
OOF tables, specs, predictions, plots) goes through here, so a multi-node run shares them through
a bucket. Object stores are reached with the settings their fsspec package reads from
the environment (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... as boto does), and Ray
Train gets the same filesystem (:func:`arrow_filesystem`), so every part sees the same bucket.

Writes go to a temporary name first and are then moved into place, so a killed process never
leaves a half-written file where a reader (or a resumed run) would take it as finished.
"""

from __future__ import annotations

import io
import posixpath
import tempfile
import uuid
from pathlib import Path

import fsspec
import pandas as pd

# The package each object-store scheme needs; fsspec's own message for a missing one is a
# multi-line traceback from deep inside its registry.
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}


def is_local(uri: str | Path) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in str(uri) or str(uri).startswith("file://")


def filesystem(uri: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path within it.

    Raises
    ------
    ValueError
        The scheme's fsspec package is not installed (the message names it).
    """
    try:
        return fsspec.core.url_to_fs(str(uri))
    except ImportError:
        scheme = str(uri).split("://", 1)[0]
        package = SCHEME_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        raise ValueError(f"{uri}: reading {scheme}:// URLs needs {package} (pip install {package})") from None


def arrow_filesystem(uri: str):
    """``(filesystem, path)`` for pyarrow users (Ray Train's ``storage_filesystem``), or ``(None, uri)``.

    pyarrow's own S3 client ignores ``AWS_ENDPOINT_URL``, so a remote URL is served
    through the same fsspec filesystem every other part of the package uses.
    """
    if is_local(uri):
        return None, str(Path(str(uri).removeprefix("file://")).resolve())
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def name(uri: str | Path) -> str:
    """The last part of a path or URL (a file's name)."""
    return posixpath.basename(str(uri).rstrip("/"))


def beside(uri: str | Path, filename: str) -> str:
    """The path or URL of ``filename`` in the folder of ``uri`` (``s3://b/x/preds.parquet`` -> ``s3://b/x/{filename}``)."""
    folder, slash, _ = str(uri).rpartition("/")
    return f"{folder}{slash}{filename}"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with ``/``."""
    return "/".join([str(uri).rstrip("/"), *(str(p).strip("/") for p in parts)])


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def is_dir(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def list_files(uri: str | Path) -> dict[str, int]:
    """Name -> size in bytes of the files directly in a folder (empty if there is none)."""
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e["size"]) for e in fs.ls(path, detail=True)
            if e["type"] == "file"}


def local_path(uri: str | Path) -> str:
    """A local file with the contents of ``uri``: the path itself, or a cached download of a remote file.

    For readers that take only paths (``torch.load`` of a segmenter's weights).
    """
    if is_local(uri):
        return str(uri).removeprefix("file://")
    cache = str(Path(tempfile.gettempdir()) / "ensemble-cache")
    return fsspec.open_local(f"filecache::{uri}", filecache={"cache_storage": cache})


def open_file(uri: str | Path, mode: str = "rb"):
    """An open file object of ``uri`` (a context manager)."""
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def write_bytes(data: bytes, uri: str) -> None:
    """Write ``data`` to ``uri`` atomically (temporary name, then move)."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(temporary, "wb") as handle:
        handle.write(data)
    fs.mv(temporary, path)


def read_bytes(uri: str | Path) -> bytes:
    with open_file(uri) as handle:
        return handle.read()


def write_parquet(table: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    write_bytes(buffer.getvalue(), uri)


def read_parquet(uri: str, **options) -> pd.DataFrame:
    """A parquet file as a DataFrame; ``options`` (``columns``, ``filters``) go to ``pd.read_parquet``."""
    return pd.read_parquet(io.BytesIO(read_bytes(uri)), **options)
