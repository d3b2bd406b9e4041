"""AnyUp (Wimmer et al., ICLR'26; CC-BY-4.0, github.com/wimmerth/anyup): one feature-agnostic window-attention
upsampler for any backbone and channel count, computed as its reference does, in bounded memory.

AnyUp weights by Thomas Wimmer et al., licensed CC-BY-4.0; this module is our own code written from a description
of the model (``tests/fixtures/anyup/README.md``), checked against outputs of the publisher's code.

What it computes, for features ``F (B,C,h,w)`` (any C) and an ImageNet-normalised image ``I (B,3,H,W)``:

1. Image encoder at full resolution: 1x1 conv 3->128, two residual blocks (GroupNorm(8) -> SiLU -> 1x1 conv, twice,
   plus the input), then a per-pixel rotary code with the learned ``rope.freqs (2,128)``:
   ``e*cos(a) + rot(e)*sin(a)``, ``a = r*freqs[0] + c*freqs[1]``, r, c = ``linspace(0,1,.)`` of the row, column.
2. Queries: a 1x1 conv and two residual blocks, ``adaptive_avg_pool2d`` to the output size ``(Ho,Wo)``, a 3x3 conv.
   Keys: the same structure with its own weights pooled to ``(h,w)``, concatenated with the feature-agnostic code of
   F (each L2-normalised channel convolved with 128 shared 5x5 filters, divided by the taps inside the map; the
   ``(C*128)`` responses *reshaped* to ``(128,C)``, softmax over the 128 axis, mean over C; two residual blocks),
   then a reflect-padded 3x3 conv 256->128 and two residual blocks.
3. Cross-attention: RMSNorm (eps = the dtype's machine epsilon) and the q/k in-projections of a 4-head attention;
   each output pixel attends to the low-res cells of its window (output row i: rows
   ``[floor(clamp((i+.5)/Ho - .1, 0, 1) h), ceil(clamp((i+.5)/Ho + .1, 0, 1) h))``, in float32; columns alike);
   the four heads' softmax weights are averaged and applied to the *raw* features. The file's value and output
   projections are loaded but never used. Each output is a convex combination of F: ``(B,C,Ho,Wo)``.

Memory. The reference builds the dense ``(Ho*Wo) x (h*w)`` weights of every head (~3.3 GB at 448^2 from 32^2 tokens)
and 128-channel maps at full image resolution. With ``max_tile_bytes`` set (the default), each image is computed on
its own, every step on a piece whose intermediates are about that size (:meth:`AnyUpUpsampler.tile_plan`):

* the attention runs in tiles of output rows and columns (each side at most ~10% of the output or 64, fewer if the
  budget says so); a tile gathers only the band of low-res rows and columns its windows cover and masks each query
  to its own window inside the band, then averages the heads' softmax weights and multiplies them with the band's
  raw features;
* the queries of a row tile are pooled from just the image rows they average (plus the 3x3 conv's one-row halo),
  so the ``(128, Ho, Wo)`` query map never exists;
* the full-resolution encoders run whole when they fit the budget; otherwise on bands of image rows, their
  GroupNorm statistics first gathered over the whole image band by band (one pass per GroupNorm, 8 in all, merged in
  float64), then each band normalised with them, so no ``128 x H x W`` map exists (except the image encoder's output
  when it takes at most half the budget: kept, instead of recomputed in the 6 later passes). The banded encoders cost
  about 2.5x (output kept) to 4.5x (not kept) the arithmetic of the whole ones;
* the feature-agnostic code runs in chunks of the C axis.

Peak memory is then about two budgets plus the output, whatever the output and image size. ``max_tile_bytes=None``
is the dense reference computation (what the publisher computes, batched); tiled and dense agree to float rounding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_tiles import rows_per_tile, tile_spans
from .baselines import check_upsample_args
from .errors import CheckpointError, ConfigError, InputSizeError
from .tensor_files import tensor_mapping
from .weights import state_dict_mismatches

__all__ = [
    "ANYUP_ATTRIBUTION",
    "ANYUP_VARIANTS",
    "AnyUpTilePlan",
    "DEFAULT_MAX_TILE_BYTES",
    "AnyUpUpsampler",
    "anyup_window_bounds",
    "load_anyup",
]

#: Published variants (same 73-key layout) and what each was trained with.
ANYUP_VARIANTS: dict[str, str] = {
    "paper": "DINOv2 ViT-S/14 features",
    "multi-backbone": "DINOv2-S, DINOv2-S+reg4, CLIP-B/16, SigLIP-B/16, ViT-B/16 features",
}
#: The credit CC-BY-4.0 asks for wherever the weights are used or fetched.
ANYUP_ATTRIBUTION = "AnyUp by Thomas Wimmer et al., CC-BY-4.0, github.com/wimmerth/anyup"
#: Default budget (bytes) of one step's intermediates.
DEFAULT_MAX_TILE_BYTES = 256 * 2**20

_DIM = 128  # qk width of every encoder
_HEADS = 4
_HEAD_DIM = _DIM // _HEADS
_GROUPS = 8
_GN_EPS = 1e-5
_N_BASIS = 128
_BASIS_SIZE = 5
_WINDOW = 0.1  # window half-size as a fraction of the low-res grid
_TILE = 0.1  # largest attention tile side, as a fraction of the output side
_MIN_TILE = 64  # ... or this many output rows (columns), whichever is more
_ENC_LIVE = 6  # 128-channel full-width rows alive at once in the encoders (whole or a band; incl. the rotary code)
_QUERY_LIVE = 6  # 128-channel output rows alive at once in a tile's query path
_FEAT_LIVE = 4  # (128, h, w) maps alive per feature channel of the feature-agnostic code

Params = Mapping[str, torch.Tensor]
Norm = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, bool], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- weights
class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 1x1 conv, twice, plus the input (the computation is in the functions below)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_GROUPS, _DIM, eps=_GN_EPS), nn.SiLU(), nn.Conv2d(_DIM, _DIM, 1, bias=False),
            nn.GroupNorm(_GROUPS, _DIM, eps=_GN_EPS), nn.SiLU(), nn.Conv2d(_DIM, _DIM, 1, bias=False),
        )


def _encoder(in_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, _DIM, 1, bias=False), _ResBlock(), _ResBlock())


class _Basis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(_N_BASIS, 1, _BASIS_SIZE, _BASIS_SIZE))


class _Rope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        v = 2 * math.pi * 100.0 ** (-torch.linspace(0, 1, _DIM // 4))
        freqs = torch.zeros(2, _DIM)
        freqs[0, : _DIM // 2] = torch.cat([v, v])
        freqs[1, _DIM // 2 :] = torch.cat([v, v])
        self.freqs = nn.Parameter(freqs)


class _AttentionWeights(nn.Module):
    """The published multi-head attention's tensors (only the q and k thirds of the in-projection are used)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * _DIM, _DIM))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * _DIM))
        self.out_proj = nn.Linear(_DIM, _DIM)
        nn.init.xavier_uniform_(self.in_proj_weight)


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_q = nn.RMSNorm(_DIM)
        self.norm_k = nn.RMSNorm(_DIM)
        self.attention = _AttentionWeights()


