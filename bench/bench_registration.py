"""`vg-ros bench registration`: our VBReg pipeline against Open3D RANSAC on the same pairs and the same
FPFH features, and our LiDAR odometry against KISS-ICP on the same simulated drive.

Pairs: the real pairs in ../shared/data/registration (when present) and held-out simulator pairs.
RANSAC: Open3D `registration_ransac_based_on_feature_matching` as in Open3D's global-registration
tutorial (mutual filter, distance 1.5 x voxel, ransac_n 3, edge-length 0.9 + distance checkers,
RANSACConvergenceCriteria(100000, 0.999) = the API default, which stops early once confident), and a
100k setting, RANSACConvergenceCriteria(100000, 1.0): up to 100,000 iterations with no confidence-based
early exit. RANSAC is seeded (`o3d.utility.random.seed(0)`); its time includes its FPFH, as ours does.
Odometry: a 60 s simulated drive, our LidarOdometry vs KISS-ICP's Python pipeline (`KissICP`), drift (%
over 10-50 m segments: a ratio between the two, not comparable with KITTI's 100-800 m figures), ATE and
Hz; on every point and on the points above the simulator's flat ground (see `bench_odometry`). Every side
runs on one thread. `--lidar-motion`: the drive's sweeps bent by the ego motion (`simulate(lidar_motion=True)`)
and both sides deskewing them from the per-point time (KISS-ICP's pose is its sweep's middle: scored against
the ground truth there; ours is moved back to the stamp: scored there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "registration"
GROUND_MARGIN_M = 0.3


def real_pairs():
    from vg_ros.registration.io import read_3dmatch_log, read_cloud, read_pose_txt
    from vg_ros.registration.train import CloudPair
    if not SHARED.is_dir():
        return []
    geo, kit, lid = SHARED / "3dmatch_pair_geotransformer", SHARED / "3dmatch_redkitchen_0_4", SHARED / "lidar_pair_small_gicp"
    return [
        ("indoor", CloudPair("3dmatch_geotransformer", np.load(geo / "src.npy"), np.load(geo / "ref.npy"), np.load(geo / "gt.npy"))),
        ("indoor", CloudPair("3dmatch_redkitchen_0_4", read_cloud(kit / "cloud_bin_4.ply"), read_cloud(kit / "cloud_bin_0.ply"),
                             read_3dmatch_log(kit / "gt.log")[(0, 4)])),
        ("lidar", CloudPair("lidar_small_gicp", read_cloud(lid / "source.ply"), read_cloud(lid / "target.ply"),
                            read_pose_txt(lid / "T_target_source.txt"))),
    ]


def ransac(pipe, pair, confidence: float, seed: int = 0, structure_only: bool = False):
    """Open3D RANSAC on the pipeline's own downsampled points and FPFH. Returns (T, seconds).
    `structure_only`: only the points our pipeline matches (non-ground on LiDAR), to separate the
    effect of that choice from the solver's."""
    import open3d as o3d
    from vg_ros.registration.features import to_o3d
    reg = o3d.pipelines.registration
    o3d.utility.random.seed(seed)
    start = time.perf_counter()
    src_pts, dst_pts = pipe.preprocess(pair.src, "source"), pipe.preprocess(pair.dst, "target")
    src_normals, src_desc = pipe.describe(src_pts)
    dst_normals, dst_desc = pipe.describe(dst_pts)
    if structure_only:
        src_keep, dst_keep = pipe.structure_masks(src_normals, dst_normals)
        src_pts, src_desc, dst_pts, dst_desc = src_pts[src_keep], src_desc[src_keep], dst_pts[dst_keep], dst_desc[dst_keep]
    src_f, dst_f = reg.Feature(), reg.Feature()
    src_f.data = np.ascontiguousarray(src_desc.T, dtype=np.float64)
    dst_f.data = np.ascontiguousarray(dst_desc.T, dtype=np.float64)
    dist = 1.5 * pipe.cfg.voxel_size
    result = reg.registration_ransac_based_on_feature_matching(
        to_o3d(src_pts), to_o3d(dst_pts), src_f, dst_f, True, dist,
        reg.TransformationEstimationPointToPoint(False), 3,
        [reg.CorrespondenceCheckerBasedOnEdgeLength(0.9), reg.CorrespondenceCheckerBasedOnDistance(dist)],
        reg.RANSACConvergenceCriteria(100000, confidence))
    return np.asarray(result.transformation).copy(), time.perf_counter() - start


