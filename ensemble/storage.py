"""Files by URI: a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec protocol.

Multi-node runs share the cell store, checkpoints and OOF tables through such URIs (DESIGN.md).
Writes go to a temporary name first and are then moved into place, so a killed process never
leaves a half-written file where a reader (or a resumed run) would take it as finished.
"""

from __future__ import annotations

import io
import uuid

import fsspec
import pandas as pd


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with ``/``."""
    return "/".join([str(uri).rstrip("/"), *(str(p).strip("/") for p in parts)])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


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


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_parquet(table: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    write_bytes(buffer.getvalue(), uri)


def read_parquet(uri: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_bytes(uri)))