class _CrossDecode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cross_attn = _CrossAttention()
        self.conv2d = nn.Conv2d(_DIM, _DIM, 3, padding=1, bias=False)


# ---------------------------------------------------------------------------------------------------- functions
def _dense_norm(x: torch.Tensor, i: int, weight: torch.Tensor, bias: torch.Tensor, inplace: bool) -> torch.Tensor:
    return F.group_norm(x, _GROUPS, weight, bias, _GN_EPS)


def _run_encoder(x: torch.Tensor, p: Params, name: str, norm: Norm, *, stop: int | None = None) -> torch.Tensor:
    """``name`` = 1x1 conv + two residual blocks on ``x (B,Cin,r,W)`` -> ``(B,128,r,W)``; ``norm(x, i, w, b,
    inplace)`` applies GroupNorm number i (0..3), overwriting x if ``inplace``. With ``stop=i`` returns the input of
    GroupNorm i instead."""
    x = _conv1x1(x, p[f"{name}.0.weight"])
    return _run_blocks(x, p, name, norm, stop=stop)


def _conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 conv ``(B,Ci,r,W) -> (B,Co,r,W)`` as one matrix product (faster than conv2d on CPU; takes
    row bands of a larger map without copying them)."""
    b, _, r, w = x.shape
    return torch.matmul(weight.flatten(1), x.flatten(2)).view(b, -1, r, w)


def _run_blocks(x: torch.Tensor, p: Params, name: str, norm: Norm, *, stop: int | None = None) -> torch.Tensor:
    """The two residual blocks ``name.1`` and ``name.2`` (see :func:`_run_encoder`)."""
    i = 0
    for blk in (1, 2):
        skip = x
        for half in (0, 3):
            if i == stop:
                return x
            pre = f"{name}.{blk}.block."
            t = F.silu(norm(x, i, p[f"{pre}{half}.weight"], p[f"{pre}{half}.bias"], half == 3), inplace=True)
            x = _conv1x1(t, p[f"{pre}{half + 2}.weight"])
            del t
            i += 1
        # in place without autograd: memory traffic, not arithmetic, bounds these maps
        x = x + skip if torch.is_grad_enabled() else x.add_(skip)
    return x


def _rope(x: torch.Tensor, freqs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Rotary code of ``x (B,128,r,W)`` at row coordinates ``rows (r,)`` and column coordinates ``cols (W,)``
    (float32 or float64); each channel has its own angle; rot pairs channel d with d+64."""
    f = freqs.to(rows.dtype)
    angle = rows.view(1, -1, 1) * f[0].view(-1, 1, 1) + cols.view(1, 1, -1) * f[1].view(-1, 1, 1)  # (128, r, W)
    sin = torch.sin(angle).to(x.dtype)
    cos = (angle.cos() if torch.is_grad_enabled() else angle.cos_()).to(x.dtype)
    del angle
    n = x.shape[1] // 2
    lo, hi = slice(0, n), slice(n, 2 * n)
    if torch.is_grad_enabled():  # autograd (fine-tuning): no out= / in-place ops
        return torch.cat([x[:, lo] * cos[lo] - x[:, hi] * sin[lo], x[:, hi] * cos[hi] + x[:, lo] * sin[hi]], dim=1)
    out = torch.empty_like(x)
    torch.mul(x[:, lo], cos[lo], out=out[:, lo]).addcmul_(x[:, hi], sin[lo], value=-1)  # rot(x) = [-x_hi, x_lo]
    torch.mul(x[:, hi], cos[hi], out=out[:, hi]).addcmul_(x[:, lo], sin[hi])
    return out


