"""LoftUp (Huang et al., ICCV'25, MIT licence): the published checkpoints, computed per image in bounded memory.

LoftUp upsamples backbone features ``F (B,D,h,w)`` to the size of the guidance image by cross-attention: every
output pixel becomes a ``D+20``-channel query built from a Fourier encoding of its coordinates and colour passed
through two 3x3 convolutions, and attends (2 layers, 4 heads) to all ``h*w`` low-res tokens (the channel-normalised
features with a 20-channel sine code of the grid). A 1x1 conv and a LayerNorm give the ``D`` output channels.

Steps, with ``c = D + 20`` (our own description of what the publisher's code computes):

1. ``prepare_lowres``: LayerNorm(D) over channels at each token (eps 1e-5): the file's ``channelnorm``.
2. Guidance: the image resized (bilinear, half-pixel, no antialias) to the output size when that differs from the
   image size; each colour channel min-max scaled to [-0.5, 0.5] (``(x - min) / max(max - min, 1e-4) - 0.5``).
3. Fourier features (203 ch): the 5 channels [row ``linspace(-1,1,H)``, column ``linspace(-1,1,W)``, 3 colours]
   times 20 frequencies ``exp(linspace(-2,10,20))`` (channel ``freq*5 + coord``), plus the biases of
   ``fourier_feat.1.biases (2,5,20)`` each half reshaped (not transposed) to 100; ``[sin, cos, colour]``.
4. ``first_conv``: LayerNorm(203), 3x3 conv -> c, BatchNorm (running statistics), ReLU, 3x3 conv c -> c, BN, ReLU.
5. Tokens: ``[LN(F), sine code]`` with the code from ``linspace`` grids times ``exp(linspace(-2,10,5))`` plus
   ``lr_pe.biases (2,2,5)`` reshaped to (2,10): ``[sin (10), cos (10)]``.
6. Two layers of ``q += MHA(LN_q(q), LN_kv(t), LN_kv(t))`` (4 heads of ``c/4``), ``q += FFN(q)``
   (LN, Linear c -> D, exact GELU, Linear D -> c); a final LayerNorm(c).
7. ``final_conv``: 1x1 conv c -> D, then LayerNorm(D) over channels (eps 1e-6).

Exactness: the coordinates and frequencies are made with ``torch.linspace`` and ``torch.exp(torch.linspace(...))``
in float32, in this order (the Fourier arguments reach ``e^10 * 1``, so any other rounding moves sin/cos by ~1e-3);
the Fourier features are computed in float32 (float64 when the features are float64) whatever the working dtype.

Deliberate differences from the publisher's code:

* **Per-image colour scaling.** Upstream takes the colour min and max over the whole batch, so a batched image's
  output depends on its batch-mates (by up to ~5 in the golden fixture). Here each image is scaled by its own min and
  max, i.e. every row equals what upstream computes for that image alone.
* **BatchNorm always uses its running statistics** (upstream's torch.hub model comes back in training mode, where
  BN would use batch statistics: again a batch dependency). ``load_loftup`` also returns the module in eval mode.
* **Bounded memory.** The queries are computed, attended and projected in tiles of output pixels (full-width row
  bands, or square-ish blocks when the output is wide; each with the 2-pixel halo the two 3x3 convs need, zero
  padding only at the true image border), so neither the ``(B,c,H,W)`` first-conv map nor the attention scores
  ever exist at full size; the attention is ``scaled_dot_product_attention`` per tile (head dims zero-padded to a
  multiple of 8 so CUDA's fused kernels apply). Peak memory beyond the output and the low-res keys/values is about
  ``max_tile_bytes`` (under ``torch.no_grad``; with autograd on, every tile's activations are kept). A tiled result
  equals the one-tile ("dense", ``max_tile_bytes=None``) result to float rounding. Tile sizes come from
  :func:`loftup_tile_shape` (2-D and halo-aware, so not the shared row-only ``attention_tiles.rows_per_tile``;
  the tiles are walked with ``attention_tiles.tile_spans``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_tiles import tile_spans
from .baselines import check_upsample_args
from .errors import CheckpointError, ConfigError, InputSizeError
from .published import PUBLISHED
from .tensor_files import tensor_mapping
from .weights import state_dict_mismatches

__all__ = [
    "DEFAULT_MAX_TILE_BYTES",
    "LOFTUP_FILENAME",
    "LOFTUP_VARIANTS",
    "LoftUpUpsampler",
    "LoftUpVariant",
    "load_loftup",
    "loftup_tile_shape",
]

#: Default memory budget of one tile of output pixels (bytes).
DEFAULT_MAX_TILE_BYTES = 256 * 2**20
#: The file every published LoftUp repo holds (a ``torch.save`` of the 54-key wrapper state dict).
LOFTUP_FILENAME = "pytorch_model.bin"

_IMG_FREQS = 20  # frequencies of the guidance encoding
_IMG_COORDS = 5  # row, column, 3 colours
_FOURIER_CH = 2 * _IMG_FREQS * _IMG_COORDS + 3  # sin, cos, colour = 203
_PE_FREQS = 5  # frequencies of the low-res grid code
_PE_CH = 2 * 2 * _PE_FREQS  # sin, cos of (row, column) x 5 = 20
_FREQ_RANGE = (-2.0, 10.0)  # log-frequencies, linspace endpoints
_HEADS = 4
_LAYERS = 2
_COLOUR_EPS = 1e-4
_HEAD_ALIGN = 8  # head dims are zero-padded to a multiple of this, so fused (flash / memory-efficient) kernels apply


@dataclass(frozen=True)
class LoftUpVariant:
    """One published LoftUp checkpoint.

    Attributes:
        dim: feature channels D it upsamples.
        hf_repo: Hugging Face repo holding :data:`LOFTUP_FILENAME`.
        hub_entry: the publisher's torch.hub entry (``andrehuang/loftup``).
        backbone: the backbone whose last-layer patch tokens (after the final norm) it was trained on.
    """

    dim: int
    hf_repo: str
    hub_entry: str
    backbone: str

    @property
    def url(self) -> str:
        """Download address of the checkpoint file."""
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{LOFTUP_FILENAME}"


#: Every published checkpoint (publisher: github.com/andrehuang/loftup, MIT), by this project's variant name, derived
#: from the registry (:data:`featup_ops.published.PUBLISHED`, the one place the files' facts are written down).
LOFTUP_VARIANTS: dict[str, LoftUpVariant] = {
    row.variant: LoftUpVariant(int(row.dim), str(row.hf_repo), "loftup_" + str(row.hf_repo).rsplit("/loftup-", 1)[1],
                               row.note)
    for row in PUBLISHED.values() if row.kind == "loftup"
}


def loftup_tile_shape(
    max_tile_bytes: int | None, *, batch: int, out_h: int, out_w: int, dim: int, n_tokens: int, elem_bytes: int
) -> tuple[int, int]:
    """Output rows and columns of one tile so that its intermediates fit ``max_tile_bytes``.

    A tile of ``r x c`` output pixels computes ``(r+4) x (c+4)`` guidance pixels (the 2-pixel halo of the two 3x3
    convs). Tiles span the full width when ``out_w + 4`` is at most the side of the square the budget allows, and
    are square-ish otherwise (least halo per pixel); sizes are then evened out so that no thin remainder tile is
    left (3 tiles of 75 columns rather than 111 + 111 + 2). The cost per computed pixel counts the Fourier features
    (float32; float64 for float64 work) and ``11 * (D + 20)`` working values, plus the attention scores for float64
    only, the one dtype without a fused attention kernel on CUDA (the CPU kernels never hold them). Calibration on
    CPU (D = 384, 32^2 tokens): tiles of 60-140 px squared peaked at 12-14.6 kB per computed pixel in float32 (the
    estimate: 20.2 kB) and 34 kB in float64, so a tile's real peak is about 0.6-0.7 of the budget.

    Args:
        max_tile_bytes: budget; None = one tile (the whole output).
        batch: images computed together in a tile.
        out_h, out_w: output size.
        dim: feature channels D.
        n_tokens: low-res tokens h*w.
        elem_bytes: bytes per element of the working dtype.

    Returns:
        ``(rows, cols)`` per tile, within ``[1, out_h] x [1, out_w]``.
    """
    if max_tile_bytes is None:
        return out_h, out_w
    c = dim + _PE_CH
    fourier_bytes = 8 if elem_bytes >= 8 else 4
    scores = 2 * _HEADS * n_tokens if elem_bytes >= 8 else 0
    per_pixel = batch * (fourier_bytes * 3 * _FOURIER_CH + elem_bytes * (11 * c + scores))
    pixels = int(max_tile_bytes) // per_pixel  # computed pixels, halo included
    cols = out_w if (out_w + 4) ** 2 <= pixels else max(1, math.isqrt(pixels) - 4)
    cols = max(1, min(out_w, cols))
    rows = max(1, min(out_h, pixels // (cols + 4) - 4))
    # equal tiles, no thin remainder: n tiles of ceil(size / n)
    return -(-out_h // -(-out_h // rows)), -(-out_w // -(-out_w // cols))


class _Biases(nn.Module):
    """A holder of one learned bias tensor named ``biases`` (the publisher's key layout)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(*shape))


class _ChannelLayerNorm(nn.Module):
    """A holder of ``norm = LayerNorm(n)`` applied over the channels of ``(B, n, H, W)`` maps."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n, eps=eps)


class _AttentionWeights(nn.Module):
    """Multi-head attention parameters in ``nn.MultiheadAttention``'s layout (packed q/k/v in-projection)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = nn.Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)


class _CrossAttention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(c)
        self.norm_kv = nn.LayerNorm(c)
        self.attention = _AttentionWeights(c)


class _FeedForward(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.ModuleDict({"0": nn.LayerNorm(c), "1": nn.Linear(c, hidden), "4": nn.Linear(hidden, c)})


class _Transformer(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_CrossAttention(c), _FeedForward(c, hidden)]) for _ in range(_LAYERS)
        )
        self.norm = nn.LayerNorm(c)


