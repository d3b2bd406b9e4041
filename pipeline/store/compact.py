"""The compact (``--hires on-read``) part of a feature store: the upsampler kept inside the store, and sizes.

An on-read store (``hires_mode == "on-read"``, see :mod:`pipeline.store.schema`) keeps ``lowres`` and ``guidance``
(the decoded, resized ``uint8`` input image) instead of ``hires``, and the upsampler that turns them into ``hires``:

- a trained JBU of ours: its checkpoint files (``upsampler.safetensors`` + ``upsampler.json``, as
  :func:`featup_ops.save_upsampler` writes them) copied into the sub-group ``upsampler/`` of the store; the
  checkpoint hash is part of the store's settings, so of its fingerprint;
- a published upsampler (``featup:dinov2``, ``uplift:dinov2-s14``, ...): the publisher's file, byte for byte, as
  ``upsampler/<file>``; its sha256 is the recorded hash, and readers load it as ``KIND:VARIANT=<store>/upsampler/<file>``;
- the fixed bilateral / bilinear upsampler: its config (``attrs["upsampler"]``), nothing else.

:func:`load_store_upsampler` rebuilds it for a reader and refuses, with one line naming it, a stored checkpoint that
is missing, corrupt (sha256 recorded in its JSON) or not the one the store's settings name. Loading never unpickles
(safetensors, or ``torch.load(weights_only=True)``; :func:`featup_ops.checkpoint.load_upsampler`).
"""
from __future__ import annotations

from typing import Any

import zarr

from pipeline.errors import StoreError
from pipeline.fmt import fmt_bytes
from pipeline.io.storage import access_errors, filesystem
from pipeline.store.schema import FeatureStoreSchema

__all__ = ["UPSAMPLER_GROUP", "store_upsampler", "load_store_upsampler", "stored_upsampler_uri", "modes_size_text"]

#: Sub-group of an on-read store holding the upsampler's checkpoint files.
UPSAMPLER_GROUP: str = "upsampler"
_FILES = ("upsampler.safetensors", "upsampler.json")  # weights first, config last (a readable config => weights)


def stored_upsampler_uri(store_uri: str) -> str:
    """Where an on-read store keeps its upsampler checkpoint: ``<store>/upsampler``."""
    return store_uri.rstrip("/") + "/" + UPSAMPLER_GROUP


def _stored_file(spec: str | None) -> str | None:
    """The publisher's file name an on-read store keeps for a published spec (``uplift:dinov2-s14``), else None."""
    from featup_ops.published import published_entry

    kind, _, variant = str(spec or "").partition(":")
    entry = published_entry(kind, variant) if variant else None
    return entry.file if entry is not None else None