def _coord_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rms_proj(x: torch.Tensor, p: Params, which: str) -> torch.Tensor:
    """RMSNorm and the q (``which="q"``) or k in-projection of channels-last ``x (..., 128)`` -> ``(..., 128)``;
    queries come scaled by 1/sqrt(32) as the attention scales them."""
    pre = "cross_decode.cross_attn."
    x = F.rms_norm(x, (_DIM,), p[f"{pre}norm_{which}.weight"], eps=None)
    part = slice(0, _DIM) if which == "q" else slice(_DIM, 2 * _DIM)
    y = F.linear(x, p[f"{pre}attention.in_proj_weight"][part], p[f"{pre}attention.in_proj_bias"][part])
    return y * (1.0 / math.sqrt(_HEAD_DIM)) if which == "q" else y


def anyup_window_bounds(n_out: int, n_in: int, device: torch.device | str | None = None) -> torch.Tensor:
    """AnyUp's attention window along one axis, computed in float32 as the reference does.

    Args:
        n_out: output length (Ho or Wo).
        n_in: low-res length (h or w).

    Returns:
        ``(2, n_out)`` int64: for output index i, the low-res indices ``[lo_i, hi_i)`` it attends to
        (non-decreasing in i, never empty).
    """
    centre = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) / n_out
    lo = torch.floor(torch.clamp(centre - _WINDOW, 0, 1) * n_in)
    hi = torch.ceil(torch.clamp(centre + _WINDOW, 0, 1) * n_in)
    return torch.stack([lo, hi]).long()


def _window_mask(bounds: torch.Tensor, start: int, stop: int, band: tuple[int, int]) -> torch.Tensor:
    """``(stop-start, band_len)`` bool: which low-res indices of ``band`` each output index may see."""
    idx = torch.arange(band[0], band[1], device=bounds.device)
    lo, hi = bounds[0, start:stop, None], bounds[1, start:stop, None]
    return (idx >= lo) & (idx < hi)