class _Core(nn.Module):
    """The publisher's ``upsampler`` parameters (key names as in ``pytorch_model.bin``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        c = dim + _PE_CH
        self.lr_pe = _Biases(2, 2, _PE_FREQS)
        self.fourier_feat = nn.ModuleDict({"1": _Biases(2, _IMG_COORDS, _IMG_FREQS)})
        self.first_conv = nn.ModuleDict({
            "0": _ChannelLayerNorm(_FOURIER_CH),
            "1": nn.Conv2d(_FOURIER_CH, c, 3, padding=1),
            "2": nn.BatchNorm2d(c),
            "4": nn.Conv2d(c, c, 3, padding=1),
            "5": nn.BatchNorm2d(c),
        })
        self.final_conv = nn.ModuleDict({"0": nn.Conv2d(c, dim, 1), "1": nn.LayerNorm(dim, eps=1e-6)})
        self.ca_transformer = _Transformer(c, dim)


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype)


def _layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` with ``ln``'s parameters cast to ``x``'s dtype."""
    return F.layer_norm(x, ln.normalized_shape, _cast(ln.weight, x), _cast(ln.bias, x), ln.eps)


def _channel_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channels of ``(B, n, H, W)``."""
    return _layer_norm(x.permute(0, 2, 3, 1), ln).permute(0, 3, 1, 2)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, _cast(weight, x), _cast(bias, x))


def _add_linear(q: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``q + linear(x)`` for (B, n, k) ``x`` in one product (``addmm``: no separate (B, n, c) temporary)."""
    out = torch.addmm(q.reshape(-1, q.shape[-1]), x.reshape(-1, x.shape[-1]), _cast(weight, x).t())
    return out.add_(_cast(bias, x)).view(q.shape)


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` without its own padding (the caller pads)."""
    return F.conv2d(x, _cast(conv.weight, x), _cast(conv.bias, x))


def _bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm (running statistics, always) then ReLU."""
    y = F.batch_norm(
        x, _cast(bn.running_mean, x), _cast(bn.running_var, x), _cast(bn.weight, x), _cast(bn.bias, x),
        training=False, eps=bn.eps,
    )
    return F.relu_(y)  # in place on BN's fresh output (BN's backward needs its input, not its output)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n, c) -> (B, heads, n, c/heads) zero-padded to a multiple of 8: zeros add nothing to the dot products
    (the scale is passed explicitly) and give zero output columns, but make CUDA's fused kernels eligible (the head
    dim c/4 = 101 for D = 384 is not)."""
    b, n, c = x.shape
    hd = c // _HEADS
    x = x.view(b, n, _HEADS, hd).transpose(1, 2)
    return F.pad(x, (0, -hd % _HEAD_ALIGN))


def _grid(n: int, device: torch.device) -> torch.Tensor:
    """``linspace(-1, 1, n)`` in float32 (the recipe that matches the publisher bit for bit)."""
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float32, device=device)


def _freqs(n: int, device: torch.device) -> torch.Tensor:
    """``exp(linspace(-2, 10, n))`` in float32."""
    return torch.exp(torch.linspace(*_FREQ_RANGE, n, dtype=torch.float32, device=device))


class LoftUpUpsampler(nn.Module):
    """LoftUp for one published variant (or any D with random weights), per image and memory-bounded.

    Args:
        variant: a key of :data:`LOFTUP_VARIANTS`; None with ``dim`` = an unpublished size, named ``"custom"``.
        dim: feature channels D; checked against the variant's when both are given.
        max_tile_bytes: memory budget of one tile of output pixels; None = the whole output in one tile (dense).

    Parameters are randomly initialised (Fourier and grid biases N(0,1), PyTorch's defaults elsewhere); load a
    published file with :func:`load_loftup`. The state dict has exactly the published file's 54 keys.
    """

    kind: ClassVar[str] = "loftup"
    lowres_normalized: ClassVar[bool] = True

    def __init__(
        self,
        variant: str | None = None,
        *,
        dim: int | None = None,
        max_tile_bytes: int | None = DEFAULT_MAX_TILE_BYTES,
    ) -> None:
        super().__init__()
        if variant is None and dim is None:
            variant = "dinov2s"
        if variant is not None:
            if variant not in LOFTUP_VARIANTS:
                raise ConfigError(
                    f"LoftUpUpsampler: unknown variant {variant!r}; choose one of {sorted(LOFTUP_VARIANTS)}"
                )
            vdim = LOFTUP_VARIANTS[variant].dim
            if dim is not None and int(dim) != vdim:
                raise ConfigError(
                    f"LoftUpUpsampler: variant {variant!r} has D={vdim}, not dim={dim}; drop dim or pick a "
                    f"variant with D={dim}"
                )
            dim = vdim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"LoftUpUpsampler: dim must be a positive channel count, got {dim}")
        if (int(dim) + _PE_CH) % _HEADS:
            raise ConfigError(f"LoftUpUpsampler: dim + {_PE_CH} must divide into {_HEADS} heads, got dim={dim}")
        if max_tile_bytes is not None and int(max_tile_bytes) < 1:
            raise ConfigError(f"LoftUpUpsampler: max_tile_bytes must be positive or None, got {max_tile_bytes}")
        self.variant = variant or "custom"
        self.dim = int(dim)
        self.max_tile_bytes = None if max_tile_bytes is None else int(max_tile_bytes)
        self.upsampler = _Core(self.dim)
        self.channelnorm = _ChannelLayerNorm(self.dim)

    # ------------------------------------------------------------------ protocol
    def forward(
        self, lowres: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Upsample raw backbone features.

        Args:
            lowres: (B, D, h, w) float, the backbone's patch tokens (before LoftUp's own LayerNorm).
            image: (B, 3, H, W) ImageNet-normalised RGB (the guidance).
            output_size: (Ho, Wo) >= (h, w); default (H, W).

        Returns:
            (B, D, Ho, Wo) in lowres' dtype; ``== upsample_prepared(prepare_lowres(lowres), image, output_size)``.
        """
        return self.upsample_prepared(self.prepare_lowres(lowres), image, output_size)

    def prepare_lowres(self, lowres: torch.Tensor) -> torch.Tensor:
        """The file's ``channelnorm``: LayerNorm(D) over the channels of each token (eps 1e-5).

        Args:
            lowres: (B, D, h, w) float.

        Returns:
            (B, D, h, w), same dtype.
        """
        if not torch.is_tensor(lowres) or lowres.dim() != 4:
            raise InputSizeError(
                f"LoftUpUpsampler: lowres must be a (B,C,h,w) tensor, got {getattr(lowres, 'shape', type(lowres))}"
            )
        if lowres.shape[1] != self.dim:
            raise InputSizeError(
                f"LoftUpUpsampler: variant {self.variant!r} is built for {self.dim} channels but lowres has "
                f"{lowres.shape[1]}; use the LoftUp variant of your backbone"
            )
        return _channel_norm(lowres, self.channelnorm.norm)

    def upsample_prepared(
        self, lowres_prepared: torch.Tensor, image: torch.Tensor, output_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Everything after :meth:`prepare_lowres`, tile by tile of output pixels (the whole batch at once when it
        fits one tile, otherwise image by image).

        Args:
            lowres_prepared: (B, D, h, w) float, channel-normalised features.
            image: (B, 3, H, W) ImageNet-normalised RGB.
            output_size: (Ho, Wo) >= (h, w); default (H, W). The guidance is resized to it first (bilinear,
                half-pixel, no antialias), as the publisher's example does for smaller outputs.

        Returns:
            (B, D, Ho, Wo) in lowres_prepared's dtype.
        """
        ho, wo = check_upsample_args(lowres_prepared, image, output_size, name="LoftUpUpsampler", dim=self.dim)
        feats = lowres_prepared
        guide = self._scaled_guidance(image, (ho, wo), feats.dtype)
        keys, values = self._keys_values(feats)
        b, n_tokens = feats.shape[0], feats.shape[-2] * feats.shape[-1]
        size = dict(out_h=ho, out_w=wo, dim=self.dim, n_tokens=n_tokens, elem_bytes=feats.element_size())
        if self.tile_shape(batch=b, **size) == (ho, wo):  # the whole batch in one tile
            return self._tile(guide, keys, values, (0, ho), (0, wo))
        out = feats.new_empty((b, self.dim, ho, wo))
        th, tw = self.tile_shape(batch=1, **size)
        for i in range(b):
            one = slice(i, i + 1)
            kv = ([k[one] for k in keys], [v[one] for v in values])
            for rows in tile_spans(ho, th):
                for cols in tile_spans(wo, tw):
                    out[one, :, slice(*rows), slice(*cols)] = self._tile(guide[one], *kv, rows, cols)
        return out

    def tile_shape(
        self, *, batch: int, out_h: int, out_w: int, dim: int, n_tokens: int, elem_bytes: int
    ) -> tuple[int, int]:
        """Output (rows, cols) per tile under this module's ``max_tile_bytes`` (see :func:`loftup_tile_shape`)."""
        return loftup_tile_shape(
            self.max_tile_bytes, batch=batch, out_h=out_h, out_w=out_w, dim=dim, n_tokens=n_tokens,
            elem_bytes=elem_bytes,
        )

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"kind": "loftup", "variant": ..., "dim": D}`` (the tile budget is a runtime
        setting that does not change the output, so it is not part of it)."""
        return {"kind": self.kind, "variant": self.variant, "dim": self.dim}

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> "LoftUpUpsampler":
        """Rebuild (random parameters) from :meth:`config_dict` output; ``kwargs`` go to the constructor."""
        if config.get("kind") != cls.kind:
            raise ConfigError(f"LoftUpUpsampler.from_config_dict: kind must be 'loftup', got {config.get('kind')!r}")
        variant = config.get("variant")
        return cls(None if variant == "custom" else variant, dim=config.get("dim"), **kwargs)

    # ------------------------------------------------------------------ pieces
    def _scaled_guidance(self, image: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """(B, 3, Ho, Wo) guidance in the Fourier dtype, each image's colours min-max scaled to [-0.5, 0.5] on its
        own (upstream scales over the whole batch)."""
        fdtype = torch.float64 if dtype == torch.float64 else torch.float32
        img = image.to(fdtype)
        if tuple(img.shape[-2:]) != tuple(size):
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=False)
        lo = img.amin(dim=(2, 3), keepdim=True)
        hi = img.amax(dim=(2, 3), keepdim=True)
        return (img - lo) / torch.clamp(hi - lo, min=_COLOUR_EPS) - 0.5

    def _fourier(self, guide: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """Fourier features of the guidance window ``rows x cols`` (half-open): (B, 203, r, c) in its dtype."""
        n, _, h, w = guide.shape
        dev, fdt = guide.device, guide.dtype
        (a, b), (l, r) = rows, cols
        ys = _grid(h, dev)[a:b].to(fdt).view(1, 1, -1, 1).expand(n, 1, b - a, r - l)
        xs = _grid(w, dev)[l:r].to(fdt).view(1, 1, 1, -1).expand(n, 1, b - a, r - l)
        colour = guide[:, :, a:b, l:r]
        coords = torch.cat([ys, xs, colour], dim=1)  # (B, 5, r, c)
        args = (coords.unsqueeze(1) * _freqs(_IMG_FREQS, dev).to(fdt).view(1, -1, 1, 1, 1)).flatten(1, 2)
        bias = self.upsampler.fourier_feat["1"].biases.to(device=dev, dtype=fdt).reshape(2, -1, 1, 1)
        return torch.cat([torch.sin(args + bias[0]), torch.cos(args + bias[1]), colour], dim=1)

    def _grid_code(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The low-res tokens' sine code: (h*w, 20) in ``like``'s dtype."""
        dev = like.device
        fdt = torch.float64 if like.dtype == torch.float64 else torch.float32
        grid = torch.stack(torch.meshgrid(_grid(h, dev), _grid(w, dev), indexing="ij")).to(fdt)  # (2, h, w)
        args = (grid.unsqueeze(0) * _freqs(_PE_FREQS, dev).to(fdt).view(-1, 1, 1, 1)).flatten(0, 1)  # (10, h, w)
        bias = self.upsampler.lr_pe.biases.to(device=dev, dtype=fdt).reshape(2, -1, 1, 1)
        code = torch.cat([torch.sin(args + bias[0]), torch.cos(args + bias[1])], dim=0)  # (20, h, w)
        return code.flatten(1).t().to(like.dtype)

    def _keys_values(self, feats: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the keys and values of the low-res tokens: (B, heads, h*w, c/heads) each."""
        b, _, h, w = feats.shape
        tokens = torch.cat(
            [feats.flatten(2).transpose(1, 2), self._grid_code(h, w, feats).expand(b, -1, -1)], dim=2
        )  # (B, n, c)
        c = tokens.shape[-1]
        keys, values = [], []
        for attn, _ in self.upsampler.ca_transformer.layers:
            t = _layer_norm(tokens, attn.norm_kv)
            wts, bias = attn.attention.in_proj_weight, attn.attention.in_proj_bias
            k = _linear(t, wts[c : 2 * c], bias[c : 2 * c])
            v = _linear(t, wts[2 * c :], bias[2 * c :])
            keys.append(_heads(k))
            values.append(_heads(v))
        return keys, values

    def _queries(
        self, guide: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        """``first_conv`` at output pixels ``rows x cols`` (half-open ranges), from the guidance window 2 pixels
        larger on every side (zeros beyond the image, as the convs' zero padding): (B, c, r, c') in ``dtype``."""
        fc = self.upsampler.first_conv
        h, w = guide.shape[-2:]
        (r0, r1), (c0, c1) = rows, cols
        a, b, l, r = max(r0 - 2, 0), min(r1 + 2, h), max(c0 - 2, 0), min(c1 + 2, w)
        x = _channel_norm(self._fourier(guide, (a, b), (l, r)).to(dtype), fc["0"].norm)
        x = F.pad(x, (l - (c0 - 2), (c1 + 2) - r, a - (r0 - 2), (r1 + 2) - b))
        y = _bn_relu(_conv(x, fc["1"]), fc["2"])  # pixels r0-1 .. r1 x c0-1 .. c1 (inclusive)
        del x
        # first-conv pixels outside the image are the second conv's zero padding
        top, bottom, left, right = int(r0 == 0), int(r1 == h), int(c0 == 0), int(c1 == w)
        y = F.pad(y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right], (left, right, top, bottom))
        return _bn_relu(_conv(y, fc["4"]), fc["5"])

    def _tile(
        self,
        guide: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        rows: tuple[int, int],
        cols: tuple[int, int],
    ) -> torch.Tensor:
        """Output pixels ``rows x cols`` (half-open): (B, D, r, c) in the keys' dtype."""
        core = self.upsampler
        dtype = keys[0].dtype
        q_map = self._queries(guide, rows, cols, dtype)
        b, c, r, w = q_map.shape
        q = q_map.flatten(2).transpose(1, 2)  # (B, r*W, c)
        del q_map
        for (attn, ffn), k, v in zip(core.ca_transformer.layers, keys, values):
            wts, bias = attn.attention.in_proj_weight, attn.attention.in_proj_bias
            qp = _linear(_layer_norm(q, attn.norm_q), wts[:c], bias[:c])
            o = F.scaled_dot_product_attention(_heads(qp), k, v, scale=(c // _HEADS) ** -0.5)
            o = o[..., : c // _HEADS].transpose(1, 2).reshape(b, -1, c)
            q = _add_linear(q, o, attn.attention.out_proj.weight, attn.attention.out_proj.bias)
            del o
            net = ffn.net
            hid = F.gelu(_linear(_layer_norm(q, net["0"]), net["1"].weight, net["1"].bias))
            q = _add_linear(q, hid, net["4"].weight, net["4"].bias)
            del hid
        q = _layer_norm(q, core.ca_transformer.norm)
        conv = core.final_conv["0"]
        out = _layer_norm(_linear(q, conv.weight.flatten(1), conv.bias), core.final_conv["1"])  # (B, r*W, D)
        return out.transpose(1, 2).reshape(b, -1, r, w)


def load_loftup(
    obj: Mapping[str, Any], *, variant: str, name: str, max_tile_bytes: int | None = DEFAULT_MAX_TILE_BYTES
) -> LoftUpUpsampler:
    """A published LoftUp checkpoint as a :class:`LoftUpUpsampler` in eval mode.

    Args:
        obj: what :func:`featup_ops.tensor_files.read_tensor_file` returned for the publisher's ``pytorch_model.bin``
            (its 54-key state dict: ``upsampler.*`` and ``channelnorm.norm.*``).
        variant: a key of :data:`LOFTUP_VARIANTS`.
        name: the file, for errors.
        max_tile_bytes: see :class:`LoftUpUpsampler`.

    Raises:
        ConfigError: unknown variant.
        CheckpointError: a key missing or unexpected, or a shape that does not fit the variant (one line, named).
    """
    model = LoftUpUpsampler(variant, max_tile_bytes=max_tile_bytes)
    tensors = tensor_mapping(obj, name)
    problem = state_dict_mismatches(tensors, model.state_dict(), source="file")
    if problem:
        norm = tensors.get("channelnorm.norm.weight")
        hint = "pass the file of this variant"
        if torch.is_tensor(norm) and norm.dim() == 1 and int(norm.shape[0]) != model.dim:
            fits = sorted(k for k, v in LOFTUP_VARIANTS.items() if v.dim == int(norm.shape[0]))
            hint = f"the file is for D={int(norm.shape[0])} (variants {fits or 'none published'})"
        raise CheckpointError(
            f"LoftUp weights file {name} does not fit variant {variant!r} (D={model.dim}): {problem}; {hint}"
        )
    model.load_state_dict(tensors, strict=True)
    return model.eval()
