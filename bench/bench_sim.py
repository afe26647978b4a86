"""`vg-ros bench sim`: wall time to simulate a drive of the default rig with the bag written (target: 20 s of
data in <= 2 minutes on 2 cores), plus the per-stage cost of one tick (cameras, LiDAR, occupancy + masks).

    vg-ros bench sim [--seconds 20] [--seed 0] [--threads 2] [--keep DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def quality(seeds: list[int], seconds: float = 2.0) -> dict:
    """Ground-truth consistency over ticks 1 s apart of each seed: LiDAR vs rendered camera depth (median
    relative error), LiDAR returns in a voxel of their own class, expression uniqueness and the hop mix."""
    import numpy as np

    from vg_ros.geometry import invert_T, project_points, transform_points, voxel_indices
    from vg_ros.sim import simulate
    from vg_ros.sim.core import get_renderer
    from vg_ros.sim.language import resolve, visible_objects

    depth_err, same_class, unique, hops = [], [], [], []
    for seed in seeds:
        for f in simulate(seed, seconds, every=10, expressions=6):
            world, _ = get_renderer(seed, f.rig)
            pts = transform_points(f.rig.lidar.T_base_lidar, f.lidar.xyz.astype(np.float64))
            for cam in f.rig.cameras:
                uv, d, ok = project_points(cam.K, invert_T(cam.T_base_cam), pts, cam.width, cam.height)
                pix = np.floor(uv[ok]).astype(int)
                depth_err.append(np.median(np.abs(f.depth[cam.name][pix[:, 1], pix[:, 0]] - d[ok]) / d[ok]))
            idx, inside = voxel_indices(pts, f.grid)
            same_class.append(float((f.occupancy[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
                                     == f.lidar_labels[inside]).mean()))
            for e in f.expressions:
                objs = visible_objects(world, f.instance[e.camera], f.depth[e.camera])
                unique.append(resolve(objs, e.text) == [e.instance_id])
                hops.append(e.hops)
    mix = np.bincount(hops, minlength=3) / max(len(hops), 1)
    return {"median_rel_depth_error_worst_camera": float(np.max(depth_err)),
            "lidar_in_same_class_voxel_min": float(np.min(same_class)),
            "lidar_in_same_class_voxel_mean": float(np.mean(same_class)),
            "expressions": len(unique), "expressions_unique": float(np.mean(unique)) if unique else 0.0,
            "hop_mix": [float(v) for v in mix]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vg-ros bench sim", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of data to simulate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rig", default="default")
    ap.add_argument("--threads", type=int, default=2, help="Open3D/BLAS threads (sets OMP_NUM_THREADS)")
    ap.add_argument("--keep", default="", help="keep the bag in this directory (default: a temp dir, removed)")
    ap.add_argument("--quality-seeds", type=int, default=3, help="seeds for the ground-truth checks (0: skip)")
    ap.add_argument("--json", dest="json_out", default="")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads))

    import numpy as np

    from vg_ros.sim.cli import write_bag
    from vg_ros.sim.core import get_renderer
    from vg_ros.types import Rig

    rig = Rig.load(args.rig)
    t0 = time.perf_counter()
    _, renderer = get_renderer(args.seed, rig)
    setup_s = time.perf_counter() - t0
    stages = {}
    for name, kw in (("cameras", dict(cameras=True, lidar=False, occupancy=False)),
                     ("lidar", dict(cameras=False, lidar=True, occupancy=False)),
                     ("all (cameras + lidar + occupancy + masks)", dict(cameras=True, lidar=True, occupancy=True))):
        times = []
        for k in range(3):
            t = time.perf_counter()
            renderer.render(0.1 * k, k, **kw)
            times.append(time.perf_counter() - t)
        stages[name] = float(np.median(times))
    out_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_sim_"))
    out = out_dir / f"bench_seed{args.seed}.mcap"
    try:
        stats = write_bag(out, args.seed, args.seconds, rig, overwrite=True)
        size = sum(p.stat().st_size for p in out.iterdir())
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    rate = stats.data_seconds / stats.wall_seconds
    result = {"seconds_of_data": stats.data_seconds, "frames": stats.frames, "wall_s": stats.wall_seconds,
              "data_s_per_wall_s": rate, "frames_per_s": stats.frames / stats.wall_seconds, "setup_s": setup_s,
              "bag_mb": size / 1e6, "per_tick_s": stages, "threads": args.threads, "cpus": os.cpu_count()}
    print(f"sim bench: {stats.data_seconds:.1f} s of data ({stats.frames} frames, rig {rig.name}) in "
          f"{stats.wall_seconds:.1f} s wall -> {rate:.3f} s of data per wall second "
          f"({stats.frames / stats.wall_seconds:.2f} frames/s), bag {size / 1e6:.0f} MB; world+renderer setup {setup_s:.1f} s")
    for name, s in stages.items():
        print(f"  one tick, {name}: {s * 1000:.0f} ms")
    verdict = "PASS" if stats.wall_seconds <= 120 * args.seconds / 20 else "FAIL"
    print(f"  target: 20 s of data in <= 120 s wall -> {verdict}")
    if args.quality_seeds > 0:
        q = quality(list(range(args.quality_seeds)))
        result["quality"] = q
        print(f"quality over seeds 0..{args.quality_seeds - 1} (ticks 1 s apart): LiDAR vs camera depth, worst "
              f"per-camera median relative error {100 * q['median_rel_depth_error_worst_camera']:.2f} %; LiDAR returns "
              f"in a voxel of their class: min {100 * q['lidar_in_same_class_voxel_min']:.1f} %, mean "
              f"{100 * q['lidar_in_same_class_voxel_mean']:.1f} %; {q['expressions']} expressions, "
              f"{100 * q['expressions_unique']:.0f} % unique; hop mix 0/1/2 = "
              + "/".join(f"{100 * v:.0f} %" for v in q["hop_mix"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0
