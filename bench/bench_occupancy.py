"""Occupancy benchmark: CPU latency of TPVFormer per 6-camera frame (tiny, small), and the memory of TPV
features against a dense voxel feature volume at three resolutions (how cost grows with resolution).

    vg-ros bench occupancy [--configs tiny small] [--repeats 3] [--threads 2] [--channels 128]

Latency runs the whole `OccupancyPipeline.infer` (resize, encoder, full 200x200x16 decode, observed mask) on
random images from the default rig with untrained weights (speed does not depend on the values).
Memory: the three planes C x (XY + XZ + YZ) against C x X x Y x Z, float32, as allocated tensors
(`nbytes`), plus the process's peak RSS growth when the dense volume is actually written (measured
first, before the model runs, so the growth is visible).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from vg_ros.occupancy.model import MODEL_CONFIGS
from vg_ros.occupancy.pipeline import OccupancyConfig, OccupancyPipeline
from vg_ros.types import CameraFrame, Rig

RESOLUTIONS = ((50, 50, 4), (100, 100, 8), (200, 200, 16))


def latency(config: str, repeats: int) -> dict:
    torch.manual_seed(0)
    pipe = OccupancyPipeline(OccupancyConfig(model=config), weights="random", device="cpu")
    rng = np.random.default_rng(0)
    frames = [CameraFrame(c, rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8))
              for c in Rig.load("default").cameras]
    pipe.infer(frames, 0)  # warm-up (and the cached observed mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.infer(frames, 0)
        times.append(time.perf_counter() - start)
    return {"config": config, "input": MODEL_CONFIGS[config].image_size, "median_s": statistics.median(times),
            "min_s": min(times)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory(channels: int) -> list[dict]:
    rows = []
    for X, Y, Z in RESOLUTIONS:
        planes = [torch.zeros(channels, X, Y), torch.zeros(channels, X, Z), torch.zeros(channels, Y, Z)]
        tpv_bytes = sum(p.nbytes for p in planes)
        before = _peak_rss_mb()
        dense = torch.ones(channels, X, Y, Z)  # written, so the pages are really resident
        dense_rss = _peak_rss_mb() - before
        rows.append({"resolution": (X, Y, Z), "tpv_mb": tpv_bytes / 2**20, "dense_mb": dense.nbytes / 2**20,
                     "ratio": dense.nbytes / tpv_bytes, "dense_peak_rss_growth_mb": dense_rss})
        del dense, planes
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vg-ros bench occupancy", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(MODEL_CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", type=int, default=128, help="feature channels for the memory comparison")
    p.add_argument("--skip-latency", action="store_true")
    args = p.parse_args(argv)
    for name in ("threads", "repeats", "channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"Feature memory, C = {args.channels}, float32: TPV planes vs dense voxel volume")
    for r in memory(args.channels):
        X, Y, Z = r["resolution"]
        print(f"  {X}x{Y}x{Z}: TPV {r['tpv_mb']:.2f} MB, dense {r['dense_mb']:.1f} MB -> dense/TPV = {r['ratio']:.1f}x"
              f" (peak RSS grew {r['dense_peak_rss_growth_mb']:.0f} MB for the dense volume)")
    if not args.skip_latency:
        print(f"CPU latency per 6-camera frame ({args.threads} threads, median of {args.repeats}):")
        for config in args.configs:
            r = latency(config, args.repeats)
            print(f"  {r['config']:<6} input {r['input'][0]}x{r['input'][1]}: {r['median_s']:.2f} s "
                  f"(min {r['min_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
