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
