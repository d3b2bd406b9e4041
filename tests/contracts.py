"""Contract test bases, as zarr ships ``StoreTests``: each concrete store location or upsampler is a small subclass.

- :class:`StoreContract`: a feature store at one kind of location (local folder, ``s3://``): create, write a shard
  with status last, resume byte-identical, refuse other settings, heartbeat rows skipped by the sink.
- :class:`UpsamplerContract`: any upsampler: output size square and not, dtype, determinism in eval, gradients reach
  every parameter, channel-agnostic where claimed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import StoreMismatchError
from pipeline.store import FeatureStoreSchema, Status, complete_rows, create_or_open_store, open_store, write_shard

SETTINGS = {"backbone": "b", "weights_hash": "random:b", "upsampler": {"kind": "bilateral"}}


def _schema(**kw) -> FeatureStoreSchema:
    return FeatureStoreSchema(**{**dict(n_rows=5, channels=3, lowres_size=(2, 2), output_size=(8, 6),
                                        rows_per_shard=2), **kw})


def _unit(s: FeatureStoreSchema, shard: int, value: float) -> dict[str, np.ndarray]:
    start, stop = s.shard_rows(shard)
    n = stop - start
    return {
        "image_id": np.array([f"img{r}" for r in range(start, stop)]),
        "uri": np.array([f"/x/{r}.jpg" for r in range(start, stop)]),
        "error": np.array([""] * n),
        "orig_size": np.full((n, 2), 10, dtype=np.int32),
        "valid_size": np.full((n, 2), 8, dtype=np.int32),
        "lowres": np.full((n, s.channels, *s.lowres_size), value, dtype=s.storage_dtype),
        "hires": np.full((n, s.channels, *s.output_size), value, dtype=s.storage_dtype),
        "status": np.full(n, Status.COMPLETE, dtype=np.uint8),
    }


class StoreContract:
    """Subclass and implement :meth:`uri` (a fresh location for a store)."""

    @pytest.fixture()
    def uri(self, tmp_path, request) -> str:
        raise NotImplementedError

    def test_create_declares_every_array(self, uri):
        s = _schema()
        g, resumed = create_or_open_store(uri, s, SETTINGS)
        assert not resumed
        for name, spec in s.arrays().items():
            assert tuple(g[name].shape) == spec.shape and tuple(g[name].chunks) == spec.chunks, name

    def test_write_a_shard_status_last_then_read_back(self, uri):
        s = _schema()
        g, _ = create_or_open_store(uri, s, SETTINGS)
        write_shard(g, 1, _unit(s, 1, 2.0))
        g = open_store(uri)
        assert complete_rows(g).tolist() == [2, 3]
        assert float(np.asarray(g["hires"][2]).mean()) == 2.0

    def test_resume_is_byte_identical(self, uri):
        s = _schema()
        g, _ = create_or_open_store(uri, s, SETTINGS)
        write_shard(g, 0, _unit(s, 0, 1.0))
        g2, resumed = create_or_open_store(uri, s, SETTINGS)
        assert resumed
        write_shard(g2, 0, _unit(s, 0, 1.0))  # a rerun rewrites the same bytes
        np.testing.assert_array_equal(np.asarray(open_store(uri)["hires"][0:2]), _unit(s, 0, 1.0)["hires"])

    def test_refuses_other_settings(self, uri):
        create_or_open_store(uri, _schema(), SETTINGS)
        with pytest.raises(StoreMismatchError, match="dtype"):
            create_or_open_store(uri, _schema(dtype="float32"), SETTINGS)

    def test_sink_creates_writes_whole_shards_and_skips_heartbeats(self, uri):
        import json

        from ray.data.block import BlockAccessor

        from pipeline.store.sink import ZarrFeatureDatasink

        s = _schema()
        sink = ZarrFeatureDatasink(uri, s, SETTINGS)
        sink.on_write_start()
        u = _unit(s, 2, 4.0)  # the short last shard, padded to S rows as the stages send it
        pad = lambda a: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)])[None]  # noqa: E731
        row = {name: pad(u[name]) for name in ("orig_size", "valid_size", "lowres", "hires", "status")}
        meta = {k: u[k].tolist() for k in ("image_id", "uri", "error")}
        row.update(shard=np.array([2]), n=np.array([1]), meta=np.array([json.dumps(meta)], dtype=object))
        blocks = [BlockAccessor.batch_to_block({"heartbeat": np.zeros(1)}), BlockAccessor.batch_to_block(row)]
        out = sink.write(blocks, None)
        assert out["units"] == 1 and out["complete"] == 1
        assert complete_rows(open_store(uri)).tolist() == [4]


class UpsamplerContract:
    """Subclass and implement :meth:`make` (a fresh upsampler); set ``channel_agnostic`` where it is claimed.

    Every kind answers the one contract ``up(lowres (B,C,h,w), image (B,3,H,W), output_size) -> (B,C,H',W')``:
    any output size at least the grid, square or not; the features' dtype; deterministic in eval; a row independent
    of its batch-mates; ``upsample_prepared(prepare_lowres(x))`` equal to ``up(x)`` where the kind normalises the
    low-res features itself; a JSON-able ``config_dict`` with its kind; gradients reaching every parameter.
    """

    channel_agnostic = False
    has_parameters = True
    #: feature channels the upsampler is made for (published kinds: the file's C)
    channels = 8
    #: image pixels per feature cell (kinds that need the backbone's patch size: the patch)
    image_scale = 4
    #: parameters a kind's file carries but its forward never uses (AnyUp's value and output projections)
    unused_parameters: tuple[str, ...] = ()
    #: low-res grid and output size of the gradient check: large enough that every parameter is used
    grad_case: tuple[tuple[int, int], tuple[int, int]] = ((4, 5), (16, 20))

    def make(self) -> torch.nn.Module:
        raise NotImplementedError

    def _inputs(
        self, c: int | None = None, size: tuple[int, int] = (4, 5), image_size: tuple[int, int] | None = None,
        batch: int = 2,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        k = self.image_scale
        image = torch.randn(batch, 3, *(image_size or (size[0] * k, size[1] * k)), generator=g)
        return torch.randn(batch, c or self.channels, *size, generator=g), image

    @pytest.mark.parametrize("out", [(16, 16), (16, 20), (12, 28)])
    def test_output_size_square_and_not(self, out):
        feats, image = self._inputs()
        with torch.no_grad():
            y = self.make().eval()(feats, image, out)
        assert tuple(y.shape) == (2, self.channels, *out) and torch.isfinite(y).all()

    def test_default_output_is_the_image_size(self):
        feats, image = self._inputs()
        with torch.no_grad():
            y = self.make().eval()(feats, image)
        assert tuple(y.shape) == (2, self.channels, *image.shape[-2:])

    def test_dtype_follows_the_features(self):
        feats, image = self._inputs()
        with torch.no_grad():
            assert self.make().eval()(feats, image, (16, 20)).dtype == feats.dtype

    def test_deterministic_in_eval(self):
        feats, image = self._inputs()
        up = self.make().eval()
        with torch.no_grad():
            torch.testing.assert_close(up(feats, image, (16, 20)), up(feats, image, (16, 20)), rtol=0, atol=0)

    def test_a_row_does_not_depend_on_its_batch_mates(self):
        feats, image = self._inputs()
        up = self.make().eval()
        with torch.no_grad():
            both = up(feats, image, (16, 20))
            alone = torch.cat([up(feats[i : i + 1], image[i : i + 1], (16, 20)) for i in range(2)])
        torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)

    def test_prepared_lowres_then_upsample_equals_the_call(self):
        feats, image = self._inputs()
        up = self.make().eval()
        assert isinstance(getattr(up, "lowres_normalized", False), bool)
        if not getattr(up, "lowres_normalized", False):
            pytest.skip("no low-res preprocessing")
        with torch.no_grad():
            prepared = up.prepare_lowres(feats)
            torch.testing.assert_close(up.upsample_prepared(prepared, image, (16, 20)), up(feats, image, (16, 20)))
        assert not torch.allclose(prepared, feats)

    def test_config_dict_names_the_kind_and_is_json(self):
        import json

        config = self.make().config_dict()
        assert isinstance(config.get("kind"), str) and json.loads(json.dumps(config)) == config

    def test_gradients_reach_every_parameter(self):
        if not self.has_parameters:
            pytest.skip("no parameters")
        grid, size = self.grad_case
        feats, image = self._inputs(size=grid, image_size=(grid[0] * self.image_scale, grid[1] * self.image_scale))
        up = self.make().train()
        out = up(feats, image, size)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        missing = [n for n, p in up.named_parameters()
                   if p.requires_grad and n not in self.unused_parameters and (p.grad is None or not p.grad.any())]
        assert not missing, missing

    def test_channel_agnostic_where_claimed(self):
        if not self.channel_agnostic:
            pytest.skip("not claimed")
        feats, image = self._inputs()
        up = self.make().eval()
        assert getattr(up, "channel_agnostic", False)
        m = torch.randn(3, self.channels, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a = torch.einsum("kc,bchw->bkhw", m, up(feats, image, (16, 20)))
            b = up(torch.einsum("kc,bchw->bkhw", m, feats), image, (16, 20))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
