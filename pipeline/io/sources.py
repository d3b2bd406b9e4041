"""Input sources -> a manifest of (row, image id, uri) in a deterministic order, and reading one image's bytes.

Kinds (``kind="auto"`` picks one from what the input holds):

- ``coco``: ``<root>/<split>/*.jpg``; ids and file names come from ``<root>/annotations/instances_<split>.json``
  (or ``image_info_<split>.json``) when present, ordered by COCO image id; otherwise file stems in name order.
- ``folder``: every image file (by extension, :data:`IMAGE_EXTENSIONS`) under a folder or prefix, recursively, in
  path order; the id is the path relative to the folder.
- ``tar``: webdataset shards (``*.tar`` under the input, or one ``.tar`` file); one row per sample key that has an
  image member; the id is the key. Rows point at the member's byte range, so reading one image is one ranged read.
- ``parquet``: ``*.parquet`` files with an image-bytes column (``image`` as raw bytes or a ``{"bytes": ...}``
  struct as Hugging Face datasets write it, or ``jpg``/``png``/``img``/``image_bytes``/``bytes``); the id comes
  from ``image_id``/``id``/``key``/``__key__`` when present, else ``<file stem>/<row>``.

Every kind works on local paths and on ``s3://`` (see :mod:`pipeline.io.storage`). Manifest rows never move: row ``i``
of the manifest is row ``i`` of the feature store, which is what makes resume possible.

URIs of images inside containers use schemes this module defines, so a store's ``uri`` column says exactly where
each row came from:

- ``tar+<shard uri>#member=<name>&offset=<byte offset of data>&size=<bytes>``
- ``parquet+<file uri>#row=<row in file>&column=<column>[&field=<struct field>]``
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.io.storage import describe_failure, filesystem, is_remote

__all__ = [
    "IMAGE_EXTENSIONS",
    "Manifest",
    "SourceKind",
    "build_manifest",
    "read_bytes",
    "read_many",
]

#: File name endings taken as images when listing folders and tar shards (lower-cased comparison).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Parquet columns tried, in order, for the image bytes.
PARQUET_IMAGE_COLUMNS: tuple[str, ...] = ("image", "jpg", "jpeg", "png", "img", "image_bytes", "bytes")
#: Parquet columns tried, in order, for the image id.
PARQUET_ID_COLUMNS: tuple[str, ...] = ("image_id", "id", "key", "__key__")

SourceKind = Literal["auto", "coco", "folder", "tar", "parquet"]
_KINDS = ("auto", "coco", "folder", "tar", "parquet")


@dataclass(frozen=True)
class Manifest:
    """The rows of one job's input, in their fixed order.

    Attributes:
        input: the input URI the manifest was built from.
        kind: the source kind that produced it (``coco``, ``folder``, ``tar`` or ``parquet``).
        image_ids: row ``i``'s image id (COCO id, relative path or sample key).
        uris: row ``i``'s uri, readable with :func:`read_bytes`.
    """

    input: str
    kind: str
    image_ids: tuple[str, ...]
    uris: tuple[str, ...]
    storage_options: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.uris)

    def digest(self) -> str:
        """A short hash of ids and uris; part of the store fingerprint (a different input set is refused)."""
        h = hashlib.sha256()
        for image_id, uri in zip(self.image_ids, self.uris):
            h.update(image_id.encode())
            h.update(b"\0")
            h.update(uri.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _uri(fs: Any, path: str, remote: bool) -> str:
    return fs.unstrip_protocol(path) if remote else path


def _not_found(input: str, what: str) -> InputNotFoundError:
    return InputNotFoundError(f"input {input!r}: {what}; check the path (and credentials / AWS_ENDPOINT_URL for s3://)")


def build_manifest(
    input: str,
    *,
    kind: SourceKind = "auto",
    split: str | None = None,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """List an input's images in a deterministic order.

    Args:
        input: local path or ``s3://`` URI of a COCO root, a folder/prefix of images, a tar shard (or a folder of
            them) or a parquet file (or a folder of them).
        kind: the source kind, or ``"auto"`` to detect it (COCO when ``split`` is given and ``<input>/<split>``
            exists; tar / parquet when the input is, or holds, such files; a folder of images otherwise).
        split: COCO split name (``val2017``); required for ``kind="coco"``.
        limit: keep only the first ``limit`` rows (after ordering).
        storage_options: fsspec options for ``s3://`` (endpoint, credentials); the environment is used otherwise.

    Returns:
        The :class:`Manifest`.

    Raises:
        InputNotFoundError: the input is missing or unreadable, or holds no images.
        ConfigError: unknown ``kind``, or ``kind="coco"`` without ``split``.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown source kind {kind!r}; choose one of {', '.join(_KINDS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    remote = is_remote(input)
    try:
        fs, path = filesystem(input, storage_options)
        fs.info(path)  # unlike exists(), says why: no credentials, unreachable endpoint, access denied
    except FileNotFoundError:
        raise _not_found(input, "does not exist") from None
    except Exception as e:
        raise InputNotFoundError(f"input {input!r}: {describe_failure(e)}") from e
    try:
        is_dir = fs.isdir(path)
        if kind == "auto":
            kind = _detect_kind(fs, path, is_dir, split)
        if kind == "coco":
            if not split:
                raise ConfigError("kind='coco' needs split= (e.g. 'val2017')")
            ids, uris = _list_coco(fs, path, split, remote, input)
        elif kind == "folder":
            ids, uris = _list_folder(fs, path, remote)
        elif kind == "tar":
            ids, uris = _list_tar(fs, path, is_dir, remote)
        else:
            ids, uris = _list_parquet(fs, path, is_dir, remote)
    except (InputNotFoundError, ConfigError):
        raise
    except Exception as e:
        raise InputNotFoundError(f"input {input!r} cannot be listed: {describe_failure(e)}") from e
    if not uris:
        raise _not_found(input, f"holds no images (kind {kind!r}; image extensions {', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        ids, uris = ids[:limit], uris[:limit]
    return Manifest(input=input, kind=kind, image_ids=tuple(ids), uris=tuple(uris), storage_options=storage_options)


def _detect_kind(fs: Any, path: str, is_dir: bool, split: str | None) -> str:
    if not is_dir:
        if path.endswith(".tar"):
            return "tar"
        if path.endswith(".parquet"):
            return "parquet"
        return "folder"
    if split and fs.isdir(posixpath.join(path, split)):
        return "coco"
    names = [p for p in fs.find(path)]
    if any(p.endswith(".tar") for p in names):
        return "tar"
    if any(p.endswith(".parquet") for p in names):
        return "parquet"
    return "folder"


def _list_folder(fs: Any, path: str, remote: bool) -> tuple[list[str], list[str]]:
    if not fs.isdir(path):
        return ([posixpath.basename(path)], [_uri(fs, path, remote)]) if _is_image_name(path) else ([], [])
    files = sorted(p for p in fs.find(path) if _is_image_name(p))
    base = path.rstrip("/") + "/"
    return [p[len(base):] if p.startswith(base) else p for p in files], [_uri(fs, p, remote) for p in files]


def _list_coco(fs: Any, root: str, split: str, remote: bool, input: str) -> tuple[list[str], list[str]]:
    image_dir = posixpath.join(root, split)
    if not fs.isdir(image_dir):
        raise _not_found(input, f"has no split folder {split!r}")
    for name in (f"instances_{split}.json", f"image_info_{split}.json"):
        ann = posixpath.join(root, "annotations", name)
        if fs.exists(ann):
            with fs.open(ann, "rb") as f:
                images = json.load(f)["images"]
            images = sorted(images, key=lambda im: int(im["id"]))
            return (
                [str(im["id"]) for im in images],
                [_uri(fs, posixpath.join(image_dir, im["file_name"]), remote) for im in images],
            )
    files = sorted(p for p in fs.ls(image_dir, detail=False) if _is_image_name(p))
    stems = [posixpath.splitext(posixpath.basename(p))[0] for p in files]
    return stems, [_uri(fs, p, remote) for p in files]


def _list_tar(fs: Any, path: str, is_dir: bool, remote: bool) -> tuple[list[str], list[str]]:
    shards = sorted(p for p in fs.find(path) if p.endswith(".tar")) if is_dir else [path]
    ids: list[str] = []
    uris: list[str] = []
    for shard in shards:
        shard_uri = _uri(fs, shard, remote)
        seen: set[str] = set()
        with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:  # streaming over headers: one pass, data blocks are skipped by seeking
                if not m.isfile() or not _is_image_name(m.name):
                    continue
                dirname, base = posixpath.split(m.name)
                key = posixpath.join(dirname, base.split(".", 1)[0])
                if key in seen:  # a sample with two image members: keep the first
                    continue
                seen.add(key)
                ids.append(key)
                frag = urllib.parse.urlencode({"member": m.name, "offset": m.offset_data, "size": m.size})
                uris.append(f"tar+{shard_uri}#{frag}")
    return ids, uris


def _parquet_columns(schema: Any) -> tuple[str, str | None, str | None]:
    import pyarrow as pa

    names = list(schema.names)
    for col in PARQUET_IMAGE_COLUMNS:
        if col in names:
            t = schema.field(col).type
            if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
                img_field: str | None = "bytes"
            elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
                img_field = None
            else:
                continue
            id_col = next((c for c in PARQUET_ID_COLUMNS if c in names), None)
            return col, img_field, id_col
    raise ValueError(f"no image-bytes column (tried {', '.join(PARQUET_IMAGE_COLUMNS)}; found {', '.join(names)})")


def _list_parquet(fs: Any, path: str, is_dir: bool, remote: bool) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if is_dir else [path]
    ids: list[str] = []
    uris: list[str] = []
    for file in files:
        file_uri = _uri(fs, file, remote)
        stem = posixpath.splitext(posixpath.basename(file))[0]
        with fs.open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            col, img_field, id_col = _parquet_columns(pf.schema_arrow)
            n = pf.metadata.num_rows
            if id_col is not None:
                file_ids = [str(v) for v in pf.read(columns=[id_col]).column(0).to_pylist()]
            else:
                file_ids = [f"{stem}/{i}" for i in range(n)]
        query = {"column": col} if img_field is None else {"column": col, "field": img_field}
        for i in range(n):
            ids.append(file_ids[i])
            uris.append(f"parquet+{file_uri}#" + urllib.parse.urlencode({"row": i, **query}))
    return ids, uris


def _split_container(uri: str) -> tuple[str, str, dict[str, str]]:
    scheme, rest = uri.split("+", 1)
    base, frag = rest.rsplit("#", 1)
    return scheme, base, dict(urllib.parse.parse_qsl(frag, keep_blank_values=True))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The encoded bytes of one manifest row.

    Args:
        uri: a local path, an ``s3://`` URI, or a ``tar+...`` / ``parquet+...`` uri from :func:`build_manifest`.
        storage_options: fsspec options for object stores.

    Returns:
        The file's bytes (for tar members, exactly the member's bytes).

    Raises:
        FileNotFoundError / OSError: the object is gone or unreadable (the decode stage records it as the row's
        failure reason).
    """
    return read_many([uri], storage_options)[0]  # type: ignore[return-value]


def read_many(
    uris: Sequence[str], storage_options: dict[str, Any] | None = None, *, return_exceptions: bool = False
) -> list[bytes | BaseException]:
    """Read many rows' bytes; parquet rows of one row group are read with one request.

    Args:
        uris: manifest uris.
        storage_options: fsspec options for object stores.
        return_exceptions: put the exception in the result slot instead of raising it.

    Returns:
        One ``bytes`` (or exception, with ``return_exceptions``) per uri, in order.
    """
    out: list[bytes | BaseException | None] = [None] * len(uris)
    parquet: dict[str, list[tuple[int, int, dict[str, str]]]] = {}
    for k, uri in enumerate(uris):
        try:
            if uri.startswith("parquet+"):
                _, base, q = _split_container(uri)
                parquet.setdefault(base, []).append((k, int(q["row"]), q))
                continue
            if uri.startswith("tar+"):
                _, base, q = _split_container(uri)
                fs, path = filesystem(base, storage_options)
                start = int(q["offset"])
                size = int(q["size"])
                data = fs.cat_file(path, start=start, end=start + size) if size else b""
                if len(data) != size:
                    raise OSError(f"tar member {q['member']!r} is cut short ({len(data)} of {size} bytes)")
                out[k] = data
            else:
                fs, path = filesystem(uri, storage_options)
                out[k] = fs.cat_file(path)
        except Exception as e:
            if not return_exceptions:
                raise
            out[k] = e
    for base, items in parquet.items():
        try:
            _read_parquet_rows(base, items, out, storage_options)
        except Exception as e:
            if not return_exceptions:
                raise
            for k, _, _ in items:
                out[k] = e
    return out  # type: ignore[return-value]


def _read_parquet_rows(
    base: str,
    items: list[tuple[int, int, dict[str, str]]],
    out: list[Any],
    storage_options: dict[str, Any] | None,
) -> None:
    import pyarrow.parquet as pq

    fs, path = filesystem(base, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        starts = [0]
        for g in range(pf.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        cache: dict[tuple[int, str], Any] = {}
        for k, row, q in items:
            g = next(g for g in range(pf.num_row_groups) if starts[g] <= row < starts[g + 1])
            col = q["column"]
            if (g, col) not in cache:
                cache[(g, col)] = pf.read_row_group(g, columns=[col]).column(0)
            value = cache[(g, col)][row - starts[g]].as_py()
            if q.get("field"):
                value = None if value is None else value.get(q["field"])
            out[k] = b"" if value is None else bytes(value)
