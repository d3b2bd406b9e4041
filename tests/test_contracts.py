"""Concrete contract tests (bases in ``contracts.py``): store locations and upsamplers."""
from __future__ import annotations

import pytest
from contracts import StoreContract, UpsamplerContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TestLocalStore(StoreContract):
    @pytest.fixture()
    def uri(self, tmp_path) -> str:
        return str(tmp_path / "store.zarr")


class TestS3Store(StoreContract):
    @pytest.fixture()
    def uri(self, s3_bucket) -> str:
        return f"{s3_bucket}/store.zarr"


class TestBilinear(UpsamplerContract):
    channel_agnostic = True
    has_parameters = False

    def make(self):
        import featup_ops

        return featup_ops.BilinearUpsampler()


class TestBilateral(UpsamplerContract):
    channel_agnostic = True
    has_parameters = False

    def make(self):
        import featup_ops

        return featup_ops.BilateralUpsampler()


class TestJBU(UpsamplerContract):
    channel_agnostic = True  # dim=None: no parameter depends on C
    grad_case = ((2, 2), (32, 32))  # 4 stages: every layer runs

    def make(self):
        import featup_ops

        return featup_ops.JBUUpsampler()


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


class TestFeatUp(UpsamplerContract):
    """FeatUp's hub stack (ChannelNorm file), random weights in FeatUp's own file format."""

    channels = 384
    grad_case = ((2, 2), (32, 32))  # 4 stages: every layer runs

    def make(self):
        import featup_ops

        return featup_ops.load_upsampler(f"featup:dinov2={FIXTURES / 'featup_jbu' / 'dinov2_jbu_stack_norm.ckpt'}")


class TestUplift(UpsamplerContract):
    """UPLiFT (patch 14), random weights in the publisher's safetensors layout."""

    channels = 384
    image_scale = 14
    grad_case = ((2, 3), (8, 12))

    def make(self):
        import featup_ops

        return featup_ops.load_upsampler(f"uplift:dinov2-s14={FIXTURES / 'uplift' / 'uplift_dinov2-s14.safetensors'}")


class TestLoftUp(UpsamplerContract):
    """LoftUp (D=384), the publisher's pytorch_model.bin layout with random weights; a small tile budget so the
    contract runs through several tiles."""

    channels = 384
    grad_case = ((2, 3), (8, 12))

    def make(self):
        import featup_ops

        up = featup_ops.load_upsampler(f"loftup:dinov2s={FIXTURES / 'loftup' / 'pytorch_model.bin.xz'}")
        up.max_tile_bytes = 1 << 20
        return up


class TestAnyUp(UpsamplerContract):
    """AnyUp (any C), the publisher's .pth layout with random weights; a small tile budget so the contract runs
    through the tiled path. Its file's value and output projections are loaded but never used (as upstream)."""

    unused_parameters = ("cross_decode.cross_attn.attention.out_proj.weight",
                         "cross_decode.cross_attn.attention.out_proj.bias")

    def make(self):
        import featup_ops

        up = featup_ops.load_upsampler(f"anyup:paper={FIXTURES / 'anyup' / 'anyup_paper.pth'}")
        up.max_tile_bytes = 1 << 16
        return up
