"""Linear probes on a tiny synthetic labelled set whose features linearly encode the label (plus noise)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluate.probe import (
    IGNORE_INDEX,
    ProbeConfig,
    _schedule,
    evaluate_depth_probe,
    evaluate_segmentation_probe,
    linear_probe,
    metrics_from_confusion,
    train_depth_probe,
    train_segmentation_probe,
)

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
                     "--preservation", "--out", str(out)])
    summary = {(s["name"], s["train_array"]): s for s in json.loads(out.read_text())["summary"]}
    assert summary[("good", "hires")]["miou"] > 0.7, summary
    assert summary[("noise", "hires")]["miou"] < summary[("good", "hires")]["miou"] - 0.3
    assert summary[("good", "lowres")]["array"] == "hires" and summary[("good", "lowres")]["miou"] > 0.5


def test_eval_probe_job_needs_the_class_count_of_a_folder_label_set(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "jobs"))
    import eval_probe

    code = eval_probe.main(["--store", f"a={tmp_path / 'a.zarr'}", "--labels", str(tmp_path), "--label-kind", "folder"])
    assert code == 2 and "eval_probe: --label-kind folder needs --num-classes" in capsys.readouterr().err
