"""UPLiFT (Walmer et al.): an iterative 2x feature upsampler with a local attender, computed as its reference does.

The published model has one image encoder and one decoder step whose weights are shared by every step:

- **Encoder**, run once per call at full image resolution: five residual blocks (widths 16, 32, 64, 128, 128), each
  ``3x3 conv (no bias) -> BN -> ReLU -> 1x1 conv`` plus the block input zero-padded in channels. Outputs of the 4th
  and 5th blocks (``E3``, ``E4``, 128 channels each) guide the steps. With a patch-14 backbone the image is first
  resized to 16/14 of its size (bilinear, half-pixel, antialias), so four steps land on that grid.
- **Decoder step** ``x (B, 384, h, w) -> (B, 384, 2h, 2w)``: ``[x, nearest(E4)]`` -> double conv 512->64 (+ the
  first 64 input channels) -> ``ConvTranspose2d(k=2, s=2) + bilinear x2 (align_corners=True)`` ->
  ``[that, nearest(E3)]`` -> double conv 192->64 (+ the first 64 input channels) = the guide. The **local
  attender** turns the guide into a softmax over 17 offsets (``1x1 conv + the guide's first 17 channels``) and each
  output pixel is that convex combination of the step input's neighbours around its parent cell (replicate padding).
  "nearest" is PyTorch's legacy nearest (``floor(dst * in / out)``), not "nearest-exact".
- **Output size**: the fewest steps whose grid reaches ``output_size`` on both axes, then, if the grid differs, the
  reference's final resize (bilinear, half-pixel, antialias) to ``output_size``.

BatchNorm always uses its running statistics, so a row never depends on its batch-mates. The checkpoint is the
publisher's flat safetensors state dict (72 keys); its ``num_batches_tracked`` counters are float32 scalars there
(the publisher cast every buffer) and are accepted as such. The two DINO variants share the layout; the variant
only sets the backbone patch size (14 or 16).

Example::

    up = load_uplift(read_tensor_file(data, "uplift_dinov2-s14.safetensors"), variant="dinov2-s14", name="...")
    high = up(lowres, image)                     # (B, 384, H/14, W/14), (B, 3, H, W) -> (B, 384, H, W)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from featup_ops.baselines import check_upsample_args
from featup_ops.errors import CheckpointError, ConfigError, InputSizeError
from featup_ops.tensor_files import tensor_mapping
from featup_ops.weights import state_dict_mismatches

__all__ = ["UPLIFT_OFFSETS", "UPLIFT_VARIANTS", "UpliftUpsampler", "load_uplift", "uplift_steps_for"]

#: Backbone patch size of each published DINO variant (the weights' layout is the same).
UPLIFT_VARIANTS: dict[str, int] = {"dinov2-s14": 14, "dinov3-splus16": 16}

#: The local attender's (dy, dx) offsets in the order of its 17 logit channels: the 3x3 neighbourhood plus the 8
#: points at distance 2 along the axes and diagonals.
UPLIFT_OFFSETS: tuple[tuple[int, int], ...] = (
    (-2, -2), (-2, 0), (-2, 2),
    (-1, -1), (-1, 0), (-1, 1),
    (0, -2), (0, -1), (0, 0), (0, 1), (0, 2),
    (1, -1), (1, 0), (1, 1),
    (2, -2), (2, 0), (2, 2),
)

_DIM = 384  # backbone channels the published weights take (ViT-S)
_GUIDE = 64  # decoder width
_ENCODER_WIDTHS = (16, 32, 64, 128, 128)
_PAD = max(max(abs(dy), abs(dx)) for dy, dx in UPLIFT_OFFSETS)


class _RunningStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with its running statistics in every mode (the reference at inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _Unit(nn.Module):
    """``conv`` (a Sequential laid out as the published keys) plus a residual of the input's first channels."""

    def __init__(self, layers: list[nn.Module], cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*layers)
        self.cin, self.cout = cin, cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.cin < self.cout:  # narrower input: zero-padded in channels
            return y + F.pad(x, (0, 0, 0, 0, 0, self.cout - self.cin))
        return y + x[:, : self.cout]


class _Block(nn.Module):
    """One residual unit, kept under ``blocks.0`` as in the published keys."""

    def __init__(self, unit: _Unit) -> None:
        super().__init__()
        self.blocks = nn.Sequential(unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _encoder_block(cin: int, cout: int) -> _Block:
    layers = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), _RunningStatsBatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 1),
    ]
    return _Block(_Unit(layers, cin, cout))


