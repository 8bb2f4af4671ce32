"""URIs: local paths and ``s3://`` through fsspec (s3fs) and pyarrow filesystems.

An S3-compatible endpoint (MinIO, a local moto server) is taken from ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``), the standard variables that boto tools read too.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without scheme) for a URI."""
    if uri.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        if s3_endpoint():
            kwargs["client_kwargs"] = {"endpoint_url": s3_endpoint()}
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, uri[len("s3://") :]
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def pyarrow_fs(uri: str) -> tuple[Any, str]:
    """(pyarrow.fs.FileSystem, path without scheme), for pyarrow / Ray Data / Ray Train."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        kwargs: dict[str, Any] = {}
        if s3_endpoint():
            kwargs["endpoint_override"] = s3_endpoint()
            if s3_endpoint().startswith("http://"):
                kwargs["scheme"] = "http"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = get_fs(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)
    # object stores have no directories


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically on local disk (temp file + rename); S3 puts are atomic already."""
    fs, path = get_fs(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under ``uri``."""
    fs, path = get_fs(uri)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory tree between any two URIs (local or S3)."""
    sfs, spath = get_fs(src)
    for p in sfs.find(spath):
        rel = posixpath.relpath(p, spath) if is_remote(src) else os.path.relpath(p, spath)
        write_bytes(
            join(dst, *rel.split(os.sep)), read_bytes(p if not is_remote(src) else f"s3://{p}")
        )
