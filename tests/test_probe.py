"""Linear probes on a tiny synthetic labelled set whose features linearly encode the label (plus noise)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.evaluate.probe import (
    IGNORE_INDEX,
    PROTOCOLS,
    LBFGSConfig,
    ProbeConfig,
    StandardizedProbe,
    _schedule,
    boundary_mask,
    channel_stats,
    collect_pixels,
    evaluate_depth_probe,
    evaluate_segmentation_probe,
    features_at,
    fit_lbfgs,
    linear_probe,
    metrics_from_confusion,
    sample_pixels,
    segmentation_loss,
    train_depth_probe,
    train_lbfgs_segmentation_probe,
    train_protocol_probe,
    train_segmentation_probe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, C, H, W = 4, 8, 16, 16


def _labels(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, H, W) int64 maps of 4x4 blocks of random classes, with a few ignored pixels."""
    blocks = torch.randint(0, K, (n, H // 4, W // 4), generator=gen)
    lab = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    lab[:, 0, :3] = IGNORE_INDEX
    return lab


def _features(lab: torch.Tensor, proj: torch.Tensor, gen: torch.Generator, noise: float = 0.6) -> torch.Tensor:
    onehot = F.one_hot(lab.clamp_max(K - 1), K).permute(0, 3, 1, 2).float()  # (n, K, H, W)
    feats = torch.einsum("kc,nkhw->nchw", proj, onehot)
    return feats + noise * torch.randn(feats.shape, generator=gen)


def _batches(feats: torch.Tensor, lab: torch.Tensor, bs: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"features": feats[i : i + bs], "label": lab[i : i + bs]} for i in range(0, len(feats), bs)]


def _dataset(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(K, C, generator=gen)
    lab_tr, lab_te = _labels(16, gen), _labels(8, gen)
    return proj, lab_tr, lab_te, _features(lab_tr, proj, gen), _features(lab_te, proj, gen)


def test_trained_probe_beats_random_probe():
    _, lab_tr, lab_te, f_tr, f_te = _dataset()
    cfg = ProbeConfig(epochs=15, lr=5e-2)
    probe = train_segmentation_probe(_batches(f_tr, lab_tr), K, cfg=cfg)
    trained = evaluate_segmentation_probe(probe, _batches(f_te, lab_te), K)
    torch.manual_seed(1)
    random = evaluate_segmentation_probe(linear_probe(C, K), _batches(f_te, lab_te), K)
    assert trained.miou > 0.8, trained
    assert trained.pixel_accuracy > 0.9
    assert random.miou < 0.5, random
    assert trained.pixels == int((lab_te != IGNORE_INDEX).sum())


def test_feature_preservation_lowres_probe_applies_to_hires():
    """A probe trained on 4x-pooled features (logits upsampled to label size) still works on full-res features."""
    _, lab_tr, lab_te, f_tr, f_te = _dataset(seed=3)
    low_tr = F.avg_pool2d(f_tr, 4)
    probe = train_segmentation_probe(_batches(low_tr, lab_tr), K, cfg=ProbeConfig(epochs=15, lr=5e-2))
    on_low = evaluate_segmentation_probe(probe, _batches(F.avg_pool2d(f_te, 4), lab_te), K)
    on_high = evaluate_segmentation_probe(probe, _batches(f_te, lab_te), K)
    assert on_low.miou > 0.8 and on_high.miou > 0.7, (on_low, on_high)


def test_metrics_from_confusion_by_hand():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 never occurs: excluded from the mean
    m = metrics_from_confusion(conf)
    assert math.isclose(m.iou[0], 3 / 4) and math.isclose(m.iou[1], 2 / 3) and math.isnan(m.iou[2])
    assert math.isclose(m.miou, (3 / 4 + 2 / 3) / 2)
    assert math.isclose(m.pixel_accuracy, 5 / 6)


def test_cosine_schedule_is_stepped_per_optimizer_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = _schedule(opt, total_steps=10, warmup_steps=0)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and math.isclose(lrs[5], 0.5, abs_tol=1e-9)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # monotone over the whole run: no oscillation
    assert opt.param_groups[0]["lr"] < 1e-9


def test_depth_probe_rmse_and_delta():
    gen = torch.Generator().manual_seed(0)
    depth = 1.0 + 4.0 * torch.rand(12, H, W, generator=gen)
    depth[:, 0, 0] = 0.0  # invalid pixels
    w = torch.randn(C, generator=gen)
    feats = w.view(1, C, 1, 1) * depth.unsqueeze(1) + 0.05 * torch.randn(12, C, H, W, generator=gen)
    batches = [{"features": feats[i : i + 4], "label": depth[i : i + 4]} for i in range(0, 12, 4)]
    probe = train_depth_probe(batches[:2], cfg=ProbeConfig(epochs=40, lr=5e-2, flip_p=0.0))
    good = evaluate_depth_probe(probe, batches[2:])
    torch.manual_seed(0)
    bad = evaluate_depth_probe(linear_probe(C, 1), batches[2:])
    assert good.pixels == 4 * H * W - 4
    assert good.rmse < 0.3 and good.delta1 > 0.9, good
    assert bad.rmse > 1.0 and bad.delta1 < 0.5, bad


def _labelled_store(uri: str, labels_dir, *, encode: bool, n: int = 12, seed: int = 0) -> None:
    """A store (pipeline.store's writer) whose hires features linearly encode each image's COCO-Stuff label (or
    are pure noise), with lowres = 4x4 average pooling; label PNGs named by 12-digit COCO id."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.evaluate.labels import COCO_STUFF_FINE_TO_COARSE
    from pipeline.store import FeatureStoreSchema, Status, create_or_open_store, write_shard

    fine_ids = [0, 93, 105, 170]  # person, branch, clouds, wall-brick -> coarse 9, 22, 23, 18
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(27, C, generator=torch.Generator().manual_seed(99))
    schema = FeatureStoreSchema(n_rows=n, channels=C, lowres_size=(4, 4), output_size=(H, W), rows_per_shard=4)
    group, _ = create_or_open_store(uri, schema, {"input_size": [H, W], "resize_policy": "crop"})
    ids = [str(1000 + i) for i in range(n)]
    fine = torch.tensor(fine_ids)[_labels(n, gen).clamp_max(K - 1)]
    coarse = torch.tensor(COCO_STUFF_FINE_TO_COARSE)[fine]
    onehot = F.one_hot(coarse, 27).permute(0, 3, 1, 2).float()
    noise = torch.randn(n, C, H, W, generator=gen)
    hires = torch.einsum("kc,nkhw->nchw", proj, onehot) + 0.6 * noise if encode else noise
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(fine[i].numpy().astype(np.uint8)).save(buf, format="PNG")
        (labels_dir / f"{int(ids[i]):012d}.png").write_bytes(buf.getvalue())
    for k in range(schema.num_shards):
        a, b = schema.shard_rows(k)
        write_shard(group, k, {
            "image_id": np.array(ids[a:b]), "uri": np.array([""] * (b - a)), "error": np.array([""] * (b - a)),
            "orig_size": np.full((b - a, 2), H, np.int32), "valid_size": np.full((b - a, 2), H, np.int32),
            "hires": hires[a:b].half().numpy(), "lowres": F.avg_pool2d(hires[a:b], 4).half().numpy(),
            "status": np.full(b - a, Status.COMPLETE, np.uint8),
        })


def test_eval_probe_job_compares_stores(tmp_path):
    """jobs/eval_probe.py on two stores of the same images: label-encoding features beat noise; preservation runs."""
    import json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "jobs"))
    import eval_probe

    labels = tmp_path / "labels"
    labels.mkdir()
    _labelled_store(str(tmp_path / "good.zarr"), labels, encode=True)
    _labelled_store(str(tmp_path / "noise.zarr"), labels, encode=False)
    out = tmp_path / "r.json"
    eval_probe.main(["--store", f"good={tmp_path / 'good.zarr'}", "--store", f"noise={tmp_path / 'noise.zarr'}:hires",
                     "--labels", str(labels), "--epochs", "12", "--lr", "0.05", "--val-fraction", "0.34",
                     "--preservation", "--protocol", "adamw-raw", "lbfgs-std", "--lbfgs-pixels", "2048",
                     "--out", str(out)])
    doc = json.loads(out.read_text())
    summary = {(s["name"], s["protocol"], s["train_array"]): s for s in doc["summary"]}
    assert len(summary) == 2 * 2 * 2  # stores x protocols x (hires, lowres)
    for proto in ("adamw-raw", "lbfgs-std"):
        good, noise = summary[("good", proto, "hires")], summary[("noise", proto, "hires")]
        assert good["miou"] > 0.7 and noise["miou"] < good["miou"] - 0.3, (proto, good, noise)
        assert good["boundary_miou"] > 0.5 and "boundary_pixel_accuracy" in good, good
        lowres = summary[("good", proto, "lowres")]
        assert lowres["array"] == "hires" and lowres["miou"] > 0.5, (proto, lowres)
    fits = [r for r in doc["results"] if r["protocol"] == "lbfgs-std"]
    assert fits and all(r["lbfgs_converged"] and r["lbfgs_pixels"] <= 2048 + 8 for r in fits)


def test_eval_probe_job_refuses_lbfgs_for_depth_and_unknown_protocols(tmp_path):
    from pipeline.evaluate.probe_job import EvalProbeConfig, store_ref

    store = (store_ref(f"a={tmp_path / 'a.zarr'}"),)
    with pytest.raises(ConfigError, match="depth probes take adamw-raw or adamw-std"):
        EvalProbeConfig(store=store, labels=str(tmp_path), label_kind="depth", protocol=("lbfgs-std",))
    with pytest.raises(ConfigError, match="--protocol sgd: use one or more of adamw-raw"):
        EvalProbeConfig(store=store, labels=str(tmp_path), protocol=("sgd",))
    assert EvalProbeConfig(store=store, labels=str(tmp_path), protocol=("all",)).protocol == (
        "adamw-raw", "adamw-std", "lbfgs-std", "lbfgs-raw")


def test_eval_probe_job_needs_the_class_count_of_a_folder_label_set(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "jobs"))
    import eval_probe

    code = eval_probe.main(["--store", f"a={tmp_path / 'a.zarr'}", "--labels", str(tmp_path), "--label-kind", "folder"])
    assert code == 2 and "eval_probe: --label-kind folder needs --num-classes" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- probe protocols
def _loader_fn(feats: torch.Tensor, lab: torch.Tensor, bs: int = 4):
    """``loader(shuffle)`` over in-memory batches (shuffle ignored: the tests need no randomness), with image ids."""
    def loader(shuffle: bool):
        return [{"features": feats[i : i + bs], "label": lab[i : i + bs],
                 "image_id": [f"img{j}" for j in range(i, min(i + bs, len(feats)))]}
                for i in range(0, len(feats), bs)]
    return loader


def test_standardisation_uses_training_statistics_only():
    _, lab_tr, lab_te, f_tr, f_te = _dataset(seed=5)
    f_tr = 3.0 * f_tr + 2.0
    f_te = 0.5 * f_te - 7.0  # test statistics far from the training ones
    mean, std = channel_stats(_batches(f_tr, lab_tr))
    flat = f_tr.double().transpose(0, 1).reshape(C, -1)
    assert torch.allclose(mean.double(), flat.mean(1), atol=1e-5)
    assert torch.allclose(std.double(), flat.std(1, unbiased=False), atol=1e-5)
    # the L-BFGS probe's training pixels: its sample (512 pixels over 16 images, seed 0)
    sample, _ = collect_pixels(_loader_fn(f_tr, lab_tr)(False), 32, seed=0)
    sample_stats = (sample.double().mean(0).float(), sample.double().std(0, unbiased=False).float())
    for name, (m_ref, s_ref) in (("adamw-std", (mean, std)), ("lbfgs-std", sample_stats)):
        probe, _ = train_protocol_probe(name, _loader_fn(f_tr, lab_tr), K, images=len(f_tr),
                                        cfg=ProbeConfig(epochs=2, lr=5e-2, seed=0), lbfgs=LBFGSConfig(pixels=512))
        assert isinstance(probe, StandardizedProbe), name
        std_layer = probe.standardize
        assert torch.allclose(std_layer.mean, m_ref, atol=1e-5) and torch.allclose(std_layer.std, s_ref, atol=1e-5)
        assert (std_layer.mean - f_te.mean((0, 2, 3))).abs().min() > 5.0, name  # nothing of the test features
        # and scoring applies those same statistics to the test features
        expected = (f_te[:1] - m_ref.view(1, -1, 1, 1)) / s_ref.view(1, -1, 1, 1)
        assert torch.allclose(std_layer(f_te[:1]), expected, atol=1e-5), name
        assert torch.allclose(probe(f_te[:1]), probe.conv(expected), atol=1e-4), name
    raw, info = train_protocol_probe("adamw-raw", _loader_fn(f_tr, lab_tr), K, images=len(f_tr),
                                     cfg=ProbeConfig(epochs=1))
    assert isinstance(raw, torch.nn.Conv2d) and info == {"protocol": "adamw-raw"}


def test_lbfgs_probe_converges_on_a_separable_problem_with_its_l2_applied():
    gen = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(K, C, generator=gen)
    y = torch.arange(400) % K
    x = centres[y] + 0.3 * torch.randn(400, C, generator=gen)  # linearly separable (well-separated clusters)
    weights = {}
    for l2 in (1e-4, 1e-2):
        cfg = LBFGSConfig(l2=l2, max_iter=500, tolerance_grad=1e-6)
        w, b, res = fit_lbfgs(x, y, K, cfg)
        assert res.converged and res.grad_max <= 1e-6 and res.iterations < 500, res
        assert ((x.double() @ w.T + b).argmax(1) == y).all()
        # stationarity of the regularised objective: grad of the mean cross-entropy = -l2 * W, bias unpenalised
        wv, bv = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        F.cross_entropy(x.double() @ wv.T + bv, y).backward()
        assert torch.allclose(wv.grad, -l2 * w, atol=2e-6), l2
        assert bv.grad.abs().max() <= 2e-6
        weights[l2] = float(w.norm())
    assert 0 < weights[1e-2] < weights[1e-4] < 1e4  # finite: the L2 term bounds a separable problem's weights


def test_lbfgs_probe_module_scores_like_its_fit():
    _, lab_tr, lab_te, f_tr, f_te = _dataset(seed=2)
    for standardize in (True, False):
        probe, res = train_lbfgs_segmentation_probe(_loader_fn(f_tr, lab_tr)(False), K, per_image=64, seed=0,
                                                    standardize=standardize)
        assert res.converged and res.pixels == 64 * len(f_tr), res
        m = evaluate_segmentation_probe(probe, _batches(f_te, lab_te), K)
        assert m.miou > 0.8, (standardize, m)


def test_boundary_mask_marks_exactly_the_pixels_within_8_px_of_a_border():
    gen = torch.Generator().manual_seed(0)
    lab = torch.zeros(2, 40, 44, dtype=torch.int64)
    lab[0, :, 20:] = 1
    lab[0, 30:, :10] = 2
    lab[0, 0:3, 0:3] = IGNORE_INDEX  # an ignored corner: no border against it, never in the band
    lab[1] = torch.randint(0, 3, (5, 5), generator=gen).repeat_interleave(8, 0).repeat_interleave(9, 1)[:40, :44]
    mask = boundary_mask(lab, 8)
    for n in range(2):
        la = lab[n]
        border = torch.zeros_like(la, dtype=torch.bool)
        for y in range(40):
            for x in range(44):
                for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < 40 and 0 <= xx < 44 and la[y, x] != la[yy, xx] \
                            and IGNORE_INDEX not in (int(la[y, x]), int(la[yy, xx])):
                        border[y, x] = True
        pts = border.nonzero()
        yy, xx = torch.meshgrid(torch.arange(40), torch.arange(44), indexing="ij")
        cheb = torch.maximum((yy[..., None] - pts[:, 0]).abs(), (xx[..., None] - pts[:, 1]).abs()).min(-1).values
        expected = (cheb <= 8) & (la != IGNORE_INDEX)
        assert torch.equal(mask[n], expected), n
    assert not mask[0, :3, :3].any() and mask[0, :, 11:29].all() and not mask[0, :, 29:].any()
    assert not mask[0, :20, :11].any()
    assert torch.equal(boundary_mask(lab[0], 8), mask[0])  # (H, W) input too
    assert torch.equal(boundary_mask(torch.ones(5, 5, dtype=torch.int64)), torch.zeros(5, 5, dtype=torch.bool))


def test_boundary_scores_count_only_the_band():
    _, _, lab_te, _, f_te = _dataset(seed=4)
    probe = linear_probe(C, K)
    m = evaluate_segmentation_probe(probe, _batches(f_te, lab_te), K, boundary_px=2)
    band = boundary_mask(lab_te, 2)
    assert m.boundary_pixels == int(band.sum()) and 0 < m.boundary_pixels < m.pixels
    off = evaluate_segmentation_probe(probe, _batches(f_te, lab_te), K, boundary_px=None)
    assert math.isnan(off.boundary_miou) and off.miou == m.miou


def test_two_upsamplers_get_identical_pixel_samples():
    """The L-BFGS sample depends on the labels, the seed and the image id only, never on the features."""
    gen = torch.Generator().manual_seed(0)
    lab = _labels(6, gen)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([torch.arange(6.0).view(6, 1, 1).expand(6, H, W), yy.expand(6, H, W), xx.expand(6, H, W)], 1)
    up_a = torch.cat([pos, torch.randn(6, 5, H, W, generator=gen)], 1)  # two "upsamplers": same position channels,
    up_b = torch.cat([pos, 10 + torch.randn(6, 5, H, W, generator=gen)], 1)  # different features otherwise
    xa, ya = collect_pixels(_loader_fn(up_a, lab)(False), 20, seed=3)
    xb, yb = collect_pixels(_loader_fn(up_b, lab)(False), 20, seed=3)
    assert torch.equal(xa[:, :3], xb[:, :3]) and torch.equal(ya, yb) and not torch.equal(xa, xb)
    assert len(ya) == 6 * 20 and (ya != IGNORE_INDEX).all()
    n, y, x = xa[:, 0].long(), xa[:, 1].long(), xa[:, 2].long()
    assert torch.equal(lab[n, y, x], ya)  # each feature row sits at its label's pixel
    assert len(set(zip(n.tolist(), y.tolist(), x.tolist()))) == len(ya)  # without replacement
    xc, _ = collect_pixels(_loader_fn(up_a, lab)(False), 20, seed=4)
    assert not torch.equal(xa[:, :3], xc[:, :3])  # another probe seed, another sample
    # the same image id gives the same pixels in any batch position (stores in another order)
    perm = [5, 4, 3, 2, 1, 0]
    a = sample_pixels(lab[2], 20, seed=3, key="img2")
    assert torch.equal(a, sample_pixels(lab[perm][3], 20, seed=3, key="img2"))


def test_features_at_equals_resizing_to_the_label_grid():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 7, generator=gen)
    for size in ((16, 16), (11, 9), (5, 7)):
        idx = torch.randperm(size[0] * size[1], generator=gen)[:25]
        full = F.interpolate(feats[None], size=size, mode="bilinear", align_corners=False)[0].reshape(3, -1)
        assert torch.allclose(features_at(feats, idx, size), full[:, idx].T, atol=1e-5), size


def test_protocol_names_are_checked():
    with pytest.raises(ConfigError, match="unknown probe protocol 'sgd'"):
        train_protocol_probe("sgd", lambda shuffle: [], K, images=1)


def test_flipping_the_probe_output_equals_flipping_its_input():
    """The AdamW protocols flip the 1x1 probe's output (cheap) instead of the features: the same loss, also when the
    logits are resized to a larger label map and for the standardised probe."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, C, 5, 7, generator=gen)
    lab = torch.randint(0, K, (3, 10, 14), generator=gen)
    torch.manual_seed(0)
    for probe in (linear_probe(C, K), StandardizedProbe(linear_probe(C, K), torch.randn(C), torch.rand(C) + 0.5)):
        for size in ((5, 7), (10, 14)):
            y = lab if size == (10, 14) else lab[:, :5, :7]
            a = segmentation_loss(probe(feats.flip(-1)), y.flip(-1))
            b = segmentation_loss(probe(feats).flip(-1), y.flip(-1))
            assert torch.allclose(a, b, rtol=1e-6), (size, a, b)


def test_probe_upsamplers_benchmark_reports_every_protocol_against_bilinear(tmp_path, capsys):
    """benchmarks/probe_upsamplers.py end to end on tiny scenes: every upsampler x protocol x seed, deltas to the
    bilinear row of the same seed, boundary scores, the verdict line."""
    import json

    from benchmarks import probe_upsamplers

    out = tmp_path / "r.json"
    probe_upsamplers.main(["--train-scenes", "2", "--test-scenes", "1", "--size", "64", "--seeds", "0", "1",
                           "--epochs", "1", "--lbfgs-pixels", "256", "--lbfgs-max-iter", "30",
                           "--upsampler", "bil=bilateral", "--checkpoint", "jbu0=jbu-untrained",
                           "--upsampler", "again=bilinear", "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == ["bilinear", "bil", "jbu0"]  # bilinear first, once
    for name, row in rows.items():
        assert set(row["protocols"]) == set(PROTOCOLS)
        for proto, cell in row["protocols"].items():
            assert [r["seed"] for r in cell["seeds"]] == [0, 1]
            base = rows["bilinear"]["protocols"][proto]["seeds"]
            assert cell["d_miou_seeds"] == pytest.approx([a["miou"] - b["miou"] for a, b in zip(cell["seeds"], base)])
            assert 0 <= cell["bmiou"] <= 100 and 0 <= cell["miou"] <= 100
            assert ("iterations" in cell) == proto.startswith("lbfgs")
        if name == "bilinear":
            assert all(c["d_miou"] == 0 for c in row["protocols"].values())
    text = capsys.readouterr().out
    assert "above under all" in text and text.count("protocol lbfgs-raw:") == 1


def test_the_adamw_probe_advances_a_shard_samplers_epoch_so_batch_order_changes():
    """A store's ShardBatchSampler shuffles per epoch only when told the epoch: the probe's loop tells it."""
    from torch.utils.data import DataLoader, Dataset, Sampler

    from pipeline.evaluate.probe import ProbeConfig, train_segmentation_probe

    class Items(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"features": torch.randn(3, 4, 4, generator=g), "label": torch.randint(0, 2, (4, 4), generator=g)}

    class Batches(Sampler):
        def __init__(self):
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self):
            return iter([[0, 1], [2, 3]])

        def __len__(self):
            return 2

    sampler = Batches()
    train_segmentation_probe(DataLoader(Items(), batch_sampler=sampler), 2, cfg=ProbeConfig(epochs=3), in_channels=3)
    assert sampler.epochs == [0, 1, 2]