def _double_conv_block(cin: int, cout: int) -> _Block:
    layers = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), _RunningStatsBatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), _RunningStatsBatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 1),
    ]
    return _Block(_Unit(layers, cin, cout))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cin = 3
        for i, cout in enumerate(_ENCODER_WIDTHS):
            self.add_module(f"block_{i}", _encoder_block(cin, cout))
            cin = cout

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (E3, E4), each (B, 128, H, W)."""
        x = image
        outs = []
        for i in range(len(_ENCODER_WIDTHS)):
            x = getattr(self, f"block_{i}")(x)
            outs.append(x)
        return outs[3], outs[4]


class _Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ch, h, w) -> (B, ch, 2h, 2w): learned 2x plus bilinear 2x (align_corners=True)."""
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.up(x) + F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block_0 = _double_conv_block(_DIM + _ENCODER_WIDTHS[4], _GUIDE)
        self.up_1 = _Up(_GUIDE)
        self.block_1 = _double_conv_block(_GUIDE + _ENCODER_WIDTHS[3], _GUIDE)

    def forward(self, x: torch.Tensor, e3: torch.Tensor, e4: torch.Tensor) -> torch.Tensor:
        """x (B, 384, h, w), E3/E4 (B, 128, *) -> guide (B, 64, 2h, 2w)."""
        h, w = x.shape[-2:]
        y = self.block_0(torch.cat([x, F.interpolate(e4, size=(h, w), mode="nearest")], dim=1))
        y = self.up_1(y)
        return self.block_1(torch.cat([y, F.interpolate(e3, size=(2 * h, 2 * w), mode="nearest")], dim=1))