def _mask_bias(rows_ok: torch.Tensor, cols_ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(Tr*Tc, br*bc)``: 0 where both the row and the column are in the window, -inf elsewhere."""
    ok = rows_ok[:, None, :, None] & cols_ok[None, :, None, :]
    bias = torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))
    return bias.view(rows_ok.shape[0] * cols_ok.shape[0], -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Head-averaged masked softmax weights applied to raw features.

    Args:
        q: (B, heads, Nq, 32), scaled queries.
        k: (B, heads, Nk, 32).
        v: (B, C, Nk), the raw features.
        bias: (Nq, Nk) additive mask.

    Returns:
        (B, C, Nq).
    """
    logits = torch.matmul(q, k.transpose(-1, -2)).add_(bias)
    weights = torch.softmax(logits, dim=-1)
    del logits
    return torch.matmul(v, weights.mean(dim=1).transpose(-1, -2))


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, N, 128) -> (B, heads, N, 32)."""
    return x.unflatten(-1, (_HEADS, _HEAD_DIM)).transpose(1, 2)


def _pool_rows_matrix(n_in: int, n_out: int, out_span: tuple[int, int], in_span: tuple[int, int],
                      like: torch.Tensor) -> torch.Tensor:
    """Rows of ``adaptive_avg_pool`` as a matrix: ``(out rows, in rows)`` weights 1/count of the input rows
    ``in_span`` that each output row of ``out_span`` averages."""
    i = torch.arange(out_span[0], out_span[1], device=like.device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    stop = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    j = torch.arange(in_span[0], in_span[1], device=like.device)
    inside = (j[None] >= start[:, None]) & (j[None] < stop[:, None])
    return inside.to(like.dtype) / (stop - start)[:, None].to(like.dtype)


def _input_span(n_in: int, n_out: int, a: int, b: int) -> tuple[int, int]:
    """The input rows ``adaptive_avg_pool`` output rows ``[a, b)`` average."""
    return (a * n_in) // n_out, ((b * n_in) + n_out - 1) // n_out


def _pooled_rows(source: Callable[[int, int], torch.Tensor], n_in: int, n_out: int, span: tuple[int, int],
                 out_w: int, chunk_rows: int) -> torch.Tensor:
    """Rows ``span`` of ``adaptive_avg_pool2d(full, (n_out, out_w))`` where ``source(s, e)`` gives rows ``[s, e)``
    of the full ``(B, Ch, n_in, W)`` map; reads at most ``chunk_rows`` rows at a time.

    Returns:
        (B, Ch, span rows, out_w).
    """
    s, e = _input_span(n_in, n_out, *span)
    out = None
    for c0, c1 in tile_spans(e - s, chunk_rows):
        x = source(s + c0, s + c1)
        if x.shape[-1] != out_w:
            x = F.adaptive_avg_pool2d(x, (c1 - c0, out_w))  # columns only
        if n_in == n_out:  # rows map one to one
            out = x.new_empty((*x.shape[:2], span[1] - span[0], out_w)) if out is None else out
            out[:, :, c0 : c1] = x
        else:
            term = torch.matmul(_pool_rows_matrix(n_in, n_out, span, (s + c0, s + c1), x), x)
            out = term if out is None else out.add_(term)
        del x
    return out


class _Moments:
    """Per (image, group) mean and variance of tensors seen band by band (Chan's merge, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        xs = (x if x.dtype in (torch.float32, torch.float64) else x.float()).reshape(x.shape[0], _GROUPS, -1)
        n_b = xs.shape[-1]
        mean = xs.mean(dim=-1)
        # two-pass within the band (torch.var_mean's Welford loop is several times slower here)
        m2 = torch.linalg.vector_norm(xs - mean[..., None], dim=-1).double().square()
        mean = mean.double()
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean, m2
            return
        n = self.n + n_b
        delta = mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n_b / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/sqrt(var + eps)), each (B, groups) float64."""
        return self.mean, torch.rsqrt(self.m2 / self.n + _GN_EPS)


def _stats_norm(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> Norm:
    """A GroupNorm that uses statistics gathered beforehand (one per GroupNorm index)."""

    def norm(x: torch.Tensor, i: int, weight: torch.Tensor, bias: torch.Tensor, inplace: bool) -> torch.Tensor:
        mean, rstd = stats[i]
        per = x.shape[1] // _GROUPS
        # x * scale + shift per channel, as torch's own GroupNorm kernel applies it
        scale = rstd.repeat_interleave(per, dim=1) * weight.double()  # (B, C)
        shift = bias.double() - mean.repeat_interleave(per, dim=1) * scale
        scale, shift = scale.to(x.dtype)[..., None, None], shift.to(x.dtype)[..., None, None]
        return x.mul_(scale).add_(shift) if inplace else torch.addcmul(shift, x, scale)

    return norm


class _BandEncoders:
    """The full-resolution encoders of one image computed on bands of image rows, with every GroupNorm's
    statistics gathered over the whole image first (one pass per GroupNorm). With ``keep_code`` the image encoder's
    output (after the rotary code, ``(1,128,H,W)``) is computed once and kept, instead of once per later pass."""

    def __init__(self, image: torch.Tensor, p: Params, chunk_rows: int, *, keep_code: bool = False) -> None:
        self.image, self.p, self.chunk = image, p, chunk_rows
        self.code: torch.Tensor | None = None
        h, w = image.shape[-2:]
        cdt = _coord_dtype(image.dtype)
        self.rows = torch.linspace(0, 1, h, dtype=cdt, device=image.device)
        self.cols = torch.linspace(0, 1, w, dtype=cdt, device=image.device)
        self.stats: dict[str, list] = {"image_encoder": [], "query_encoder": [], "key_encoder": []}
        spans = list(tile_spans(h, chunk_rows))
        for i in range(4):
            acc = _Moments()
            for s, e in spans:
                acc.add(self._image_rows(s, e, stop=i))
            self.stats["image_encoder"].append(acc.result())
        if keep_code:
            code = image.new_empty((image.shape[0], _DIM, h, w))
            for s, e in spans:
                code[:, :, s:e] = self._image_rows(s, e)
            self.code = code
        for i in range(4):
            accs = {"query_encoder": _Moments(), "key_encoder": _Moments()}
            for s, e in spans:
                r = self._image_rows(s, e)
                for name, acc in accs.items():
                    acc.add(_run_encoder(r, p, name, _stats_norm(self.stats[name]), stop=i))
            for name, acc in accs.items():
                self.stats[name].append(acc.result())

    def _image_rows(self, s: int, e: int, *, stop: int | None = None) -> torch.Tensor:
        if stop is None and self.code is not None:
            return self.code[:, :, s:e]
        x = _run_encoder(self.image[:, :, s:e], self.p, "image_encoder", _stats_norm(self.stats["image_encoder"]),
                         stop=stop)
        return x if stop is not None else _rope(x, self.p["rope.freqs"], self.rows[s:e], self.cols)

    def branch_rows(self, name: str, s: int, e: int) -> torch.Tensor:
        """Rows ``[s, e)`` of encoder ``name`` (query_encoder, key_encoder) at full resolution: (1, 128, e-s, W)."""
        return _run_encoder(self._image_rows(s, e), self.p, name, _stats_norm(self.stats[name]))


# ---------------------------------------------------------------------------------------------------- module
@dataclass(frozen=True)
class AnyUpTilePlan:
    """How :class:`AnyUpUpsampler` splits one image.

    Attributes:
        encoder_rows: image rows per encoder band (>= H: the full-resolution encoders run whole, in one pass).
        keep_image_code: banded encoders keep the image encoder's output (one 128-channel full-resolution map)
            rather than recomputing it in each later pass; chosen when it takes at most half the budget.
        feature_chunk: positions of the C axis per chunk of the feature-agnostic code (>= C: one piece).
        tile_rows, tile_cols: output rows and columns per attention tile.
    """

    encoder_rows: int
    keep_image_code: bool
    feature_chunk: int
    tile_rows: int
    tile_cols: int


class AnyUpUpsampler(nn.Module):
    """AnyUp: any-backbone window-attention feature upsampler (random weights until loaded; see :func:`load_anyup`).

    Args:
        variant: ``"paper"`` or ``"multi-backbone"`` (same layout; names which published weights it holds).
        max_tile_bytes: budget of one step's intermediates (attention tile, encoder band, feature chunk); None =
            the dense reference computation in one piece.

    The state dict has exactly the published file's 73 keys.
    """

    kind: ClassVar[str] = "anyup"
    dim: ClassVar[None] = None  # any channel count
    lowres_normalized: ClassVar[bool] = False

    def __init__(self, variant: str = "paper", *, max_tile_bytes: int | None = DEFAULT_MAX_TILE_BYTES) -> None:
        super().__init__()
        if variant not in ANYUP_VARIANTS:
            raise ConfigError(f"AnyUpUpsampler: unknown variant {variant!r}; choose one of {sorted(ANYUP_VARIANTS)}")
        if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or int(max_tile_bytes) < 1):
            raise ConfigError(f"AnyUpUpsampler: max_tile_bytes must be a positive byte count or None, "
                              f"got {max_tile_bytes!r}")
        self.variant = variant
        self.max_tile_bytes = None if max_tile_bytes is None else int(max_tile_bytes)
        self.image_encoder = _encoder(3)
        self.key_encoder = _encoder(_DIM)
        self.query_encoder = _encoder(_DIM)
        self.key_features_encoder = nn.Sequential(_Basis(), _ResBlock(), _ResBlock())
        self.cross_decode = _CrossDecode()
        self.aggregation = nn.Sequential(
            nn.Conv2d(2 * _DIM, _DIM, 3, padding=1, padding_mode="reflect", bias=False), _ResBlock(), _ResBlock()
        )
        self.rope = _Rope()

    # ------------------------------------------------------------------ protocol
    def forward(
        self, lowres: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Upsample backbone features guided by the image.

        Args:
            lowres: (B, C, h, w) float, any C, h and w >= 2: last-layer patch tokens after the final norm.
            image: (B, 3, H, W) ImageNet-normalised RGB.
            output_size: (Ho, Wo) >= (h, w); default (H, W). Any ratio to the image.

        Returns:
            (B, C, Ho, Wo) in lowres' dtype (computed in it; window bounds in float32).
        """
        return self.upsample_prepared(self.prepare_lowres(lowres), image, output_size)

    def prepare_lowres(self, lowres: torch.Tensor) -> torch.Tensor:
        """The identity: AnyUp takes the backbone's features as they are."""
        return lowres

    def upsample_prepared(
        self, lowres_prepared: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Same as :meth:`forward` (``prepare_lowres`` is the identity)."""
        feats = lowres_prepared
        out_size = check_upsample_args(feats, image, output_size, name="AnyUpUpsampler")
        if not feats.is_floating_point():
            raise InputSizeError(f"AnyUpUpsampler: lowres must be a float tensor, got {feats.dtype}")
        if min(feats.shape[-2:]) < 2:
            raise InputSizeError(
                f"AnyUpUpsampler: the feature grid must be at least 2x2 (a reflect-padded 3x3 conv), got "
                f"{tuple(feats.shape[-2:])}"
            )
        dtype = feats.dtype
        p = {k: v.to(device=feats.device, dtype=dtype) for k, v in self.named_parameters()}
        # the rotary angles reach ~15 rad: frequencies and angles stay in float32 (float64) in half precision
        p["rope.freqs"] = self.rope.freqs.to(device=feats.device, dtype=_coord_dtype(dtype))
        img = image.to(dtype)
        if self.max_tile_bytes is None:
            return self._dense(feats, img, out_size, p)
        out = feats.new_empty((feats.shape[0], feats.shape[1], *out_size))
        for i in range(feats.shape[0]):
            self._tiled(feats[i : i + 1], img[i : i + 1], out[i : i + 1], p)
        return out

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description ``{"kind": "anyup", "variant": ..., "dim": None}`` (the tile budget changes no
        output, so it is not part of it)."""
        return {"kind": self.kind, "variant": self.variant, "dim": None}

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> "AnyUpUpsampler":
        """Rebuild (random parameters) from :meth:`config_dict` output; ``kwargs`` go to the constructor."""
        if config.get("kind") != cls.kind:
            raise ConfigError(f"AnyUpUpsampler.from_config_dict: kind must be 'anyup', got {config.get('kind')!r}")
        return cls(config.get("variant", "paper"), **kwargs)

    # ------------------------------------------------------------------ dense reference
    def _dense(self, feats: torch.Tensor, img: torch.Tensor, out_size: tuple[int, int], p: Params) -> torch.Tensor:
        """The reference computation, whole maps and dense masked attention: (B, C, Ho, Wo)."""
        (b, c, h, w), (ho, wo) = feats.shape, out_size
        cdt = _coord_dtype(img.dtype)
        rows = torch.linspace(0, 1, img.shape[-2], dtype=cdt, device=img.device)
        cols = torch.linspace(0, 1, img.shape[-1], dtype=cdt, device=img.device)
        enc = _rope(_run_encoder(img, p, "image_encoder", _dense_norm), p["rope.freqs"], rows, cols)
        q = F.adaptive_avg_pool2d(_run_encoder(enc, p, "query_encoder", _dense_norm), (ho, wo))
        k_img = F.adaptive_avg_pool2d(_run_encoder(enc, p, "key_encoder", _dense_norm), (h, w))
        del enc
        q = F.conv2d(q, p["cross_decode.conv2d.weight"], padding=1)
        k = self._keys(feats, k_img, p, chunk=c)
        q = _rms_proj(q.flatten(2).transpose(1, 2), p, "q")  # (B, Ho*Wo, 128)
        rb, cb = anyup_window_bounds(ho, h, feats.device), anyup_window_bounds(wo, w, feats.device)
        bias = _mask_bias(_window_mask(rb, 0, ho, (0, h)), _window_mask(cb, 0, wo, (0, w)), q.dtype)
        return _attend(_heads(q), _heads(k.flatten(1, 2)), feats.flatten(2), bias).view(b, c, ho, wo)

    # ------------------------------------------------------------------ shared pieces
    def _keys(self, feats: torch.Tensor, k_img: torch.Tensor, p: Params, *, chunk: int) -> torch.Tensor:
        """Projected keys (B, h, w, 128) from the pooled image keys ``k_img (B,128,h,w)`` and the features."""
        k_feat = _run_blocks(_feature_code(feats, p["key_features_encoder.0.basis"], chunk), p,
                             "key_features_encoder", _dense_norm)
        k = F.conv2d(F.pad(torch.cat([k_img, k_feat], dim=1), (1, 1, 1, 1), mode="reflect"), p["aggregation.0.weight"])
        k = _run_blocks(k, p, "aggregation", _dense_norm)
        return _rms_proj(k.permute(0, 2, 3, 1), p, "k")

    # ------------------------------------------------------------------ tiled
    def tile_plan(self, channels: int, lowres_size: tuple[int, int], image_size: tuple[int, int],
                  output_size: tuple[int, int], elem_bytes: int = 4) -> AnyUpTilePlan:
        """How one image is split under ``max_tile_bytes`` (None: everything in one piece).

        Args:
            channels: C. lowres_size: (h, w). image_size: (H, W). output_size: (Ho, Wo).
            elem_bytes: bytes per element of the working dtype.
        """
        (h, w), (big_h, big_w), (ho, wo) = lowres_size, image_size, output_size
        budget, item = self.max_tile_bytes, elem_bytes
        if budget is None:
            return AnyUpTilePlan(big_h, False, channels, ho, wo)
        row_bytes = big_w * _DIM * item  # one row of one full-resolution map
        enc_rows = rows_per_tile(big_h, row_bytes * _ENC_LIVE, budget)
        keep = enc_rows < big_h and 2 * big_h * row_bytes <= budget  # the image code takes at most half the budget
        if keep:
            enc_rows = rows_per_tile(big_h, row_bytes * _ENC_LIVE, budget - big_h * row_bytes)
        feat_chunk = rows_per_tile(channels, _N_BASIS * h * w * item * _FEAT_LIVE, budget)
        # tiles of at most _TILE of the output per side (but >= _MIN_TILE): a tile's key band is then about 1.5
        # windows, and small outputs are not cut into pieces that cost more in calls than they save in work
        tr_cap, tc_cap = max(_MIN_TILE, math.ceil(_TILE * ho)), max(_MIN_TILE, math.ceil(_TILE * wo))
        band = (min(h, math.ceil(2 * _WINDOW * h + tr_cap * h / ho) + 2)
                * min(w, math.ceil(2 * _WINDOW * w + tc_cap * w / wo) + 2))
        per_query = band * (2 * _HEADS * item + 2 * item + 1) + (channels + 2 * _DIM) * item
        tc = rows_per_tile(min(tc_cap, wo), per_query, budget)
        tr = rows_per_tile(min(tr_cap, ho), wo * _DIM * item * _QUERY_LIVE + tc * per_query, budget)
        return AnyUpTilePlan(enc_rows, keep, feat_chunk, tr, tc)

    def _tiled(self, feats: torch.Tensor, img: torch.Tensor, out: torch.Tensor, p: Params) -> None:
        """One image in bounded memory; writes ``out (1, C, Ho, Wo)``."""
        _, c, h, w = feats.shape
        big_h, big_w = img.shape[-2:]
        ho, wo = out.shape[-2:]
        plan = self.tile_plan(c, (h, w), (big_h, big_w), (ho, wo), feats.element_size())
        enc_rows = plan.encoder_rows
        if enc_rows >= big_h:  # the encoders fit whole: one pass, as the reference
            cdt = _coord_dtype(img.dtype)
            rows = torch.linspace(0, 1, big_h, dtype=cdt, device=img.device)
            cols = torch.linspace(0, 1, big_w, dtype=cdt, device=img.device)
            enc = _rope(_run_encoder(img, p, "image_encoder", _dense_norm), p["rope.freqs"], rows, cols)
            q_full = _run_encoder(enc, p, "query_encoder", _dense_norm)
            k_img = F.adaptive_avg_pool2d(_run_encoder(enc, p, "key_encoder", _dense_norm), (h, w))
            del enc

            def q_source(s: int, e: int) -> torch.Tensor:
                return q_full[:, :, s:e]
        else:
            bands = _BandEncoders(img, p, enc_rows, keep_code=plan.keep_image_code)
            k_img = _pooled_rows(lambda s, e: bands.branch_rows("key_encoder", s, e), big_h, h, (0, h), w, enc_rows)

            def q_source(s: int, e: int) -> torch.Tensor:
                return bands.branch_rows("query_encoder", s, e)

        k = self._keys(feats, k_img, p, chunk=plan.feature_chunk)[0]  # (h, w, 128)
        v = feats[0]  # (C, h, w)
        rb, cb = anyup_window_bounds(ho, h, feats.device), anyup_window_bounds(wo, w, feats.device)
        row_lo, row_hi = rb.tolist()
        col_lo, col_hi = cb.tolist()
        tr, tc = plan.tile_rows, plan.tile_cols
        conv_w = p["cross_decode.conv2d.weight"]
        for r0, r1 in tile_spans(ho, tr):
            a, b = max(r0 - 1, 0), min(r1 + 1, ho)
            qp = _pooled_rows(q_source, big_h, ho, (a, b), wo, enc_rows)
            qp = F.pad(qp, (1, 1, int(r0 == 0), int(r1 == ho)))  # the 3x3 conv's zero padding at the border
            q = _rms_proj(F.conv2d(qp, conv_w)[0].permute(1, 2, 0), p, "q")  # (Tr, Wo, 128)
            del qp
            band_r = (row_lo[r0], row_hi[r1 - 1])
            rows_ok = _window_mask(rb, r0, r1, band_r)
            for c0, c1 in tile_spans(wo, tc):
                band_c = (col_lo[c0], col_hi[c1 - 1])
                bias = _mask_bias(rows_ok, _window_mask(cb, c0, c1, band_c), q.dtype)
                kb = k[band_r[0] : band_r[1], band_c[0] : band_c[1]].reshape(1, -1, _DIM)
                vb = v[:, band_r[0] : band_r[1], band_c[0] : band_c[1]].reshape(1, c, -1)
                qt = q[:, c0:c1].reshape(1, -1, _DIM)
                o = _attend(_heads(qt), _heads(kb), vb, bias)  # (1, C, Tr*Tc)
                out[0, :, r0:r1, c0:c1] = o[0].view(c, r1 - r0, c1 - c0)


def _feature_code(feats: torch.Tensor, basis: torch.Tensor, chunk: int) -> torch.Tensor:
    """AnyUp's feature-agnostic code of ``feats (B,C,h,w)``: (B, 128, h, w), computed ``chunk`` positions of the
    C axis at a time (``chunk >= C``: in one piece, as the reference)."""
    b, c, h, w = feats.shape
    fn = F.normalize(feats, dim=1, eps=1e-12)
    pad = _BASIS_SIZE // 2
    ones = torch.ones((1, 1, h, w), dtype=feats.dtype, device=feats.device)
    taps = F.conv2d(ones, torch.ones((1, 1, _BASIS_SIZE, _BASIS_SIZE), dtype=feats.dtype, device=feats.device),
                    padding=pad)  # kernel taps inside the map
    if chunk >= c:
        y = F.conv2d(fn, basis.repeat(c, 1, 1, 1), padding=pad, groups=c) / taps  # channel c*128 + k
        return torch.softmax(y.view(b, _N_BASIS, c, h, w), dim=1).mean(dim=2)  # reshaped, not permuted
    total = None
    for j0, j1 in tile_spans(c, chunk):
        # flat channel i*C + j of the reshaped (128, C) view is input channel (i*C+j)//128, filter (i*C+j)%128
        flat = (torch.arange(_N_BASIS, device=feats.device)[:, None] * c
                + torch.arange(j0, j1, device=feats.device)[None]).flatten()
        y = F.conv2d(fn[:, flat // _N_BASIS], basis[flat % _N_BASIS], padding=pad, groups=flat.numel()) / taps
        part = torch.softmax(y.view(b, _N_BASIS, j1 - j0, h, w), dim=1).sum(dim=2).double()
        del y
        # chunks summed in float64: the code is ~1/128 everywhere and the key GroupNorm that follows magnifies its
        # errors
        total = part if total is None else total.add_(part)
    return (total / c).to(feats.dtype)


def load_anyup(
    obj: Mapping[str, Any], *, variant: str, name: str, max_tile_bytes: int | None = DEFAULT_MAX_TILE_BYTES
) -> AnyUpUpsampler:
    """A published AnyUp checkpoint as an :class:`AnyUpUpsampler` in eval mode (float32 parameters).

    Args:
        obj: what :func:`featup_ops.tensor_files.read_tensor_file` returned for ``anyup_paper.pth`` or
            ``anyup_multi_backbone.pth`` (a plain 73-key state dict; the unused value/output projections included).
        variant: ``"paper"`` or ``"multi-backbone"``.
        name: the file, for errors.
        max_tile_bytes: see :class:`AnyUpUpsampler`.

    Raises:
        ConfigError: unknown variant.
        CheckpointError: a missing, unexpected or mis-shaped key (named, one line), or a non-tensor value.
    """
    model = AnyUpUpsampler(variant, max_tile_bytes=max_tile_bytes)
    tensors = tensor_mapping(obj, name)
    problems = state_dict_mismatches(tensors, model.state_dict(), source="file")
    if problems:
        raise CheckpointError(
            f"weights file {name} is not an AnyUp checkpoint: {problems}; pass the publisher's anyup_paper.pth or "
            "anyup_multi_backbone.pth unchanged"
        )
    model.load_state_dict(tensors, strict=True)
    return model.eval()