def bench_pairs(sim_seeds, pairs_per_seed: int, weights: str, log=print) -> dict:
    from vg_ros.registration.metrics import THRESHOLDS, rotation_error_deg, translation_error
    from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
    from vg_ros.registration.train import PairSpec, sim_pairs

    spec = PairSpec(pairs_per_seed=pairs_per_seed)
    pairs = real_pairs() + [("lidar", p) for seed in sim_seeds for p in sim_pairs(seed, spec)]
    pipes = {preset: {"ours": RegistrationPipeline(RegistrationConfig.preset(preset), weights=weights),
                      "ours_compat_only": RegistrationPipeline(RegistrationConfig.preset(preset), weights=None)}
             for preset in ("indoor", "lidar")}
    methods = ["ours", "ours_compat_only", "ransac_default", "ransac_100k", "ransac_100k_structure"]
    rows = {m: {"re": [], "te": [], "ok": [], "s": []} for m in methods}
    for preset, pair in pairs:
        re_max, te_max = THRESHOLDS[preset]
        for method in methods:
            if method.startswith("ours"):
                res = pipes[preset][method].register(pair.src, pair.dst)
                T, seconds = res.transform, res.seconds
            else:
                T, seconds = ransac(pipes[preset]["ours"], pair, 0.999 if method == "ransac_default" else 1.0,
                                    structure_only=method.endswith("_structure"))
            re, te = rotation_error_deg(T, pair.T_gt), translation_error(T, pair.T_gt)
            rows[method]["re"].append(re)
            rows[method]["te"].append(te)
            rows[method]["ok"].append(re < re_max and te < te_max)
            rows[method]["s"].append(seconds)
        log(f"  {pair.name:<28}" + "  ".join(f"{m}: {'ok ' if rows[m]['ok'][-1] else 'BAD'} {rows[m]['s'][-1]:.2f}s"
                                              for m in methods))
    summary = {m: {"pairs": len(r["ok"]), "rr": float(np.mean(r["ok"])), "median_re_deg": float(np.median(r["re"])),
                   "median_te_m": float(np.median(r["te"])), "seconds_per_pair": float(np.mean(r["s"]))}
               for m, r in rows.items()}
    return {"pairs": [p.name for _, p in pairs], "summary": summary}