class _Attender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(_GUIDE, len(UPLIFT_OFFSETS), 1)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w), guide (B, 64, 2h, 2w) -> (B, C, 2h, 2w), each pixel a convex combination of x."""
        k = len(UPLIFT_OFFSETS)
        b, c, h, w = x.shape
        weights = torch.softmax(self.conv1(guide) + guide[:, :k], dim=1).view(b, k, 1, h, 2, w, 2)
        padded = F.pad(x, (_PAD,) * 4, mode="replicate")
        out = x.new_zeros(b, c, h, 2, w, 2)
        for d, (dy, dx) in enumerate(UPLIFT_OFFSETS):
            shifted = padded[:, :, _PAD + dy : _PAD + dy + h, _PAD + dx : _PAD + dx + w]
            out.addcmul_(shifted[:, :, :, None, :, None], weights[:, d])
        return out.view(b, c, 2 * h, 2 * w)


def _resize_antialias(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, half-pixel, antialias resize (torchvision's tensor resize); half/bfloat16 go through float32,
    since PyTorch's antialias kernels do not take them on every device."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(wide, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(x.dtype)


def uplift_steps_for(grid: tuple[int, int], output_size: tuple[int, int]) -> int:
    """The fewest 2x steps from ``grid`` (h, w) whose size reaches ``output_size`` (Ho, Wo) on both axes."""
    (h, w), (ho, wo) = grid, output_size
    if h < 1 or w < 1:
        raise InputSizeError(f"uplift: feature grid {h}x{w} is empty; pass features of at least 1x1")
    steps = 0
    while (h << steps) < ho or (w << steps) < wo:
        steps += 1
    return steps


class UpliftUpsampler(nn.Module):
    """UPLiFT for DINO ViT-S features (384 channels), parameters laid out as the publisher's state dict.

    Args:
        variant: ``"dinov2-s14"`` (patch 14: the image is pre-scaled by 16/14) or ``"dinov3-splus16"`` (patch 16).
        dim: must be 384 (accepted so ``cls(**config_dict)`` rebuilds the module).
    """

    kind: ClassVar[str] = "uplift"
    lowres_normalized: ClassVar[bool] = False

    def __init__(self, variant: str = "dinov2-s14", dim: int = _DIM) -> None:
        super().__init__()
        if variant not in UPLIFT_VARIANTS:
            raise ConfigError(f"uplift: unknown variant {variant!r}; use one of {', '.join(UPLIFT_VARIANTS)}")
        if dim != _DIM:
            raise ConfigError(f"uplift: the published weights take {_DIM} channels, got dim={dim}; pass dim={_DIM}")
        self.variant = variant
        self.dim = _DIM
        self.patch_size = UPLIFT_VARIANTS[variant]
        self.encoder = _Encoder()
        self.decoder = _Decoder()
        self.attender = _Attender()

    def prepare_lowres(self, lowres: torch.Tensor) -> torch.Tensor:
        """The identity: UPLiFT takes the backbone's features as they are."""
        return lowres

    def forward(
        self,
        lowres: torch.Tensor,
        image: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        *,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Upsample; see :meth:`upsample_prepared` (``prepare_lowres`` is the identity)."""
        return self.upsample_prepared(self.prepare_lowres(lowres), image, output_size, steps=steps)

    def upsample_prepared(
        self,
        lowres: torch.Tensor,
        image: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        *,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Upsample backbone features guided by the image.

        Args:
            lowres: ``(B, 384, h, w)`` float features: the last block's patch tokens after the final norm.
            image: ``(B, 3, p*h, p*w)`` the ImageNet-normalised image the backbone saw (p = ``self.patch_size``).
            output_size: ``(Ho, Wo)`` >= ``(h, w)``; None = ``(H, W)`` (with ``steps`` given: no final resize).
            steps: run exactly this many 2x steps (the reference's ``iters``); None = the fewest reaching
                ``output_size``.

        Returns:
            ``(B, 384, Ho, Wo)`` (or ``(B, 384, h * 2**steps, w * 2**steps)``), in ``lowres``' dtype; computed in
            the parameters' dtype.

        Raises:
            InputSizeError: wrong ranks or channels, or an image whose size is not the patch size times the grid.
            ConfigError: negative ``steps``.
        """
        name = f"uplift:{self.variant}"
        size = check_upsample_args(lowres, image, output_size, name=name, dim=self.dim)
        (h, w), (ih, iw) = lowres.shape[-2:], image.shape[-2:]
        p = self.patch_size
        if (ih, iw) != (p * h, p * w):
            raise InputSizeError(
                f"{name}: image {ih}x{iw} does not fit features {h}x{w} at patch size {p} (expected image "
                f"{p * h}x{p * w}); pass the image the backbone saw"
            )
        final = size if output_size is not None or steps is None else None
        if steps is None:
            steps = uplift_steps_for((h, w), size)
        elif int(steps) < 0:
            raise ConfigError(f"{name}: steps must be >= 0, got {steps}")
        dtype = self.attender.conv1.weight.dtype
        x = lowres.to(dtype)
        if steps:
            img = image.to(dtype)
            if p == 14:  # the encoder grid is 16 px per feature cell
                img = _resize_antialias(img, (16 * ih // 14, 16 * iw // 14))
            e3, e4 = self.encoder(img)
            for _ in range(int(steps)):
                x = self.attender(x, self.decoder(x, e3, e4))
        if final is not None and tuple(x.shape[-2:]) != tuple(final):
            x = _resize_antialias(x, final)
        return x.to(lowres.dtype)

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description: ``{"kind": "uplift", "variant": ..., "dim": 384}``."""
        return {"kind": self.kind, "variant": self.variant, "dim": self.dim}

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, patch_size={self.patch_size}, dim={self.dim}"


def load_uplift(obj: Mapping[str, Any], *, variant: str, name: str) -> UpliftUpsampler:
    """Build UPLiFT from the publisher's state dict.

    Args:
        obj: the file's top-level mapping (:func:`featup_ops.tensor_files.read_tensor_file`): the 72 published keys.
        variant: ``"dinov2-s14"`` or ``"dinov3-splus16"``.
        name: how to name the file in errors.

    Returns:
        The module in eval mode, float32 parameters.

    Raises:
        ConfigError: unknown variant.
        CheckpointError: missing, unexpected or mis-shaped keys (named, one line), or non-tensor values.
    """
    module = UpliftUpsampler(variant)
    tensors = tensor_mapping(obj, name)
    problems = state_dict_mismatches(tensors, module.state_dict(), source="file")
    if problems:
        raise CheckpointError(f"weights file {name} is not UPLiFT {variant!r}: {problems}")
    # num_batches_tracked is float32 in the published files; load_state_dict casts it into the int64 buffer.
    module.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in tensors.items()})
    return module.eval()
