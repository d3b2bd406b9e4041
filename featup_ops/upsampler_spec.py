"""One upsampler spec string everywhere: parse it, fetch the publisher's file once, build the module.

Forms (``featup_ops.load_upsampler(spec)``, every job's ``--upsampler``, stores, readers, benchmarks)::

    bilinear | bilateral                      no weights
    jbu | jbu:lite0                           the JBU shipped in the package
    KIND:VARIANT                              the publisher's file, fetched on first use into the cache
    KIND:VARIANT=PATH_OR_URI                  that file (publisher's format), local or s3:// (offline clusters)
    PATH_OR_URI                               a checkpoint folder of ours (``save_upsampler``), or a FeatUp ``.ckpt``

KINDs and VARIANTs: :func:`featup_ops.list_upsamplers`. The cache is ``$FEATUP_PIPELINE_CACHE`` (default
``~/.cache/featup-pipeline``): Hugging Face files through ``huggingface_hub.hf_hub_download`` (its own cache layout
under ``<cache>/hf``), plain URLs through ``torch.hub.download_url_to_file`` into
``<cache>/<kind>/<variant>/<file>``. Offline
(``HF_HUB_OFFLINE=1``, or the host unreachable) with no cached copy, loading fails at once with one line naming the
file, its address and the ``=PATH`` form. Files are read by :func:`featup_ops.tensor_files.read_tensor_file`
(safetensors, or ``torch.load(weights_only=True)``) and loaded with strict keys by the kind's loader.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .published import KINDS, PublishedUpsampler, published_entry, variants_of
from .tensor_files import read_file_bytes

__all__ = [
    "CACHE_ENV",
    "UpsamplerSpec",
    "cache_dir",
    "check_fits_backbone",
    "fetch_published",
    "finish_loaded",
    "load_named_upsampler",
    "parse_upsampler_spec",
    "read_published",
    "spec_identity",
]

#: Environment variable overriding the cache folder of fetched weights.
CACHE_ENV = "FEATUP_PIPELINE_CACHE"
_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class UpsamplerSpec:
    """A parsed spec.

    Attributes:
        kind: a key of :data:`featup_ops.published.KINDS`, or ``"path"`` for a bare checkpoint path.
        variant: the published variant (None for bilinear/bilateral and bare paths).
        path: the ``=PATH_OR_URI`` part, or the bare path; None: the publisher's file (fetched).
    """

    kind: str
    variant: str | None = None
    path: str | None = None

    @property
    def text(self) -> str:
        """The canonical string (what stores record)."""
        if self.kind == "path":
            return str(self.path)
        head = self.kind if self.variant is None else f"{self.kind}:{self.variant}"
        return head if self.path is None else f"{head}={self.path}"


def _known(kind: str) -> str:
    return ", ".join(f"{k}:{v}" if v else k for k in KINDS for v in (variants_of(k) or [None]))


def parse_upsampler_spec(spec: str | os.PathLike) -> UpsamplerSpec:
    """Parse a spec string (see the module docstring).

    A string whose part before the first ``:`` or ``=`` is a known kind is a named spec; anything else is a path or
    URI (``s3://...``, ``runs/x/upsampler``, ``dinov2_jbu_stack_cocostuff.ckpt``).

    Raises:
        CheckpointError: a known kind with an unknown variant, or a form the kind does not take (one line listing the
            valid specs).
    """
    text = os.fspath(spec).strip()
    head, eq, path = text.partition("=")
    kind, colon, variant = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or (colon and variant.startswith("//")):  # s3://..., file://...
        return UpsamplerSpec("path", None, text)
    info = KINDS[kind]
    variant = variant.strip() or None
    path = path.strip() or None
    if eq and path is None:
        raise CheckpointError(f"upsampler spec {text!r}: nothing after '='; use KIND:VARIANT=PATH_OR_URI")
    if not info.files:
        if variant or path:
            raise CheckpointError(f"upsampler {kind!r} takes no variant or file; use --upsampler {kind}")
        return UpsamplerSpec(kind)
    if kind == "jbu":
        if variant not in (None, "lite0"):
            raise CheckpointError(f"upsampler spec {text!r}: jbu's one published variant is 'lite0'; "
                                  "for a checkpoint you trained use jbu=PATH or the folder's path")
        return UpsamplerSpec("jbu", None if path else "lite0", path)
    known = variants_of(kind)
    if variant is None:
        raise CheckpointError(f"upsampler spec {text!r} needs a variant: {', '.join(f'{kind}:{v}' for v in known)}")
    if variant not in known:
        raise CheckpointError(
            f"unknown {kind} variant {variant!r} in {text!r}; published: {', '.join(f'{kind}:{v}' for v in known)}"
        )
    return UpsamplerSpec(kind, variant, path)


# --- fetching -------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$FEATUP_PIPELINE_CACHE`` or ``~/.cache/featup-pipeline``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "featup-pipeline").expanduser()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _url_cache_path(entry: PublishedUpsampler) -> Path:
    """``<cache>/<kind>/<variant>/<file>`` (FeatUp's norm and no-norm files share one name)."""
    return cache_dir() / entry.kind / entry.variant / entry.file


def _not_available(entry: PublishedUpsampler, why: str) -> CheckpointNotFoundError:
    where = cache_dir() / "hf" if entry.hf_repo else _url_cache_path(entry)
    return CheckpointNotFoundError(
        f"upsampler {entry.spec}: {why} and {entry.file} is not cached ({where}); download {entry.url} "
        f"and pass --upsampler {entry.spec}=/path/to/{entry.file}"
    )


def _cached_hf(entry: PublishedUpsampler) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(entry.hf_repo, entry.file, cache_dir=str(cache_dir() / "hf"))
    return found if isinstance(found, str) else None


def fetch_published(entry: PublishedUpsampler) -> str:
    """Local path of the publisher's file, downloaded into the cache on first use.

    Raises:
        CheckpointNotFoundError: offline (or the host unreachable) and not cached; one line naming the file, its
            address and the ``=PATH`` form.
        CheckpointError: the download does not match the pinned sha256.
    """
    if entry.hf_repo:
        cached = _cached_hf(entry)
        if cached:
            return cached
    else:
        local = _url_cache_path(entry)
        if local.is_file():
            return str(local)
    if _offline():
        raise _not_available(entry, "HF_HUB_OFFLINE is set")
    if not _reachable(entry.url):
        raise _not_available(entry, f"{urlparse(entry.url).hostname} is unreachable")
    note = f"; {KINDS[entry.kind].attribution}" if KINDS[entry.kind].attribution else ""
    print(f"fetching upsampler {entry.spec}: {entry.url} ({entry.licence}{note})", file=sys.stderr, flush=True)
    if entry.hf_repo:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(entry.hf_repo, entry.file, cache_dir=str(cache_dir() / "hf"))
    local.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(entry.url, str(local), hash_prefix=entry.sha256, progress=False)
    return str(local)


def read_published(spec: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, bytes] | None:
    """Fetch (if needed) and read a publisher's file once: ``(KIND:VARIANT=<where it was read>, its bytes)`` for a
    ``KIND:VARIANT[=PATH]`` spec, None for every other spec (fixed kinds, JBU checkpoints of ours, bare paths).

    Raises:
        CheckpointNotFoundError / CheckpointError: as :func:`fetch_published` and reading the file.
    """
    parsed = parse_upsampler_spec(spec)
    entry = published_entry(parsed.kind, str(parsed.variant)) if parsed.variant else None
    if entry is None:
        return None
    where = parsed.path or fetch_published(entry)
    return f"{entry.spec}={where}", read_file_bytes(where, storage_options, what="upsampler file")


# --- building -------------------------------------------------------------------------------------------------------


def _loader(kind: str) -> Any:
    module_name, _, attr = KINDS[kind].loader.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_fits_backbone(
    entry: PublishedUpsampler | None, module: Any, *, backbone: str, dim: int | None, stride: int | None
) -> None:
    """Refuse, in one line before any work, an upsampler whose file does not fit the backbone's features.

    Args:
        entry: the published entry (its ``dim``/``patch``), or None for specs without one.
        module: the built upsampler (its ``dim`` attribute, if any).
        backbone: the backbone name (for the message).
        dim, stride: the backbone's feature channels and stride (None: unknown, not checked).

    Raises:
        CheckpointError: channels or patch size differ.
    """
    name = getattr(module, "upsampler_spec", None) or type(module).__name__
    want = getattr(module, "dim", None) or (entry.dim if entry else None)
    if dim is not None and want is not None and int(want) != int(dim):
        raise CheckpointError(
            f"upsampler {name} upsamples {want}-channel features but backbone {backbone!r} gives {dim}; "
            f"pick the upsampler made for {backbone} (featup_ops.list_upsamplers()) or --upsampler anyup:multi-backbone"
        )
    if entry is not None and entry.patch is not None and stride is not None and int(entry.patch) != int(stride):
        raise CheckpointError(
            f"upsampler {name} was made for patch-{entry.patch} backbones but {backbone!r} has stride {stride}; "
            f"pick the upsampler made for {backbone} (featup_ops.list_upsamplers())"
        )


def load_named_upsampler(
    spec: UpsamplerSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    data: bytes | None = None,
) -> torch.nn.Module:
    """Build the module a named spec (not a bare path) stands for, in eval mode.

    ``data``: the publisher's file's bytes, already read (a featurize job reads them once on the driver and hands
    them to its actors through Ray's object store: no download per actor or node); None: fetch or read the file.

    Returns:
        The module with ``.upsampler_spec`` (canonical text), ``.checkpoint_hash`` (sha256 of the file's bytes, or
        the JBU checkpoint hash; None for bilinear/bilateral), ``.checkpoint_meta``, ``.published`` (the entry or
        None) and ``.lowres_normalized``.

    Raises:
        CheckpointNotFoundError: the file is missing (offline and not cached: one line with the ``=PATH`` form).
        CheckpointError: unreadable file, keys that do not fit the kind (named), a pinned hash that differs.
    """
    kind = spec.kind
    entry = None
    if not KINDS[kind].files:
        module = _loader(kind)()
        sha, meta = None, {}
    elif kind == "jbu":
        from .checkpoint import load_upsampler
        from .defaults import SHIPPED_JBU

        module = load_upsampler(spec.path or str(SHIPPED_JBU), storage_options=storage_options)
        sha, meta = module.checkpoint_hash, dict(getattr(module, "checkpoint_meta", {}))
    else:
        entry = published_entry(kind, str(spec.variant))
        assert entry is not None  # parse_upsampler_spec checked the variant
        if data is None:
            where = spec.path or fetch_published(entry)
            data = read_file_bytes(where, storage_options, what="upsampler file")
        else:
            where = spec.path or entry.file
        sha = hashlib.sha256(data).hexdigest()
        if spec.path is None and entry.sha256 and sha != entry.sha256:
            raise CheckpointError(
                f"upsampler {entry.spec}: cached {where} has sha256 {sha[:12]}... but the published file has "
                f"{entry.sha256[:12]}...; delete it and fetch again"
            )
        from .tensor_files import read_tensor_file

        obj = read_tensor_file(data, repr(where))
        module = _loader(kind)(obj, variant=entry.variant, name=repr(where))
        meta = {"format": kind, "file": entry.file, "source": entry.url if spec.path is None else where,
                "licence": entry.licence, "sha256": sha}
    module.to(map_location)
    module.eval()
    module.checkpoint_hash = sha
    module.checkpoint_meta = meta
    module.published = entry
    if entry is not None:
        module.weights_path = where
    elif not KINDS[kind].files:
        module.weights_path = None
    return module


def spec_identity(module: Any) -> str:
    """What a store records as the upsampler's spec: ``KIND:VARIANT`` of a publisher's file (wherever it was read
    from), ``jbu:lite0`` for the shipped JBU, ``jbu`` for a JBU you trained (its checkpoint hash tells which),
    ``bilinear`` / ``bilateral``."""
    from .defaults import SHIPPED_JBU_HASH

    entry = getattr(module, "published", None)
    if entry is not None:
        return entry.spec
    config = module.config_dict() if callable(getattr(module, "config_dict", None)) else {}
    kind = str(config.get("kind", type(module).__name__))
    if kind == "jbu":
        return "jbu:lite0" if getattr(module, "checkpoint_hash", None) == SHIPPED_JBU_HASH else "jbu"
    variant = config.get("variant")
    return f"{kind}:{variant}" if variant else kind


def finish_loaded(module: Any, spec: UpsamplerSpec, *, backbone: str | None = None) -> Any:
    """Set the attributes every loaded upsampler carries (see :func:`featup_ops.load_upsampler`) and refuse one that
    does not fit a backbone preset.

    Raises:
        CheckpointError: the module does not fit ``backbone`` (a preset) in channels or patch size.
    """
    if getattr(module, "published", None) is None:
        config = module.config_dict() if callable(getattr(module, "config_dict", None)) else {}
        variant = getattr(module, "variant", None) or config.get("variant")
        module.published = published_entry(str(config.get("kind")), str(variant)) if variant else None
    module.weights_path = getattr(module, "weights_path", None)
    module.checkpoint_hash = getattr(module, "checkpoint_hash", None)
    module.checkpoint_meta = dict(getattr(module, "checkpoint_meta", None) or {})
    module.lowres_normalized = bool(getattr(module, "lowres_normalized", False))
    module.upsampler_spec = spec_identity(module)
    if backbone is not None:
        from .backbones import PRESETS

        cfg = PRESETS.get(backbone)
        if cfg is not None:
            check_fits_backbone(module.published, module, backbone=backbone, dim=cfg.dim, stride=cfg.stride)
    return module
