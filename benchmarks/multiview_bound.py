"""How low can the held-out multi-view error go? A per-image lower bound for any upsampler.

For each photo, a free high-res map ``(1, C, H, W)`` (started at bilinear) is fitted by Adam to a bank of random
views of that photo (the training jitter; a seed the validation never uses), then scored exactly as
``pipeline.train`` validates: ``featup_ops.multiview.reconstruction_error`` on the 10 fixed validation views, box
downsampler, relative squared error, as a ratio to bilinear's. No upsampler that sees only the low-res features and
the image can beat a map fitted to that image's own views, so the ratio bounds what training can reach; the JBU's
and the implicit network's figures (docs/training.md, docs/implicit.md) are read against it.

    python benchmarks/multiview_bound.py                       # plant and skate (the training job's held-out pair), 128 px
    python benchmarks/multiview_bound.py --size 224 --steps 400 --images plant
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", default=["plant", "skate"], help="sample photo names (pipeline/samples)")
    p.add_argument("--size", type=int, default=128, help="input side (crop), a multiple of 32 (default 128)")
    p.add_argument("--bank", type=int, default=200, help="random views the map is fitted to (default 200)")
    p.add_argument("--steps", type=int, default=400, help="Adam steps, 10 bank views each (default 400)")
    p.add_argument("--lr", type=float, default=0.03)
    args = p.parse_args(argv)

    import torch

    import featup_ops
    from featup_ops.downsamplers import BlurDownsampler
    from featup_ops.jitter import apply_jitter, sample_jitter
    from featup_ops.multiview import fixed_views, reconstruction_error
    from featup_ops.config import TrainConfig
    from pipeline.io.decode import decode_image, normalize
    from pipeline.train import VAL_SEED, VAL_VIEWS

    torch.manual_seed(0)
    backbone = featup_ops.load_backbone("efficientnet_lite0").eval().requires_grad_(False)
    size = (args.size, args.size)
    jitter_cfg = TrainConfig().jitter  # the training views' ranges
    views = fixed_views(VAL_VIEWS, size, jitter_cfg, seed=VAL_SEED)
    bank = sample_jitter(args.bank, size, jitter_cfg, generator=torch.Generator().manual_seed(VAL_SEED + 1))
    down = BlurDownsampler(backbone.stride)
    ratios = []
    for name in args.images:
        path = REPO / "pipeline" / "samples" / f"{Path(name).stem}.jpg"
        pixels = decode_image(path.read_bytes(), size=size, policy="crop").pixels
        x = normalize(pixels[None], backbone.mean, backbone.std)
        t0 = time.perf_counter()
        with torch.no_grad():
            low = backbone(x)
            targets = [backbone(apply_jitter(x, bank.index([v]))) for v in range(args.bank)]
            bilinear = featup_ops.BilinearUpsampler()(low, x)
            err_bilinear = float(reconstruction_error(bilinear, x, backbone, views)[0])
        hr = bilinear.clone().requires_grad_(True)
        opt = torch.optim.Adam([hr], lr=args.lr)
        for _ in range(args.steps):
            loss = torch.zeros(())
            for v in torch.randint(0, args.bank, (10,)).tolist():
                t = targets[v]
                d = down(apply_jitter(hr, bank.index([v])), (int(t.shape[-2]), int(t.shape[-1])))
                loss = loss + (d - t).pow(2).mean() / t.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        err = float(reconstruction_error(hr.detach(), x, backbone, views)[0])
        ratios.append(err / err_bilinear)
        print(f"{path.stem} {args.size} px (grid {tuple(low.shape[-2:])}): bilinear {err_bilinear:.4f}, fitted map "
              f"{err:.4f}, ratio {err / err_bilinear:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"mean ratio (fitted map / bilinear) over {len(ratios)} images: {sum(ratios) / len(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