def _drive(ours, kiss, frames, T_bl, keep) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Both odometries over `frames`, each scan reduced to its points where `keep(xyz)`: (our poses, our
    seconds, KISS-ICP's poses, its seconds), base_link in odom. KISS-ICP gets the per-point times (it uses
    them only with its deskew on)."""
    from vg_ros.geometry import invert_T

    est, wall, kiss_est, kiss_wall = [], 0.0, [], 0.0
    for f in frames:
        sel = keep(f.lidar.xyz)
        scan = dataclasses.replace(f.lidar, **{k: getattr(f.lidar, k)[sel] for k in ("xyz", "intensity", "ring", "time")
                                               if getattr(f.lidar, k) is not None})
        start = time.perf_counter()
        res = ours.update(scan)
        wall += time.perf_counter() - start
        est.append(res.pose)
        points = scan.xyz.astype(np.float64)
        start = time.perf_counter()
        kiss.register_frame(points, scan.time.astype(np.float64))
        kiss_wall += time.perf_counter() - start
        kiss_est.append(T_bl @ np.asarray(kiss.last_pose) @ invert_T(T_bl))  # lidar poses -> base_link
    return np.stack(est), wall, np.stack(kiss_est), kiss_wall


def bench_odometry(seed: int, seconds: float, weights: str, log=print, lidar_motion: bool = False) -> dict:
    """Ours and KISS-ICP on the same drive, twice: on every point, and on the points above the ground. The
    simulated street is perfectly flat and half the beams hit it within 7 m; those rings move with the
    sensor and hold point-to-point ICP (KISS-ICP) back, while GICP takes the ground as one plane. The
    non-ground run removes that advantage of the simulator. `lidar_motion`: bent sweeps, both deskewing."""
    from kiss_icp.config import KISSConfig
    from kiss_icp.kiss_icp import KissICP

    from vg_ros.geometry import invert_T
    from vg_ros.registration.metrics import ate, rpe_drift_percent
    from vg_ros.registration.odometry import LidarOdometry, OdometryConfig
    from vg_ros.sim import simulate
    from vg_ros.sim.core import get_renderer

    frames = list(simulate(seed, seconds, cameras=False, occupancy=False, expressions=0, lidar_motion=lidar_motion))
    T_bl = frames[0].rig.lidar.T_base_lidar
    gt = np.stack([invert_T(frames[0].T_odom_base) @ f.T_odom_base for f in frames])
    gt_kiss = gt
    if lidar_motion:   # KISS-ICP registers (and reports) each sweep at its middle
        world, _ = get_renderer(seed, frames[0].rig)
        middles = [world.T_odom_base(f.t + 0.5 * float(f.lidar.time.min() + f.lidar.time.max())) for f in frames]
        gt_kiss = np.stack([invert_T(middles[0]) @ T for T in middles])
    cfg = OdometryConfig(deskew=lidar_motion)
    ground_z = -float(T_bl[2, 3]) + GROUND_MARGIN_M   # the flat ground in the (level) LiDAR frame, plus a margin
    variants = {"all points": lambda xyz: np.ones(len(xyz), bool),
                f"above the ground (z_lidar > {ground_z:.2f} m)": lambda xyz: xyz[:, 2] > ground_z}
    out = {"seed": seed, "scans": len(frames), "lidar_motion": lidar_motion, "deskew": lidar_motion,
           "path_m": float(np.linalg.norm(np.diff(gt[:, :3, 3], axis=0), axis=1).sum()), "variants": {}}
    for name, keep in variants.items():
        kcfg = KISSConfig()   # its defaults for the sensor; deskew as ours (off: the sweeps are cast at one instant)
        kcfg.data.max_range, kcfg.data.min_range, kcfg.data.deskew = cfg.max_range, cfg.min_range, lidar_motion
        kcfg.mapping.voxel_size = cfg.max_range / 100.0
        kcfg.registration.max_num_threads = 1
        ours = LidarOdometry(cfg, T_base_lidar=T_bl, weights=weights)
        est, wall, kiss_est, kiss_wall = _drive(ours, KissICP(kcfg), frames, T_bl, keep)
        out["variants"][name] = {
            "ours": {"drift_percent": rpe_drift_percent(est, gt), "ate_m": ate(est, gt), "hz": len(frames) / wall,
                     "stats": ours.stats},
            "kiss_icp": {"drift_percent": rpe_drift_percent(kiss_est, gt_kiss), "ate_m": ate(kiss_est, gt_kiss),
                         "hz": len(frames) / kiss_wall}}
        log(f"  {name}: done")
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vg-ros bench registration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-seeds", type=int, nargs="*", default=[9000, 9001, 9002, 9003, 9004])
    parser.add_argument("--pairs-per-seed", type=int, default=4)
    parser.add_argument("--odometry-seed", type=int, default=9100)
    parser.add_argument("--odometry-seconds", type=float, default=60.0)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--skip-pairs", action="store_true")
    parser.add_argument("--skip-odometry", action="store_true")
    parser.add_argument("--lidar-motion", action="store_true",
                        help="odometry on sweeps bent by the ego motion, both sides deskewing (default: sweeps cast "
                             "at one instant, deskew off for both)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.pairs_per_seed < 1:
        parser.error(f"--pairs-per-seed {args.pairs_per_seed}: must be >= 1")
    if not 1 <= args.odometry_seconds < float("inf"):   # under a second: too few scans for a drift
        parser.error(f"--odometry-seconds {args.odometry_seconds}: must be a finite number >= 1")
    # one thread for every side, whatever the shell says: Open3D's RANSAC and FPFH (OpenMP) read this at
    # import, torch below, KISS-ICP and small_gicp by their configs; printed so a run says what it compared
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    report: dict = {"threads": {"OMP_NUM_THREADS": 1, "torch": 1, "kiss_icp": 1, "small_gicp": 1}}
    log = (lambda *a, **k: None) if args.json else print
    log("threads: 1 per method (OMP_NUM_THREADS=1, torch 1, KISS-ICP max_num_threads 1)")
    if not args.skip_pairs:
        log("pairs (real + held-out sim):")
        report["pairs"] = bench_pairs(args.sim_seeds, args.pairs_per_seed, args.weights, log)
        s = report["pairs"]["summary"]
        log(f"\n{'method':<22}{'RR':>8}{'med RE deg':>12}{'med TE m':>10}{'s/pair':>9}{'time vs ours':>14}")
        for m, r in s.items():
            log(f"{m:<22}{r['rr'] * 100:>7.1f}%{r['median_re_deg']:>12.3f}{r['median_te_m']:>10.3f}"
                f"{r['seconds_per_pair']:>9.2f}{ratio(r['seconds_per_pair'], s['ours']['seconds_per_pair']):>14}")
    if not args.skip_odometry:
        bent = ", sweeps bent by the ego motion, both deskewing" if args.lidar_motion else ""
        log(f"\nodometry: {args.odometry_seconds:.0f} s simulated drive (seed {args.odometry_seed}{bent})")
        od = bench_odometry(args.odometry_seed, args.odometry_seconds, args.weights, log, args.lidar_motion)
        report["odometry"] = od
        log(f"{od['scans']} scans, {od['path_m']:.0f} m")
        for name, variant in od["variants"].items():
            log(f"{name}:\n{'method':<12}{'drift %':>9}{'ATE m':>9}{'Hz':>8}")
            for m in ("ours", "kiss_icp"):
                r = variant[m]
                log(f"{m:<12}{r['drift_percent']:>9.3f}{r['ate_m']:>9.3f}{r['hz']:>8.1f}")
            log(f"ratios KISS-ICP/ours: drift {ratio(variant['kiss_icp']['drift_percent'], variant['ours']['drift_percent'])}"
                f"; Hz ours/KISS-ICP {ratio(variant['ours']['hz'], variant['kiss_icp']['hz'])}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