def store_upsampler(
    group: zarr.Group,
    store_uri: str,
    source: str,
    checkpoint_hash: str,
    *,
    spec: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Copy the upsampler's weights into an on-read store (skipped when an identical copy is there).

    Args:
        group: the store, opened for writing.
        store_uri: its local path or ``s3://`` URI.
        source: what the job loaded: a publisher's file (for a published spec), or a checkpoint directory of ours.
        checkpoint_hash: the hash the store's settings record (sha256 of a publisher's file; the
            :func:`featup_ops.checkpoint.checkpoint_hash` of a directory).
        spec: the store's ``upsampler_spec`` (``KIND:VARIANT``); decides which of the two is copied.
        storage_options: fsspec options for both.
    """
    import hashlib

    from featup_ops.checkpoint import checkpoint_hash as hash_of
    from featup_ops.errors import CheckpointError

    dest = stored_upsampler_uri(store_uri)
    file = _stored_file(spec)
    dst_fs, dst = filesystem(dest, storage_options)
    src_fs, src = filesystem(source, storage_options)

    def stored_hash() -> str | None:
        try:
            if file is not None:
                return hashlib.sha256(dst_fs.cat_file(dst.rstrip("/") + "/" + file)).hexdigest()
            return hash_of(dest, storage_options=storage_options)
        except (CheckpointError, OSError):
            return None

    if stored_hash() == checkpoint_hash:
        return  # resume: already copied
    with access_errors(f"store {store_uri!r}"):
        if UPSAMPLER_GROUP not in group:
            group.create_group(UPSAMPLER_GROUP, attributes={"featup": {"checkpoint_hash": checkpoint_hash}})
        if file is not None:
            dst_fs.pipe_file(dst.rstrip("/") + "/" + file, src_fs.cat_file(src))
        else:
            for name in _FILES:
                dst_fs.pipe_file(dst.rstrip("/") + "/" + name, src_fs.cat_file(src.rstrip("/") + "/" + name))
    if stored_hash() != checkpoint_hash:
        raise StoreError(f"upsampler weights {source!r} changed while they were copied into {store_uri!r}; rerun")


def load_store_upsampler(
    store_uri: str, attrs: dict[str, Any], *, storage_options: dict[str, Any] | None = None, device: str = "cpu"
) -> Any:
    """The upsampler an on-read store was made with, in eval mode on ``device``.

    Args:
        store_uri: the store's path or URI.
        attrs: its ``featup`` attributes (``upsampler`` config, ``upsampler_spec``, ``upsampler_checkpoint_hash``).
        storage_options: fsspec options.
        device: torch device of the module.

    Raises:
        StoreError: one line naming the stored upsampler when it is missing, corrupt or another one than the
            store's settings record.
    """
    from featup_ops.checkpoint import build_upsampler, load_upsampler
    from featup_ops.errors import CheckpointError, CheckpointNotFoundError

    config = attrs.get("upsampler") or {"kind": "bilateral"}
    expected = attrs.get("upsampler_checkpoint_hash")
    if not expected:  # a fixed upsampler: its config is all there is
        try:
            return build_upsampler(config).to(device).eval()
        except CheckpointError as e:
            raise StoreError(f"store {store_uri!r}: its upsampler config {config!r} cannot be built ({e})") from None
    where = stored_upsampler_uri(store_uri)
    file = _stored_file(attrs.get("upsampler_spec"))
    spec = where if file is None else f"{attrs['upsampler_spec']}={where}/{file}"
    try:
        module = load_upsampler(spec, storage_options=storage_options, map_location=device)
    except CheckpointNotFoundError:
        raise StoreError(
            f"store {store_uri!r}: its upsampler copy {where!r} is missing; rerun the featurize job on the "
            "store (it copies it again) or featurize with --hires materialized"
        ) from None
    except CheckpointError as e:
        raise StoreError(f"store {store_uri!r}: its upsampler copy {where!r} is corrupt ({e})") from None
    if module.checkpoint_hash != expected or module.config_dict() != config:
        raise StoreError(
            f"store {store_uri!r}: its upsampler copy {where!r} (hash {module.checkpoint_hash[:12]}...) is not "
            f"the one the store was made with ({str(expected)[:12]}...); restore it or featurize again"
        )
    return module


def modes_size_text(schema: FeatureStoreSchema, input_size: tuple[int, int]) -> str:
    """Both modes' uncompressed bytes per image and in total, for the size line printed before a job.

    Args:
        schema: the job's schema (either mode).
        input_size: ``(Hin, Win)`` of the backbone input (the on-read ``guidance`` image).
    """
    low = schema.row_bytes - (schema.guidance_row_bytes if schema.on_read else schema.hires_row_bytes)
    mat = low + schema.hires_row_bytes
    compact = low + 3 * input_size[0] * input_size[1]
    n = schema.n_rows
    return (
        f"materialized {fmt_bytes(mat)}/image ({fmt_bytes(mat * n)}) vs on-read {fmt_bytes(compact)}/image "
        f"({fmt_bytes(compact * n)}, {mat / compact:.0f}x smaller), uncompressed"
    )
