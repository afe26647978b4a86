"""`vg-ros register SOURCE TARGET` (global VBReg registration of two point-cloud files) and
`vg-ros odometry BAG --topic T` (LiDAR odometry over a rosbag2's PointCloud2 topic, scored against a
ground-truth pose topic when present)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vg_ros.cli import UserError


def register_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vg-ros register", description="Register SOURCE into TARGET's frame (VBReg).")
    parser.add_argument("source", help=".ply | .pcd | .npy (N x 3+) | .bin (KITTI x4 / nuScenes x5 float32)")
    parser.add_argument("target")
    parser.add_argument("--preset", default="indoor", choices=("indoor", "lidar"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-refine", action="store_true", help="skip the GICP refinement")
    parser.add_argument("--weights", default="default", help="'default', a .safetensors path, or 'none' (compatibility only)")
    parser.add_argument("--bin-fields", type=int, choices=(3, 4, 5), default=None, help="floats per point in .bin files")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    from vg_ros.registration.io import read_cloud
    from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
    try:
        source = read_cloud(args.source, args.bin_fields)
        target = read_cloud(args.target, args.bin_fields)
        cfg = RegistrationConfig.preset(args.preset)
        if args.no_refine:
            cfg = cfg.replace(local_refine=False)
        pipe = RegistrationPipeline(cfg, weights=None if args.weights == "none" else args.weights, device=args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    res = pipe.register(source, target)
    if args.json:
        out = {"transform": res.transform.tolist(), "inliers": int(res.inliers), "inlier_ratio": float(res.inlier_ratio),
               "fitness": float(res.fitness), "seconds": float(res.seconds), "converged": bool(res.converged),
               "covariance": res.covariance.tolist()}
        if res.reason:
            out["reason"] = res.reason
        print(json.dumps(out))
    else:
        np.set_printoptions(precision=6, suppress=True)
        print("transform (maps source into target):")
        print(res.transform)
        print(f"inliers {res.inliers}  inlier_ratio {res.inlier_ratio:.3f}  fitness {res.fitness:.3f}  "
              f"seconds {res.seconds:.2f}  converged {res.converged}" + (f"  reason: {res.reason}" if res.reason else ""))
    return 0 if res.converged else 1


def bag_lidar_extrinsics(reader, topic: str, rig: str | None, base_frame: str = "base_link") -> tuple[np.ndarray, str]:
    """(T_base_lidar, where it came from) for the clouds on `topic` (the first one's header frame): as the
    node looks them up, the bag's /tf_static chain `base_frame` <- that frame, else the rig (`rig`, else
    "default") camera/LiDAR of that frame name. Where the node would drop the clouds, this command goes on:
    with `rig` given, that rig's LiDAR whatever its frame name, else identity; the string says which."""
    from vg_ros.nodes.extrinsics import TfOrRig
    from vg_ros.types import Rig

    frame = ""
    for _, _, _, msg in reader.messages([topic]):
        frame = str(msg.header.frame_id).lstrip("/")
        break
    frame = frame or "lidar"
    extrinsics = TfOrRig(rig or "default", base_frame)
    if "/tf_static" in reader.topics:
        for _, _, _, msg in reader.messages(["/tf_static"]):
            extrinsics.add_transforms(msg.transforms)
    try:
        T, source = extrinsics.lookup(frame)
        return T, ("the bag's /tf_static" if source == "tf_static" else f"rig {extrinsics.rig.name!r}") + \
            f" ({base_frame} <- {frame})"
    except KeyError:
        pass
    in_tf = frame in extrinsics.static
    why = (f"the bag's /tf_static has {frame!r} but no chain to {base_frame!r} (--base-frame?)" if in_tf else
           f"neither the bag's /tf_static nor rig {extrinsics.rig.name!r} knows {base_frame} <- {frame!r}")
    if rig:
        return Rig.load(rig).lidar.T_base_lidar, f"rig {rig!r}'s LiDAR ({why})"
    return np.eye(4), f"identity: {why} (odometry of the LiDAR itself; --rig names the sensor's mounting)"


def run_bag_odometry(bag: str | Path, topic: str, gt_topic: str | None, cfg=None, T_base_lidar=None,
                     weights: str | None = "default", max_scans: int | None = None, require_gt: bool = False,
                     rig: str | None = None, base_frame: str = "base_link") -> dict:
    """Odometry over a bag's PointCloud2 topic. Returns stats; ATE / drift when `gt_topic` has poses
    (`gt_topic` absent from the bag: ValueError with `require_gt`, else `gt_topic` None in the report).
    The LiDAR's extrinsics: `T_base_lidar` when given, else `bag_lidar_extrinsics` (`extrinsics` in the
    report says which)."""
    from vg_ros import convert
    from vg_ros.bag import BagReader
    from vg_ros.registration.metrics import ate, path_lengths, rpe_drift_percent
    from vg_ros.registration.odometry import LidarOdometry, OdometryConfig

    est: dict[int, np.ndarray] = {}
    twist_cov: dict[int, np.ndarray] = {}   # stamp -> covariance of the motion since the previous pose
    gt: dict[int, np.ndarray] = {}
    failures: list[str] = []
    gt_malformed: list[str] = []
    wall = 0.0
    with BagReader(bag) as reader:
        if topic not in reader.topics:
            raise ValueError(f"topic {topic!r} not in bag (has {sorted(reader.topics)})")
        msgtype = reader.topics[topic][0]
        if msgtype.replace("/msg/", "/") != "sensor_msgs/PointCloud2":
            clouds = sorted(t for t, (m, _) in reader.topics.items() if m.replace("/msg/", "/") == "sensor_msgs/PointCloud2")
            raise ValueError(f"topic {topic!r} is {msgtype}, not sensor_msgs/PointCloud2 (clouds in this bag: "
                             f"{clouds or 'none'})")
        if gt_topic and gt_topic not in reader.topics:
            if require_gt:
                raise ValueError(f"ground-truth topic {gt_topic!r} not in bag (has {sorted(reader.topics)})")
            gt_topic = None
        if T_base_lidar is None:
            T_base_lidar, extrinsics = bag_lidar_extrinsics(reader, topic, rig, base_frame)
        else:
            extrinsics = "given"
        odo = LidarOdometry(cfg or OdometryConfig(), T_base_lidar=T_base_lidar, weights=weights)
        topics = [topic] + ([gt_topic] if gt_topic else [])
        for name, _, _, msg in reader.messages(topics):
            if name == topic:
                start = time.perf_counter()
                try:   # a malformed cloud is one failure, as the node drops it, not the end of the run
                    scan = convert.pointcloud2_to_scan(msg)
                    res = odo.update(scan)
                except ValueError as exc:
                    failures.append(str(exc))
                    continue
                wall += time.perf_counter() - start
                if res.converged:
                    est[res.stamp_ns] = res.pose
                    if res.twist_covariance is not None:
                        twist_cov[res.stamp_ns] = res.twist_covariance
                else:
                    failures.append(res.reason)
                if max_scans and odo.stats["scans"] >= max_scans:
                    break
            else:
                try:   # a NaN or zero-quaternion pose is one unscored ground truth, not the end of the run
                    gt[convert.stamp_of(msg)] = convert.stamped_pose_to_matrix(msg)
                except ValueError as exc:
                    gt_malformed.append(f"{gt_topic} stamp {convert.stamp_of(msg)}: {exc}")
    scans = odo.stats["scans"]
    report = {"scans": scans, "converged": len(est), "relocalized": odo.stats["relocalized"], "gt_topic": gt_topic,
              "extrinsics": extrinsics,
              "failed": odo.stats["failed"], "map_restarts": odo.stats["map_restarts"],
              "hz": scans / wall if wall > 0 else 0.0,
              "seconds": wall, "first_failures": failures[:5], "gt_malformed": len(gt_malformed),
              "first_gt_malformed": gt_malformed[:5]}
    if odo.cfg.deskew:   # sweeps deskewed a second time with their own motion; sweeps left distorted (bad times)
        report.update(deskewed_again=odo.stats["deskewed_again"], deskew_skipped=odo.stats["deskew_skipped"])
    stamps = sorted(est)
    if stamps:
        poses = np.stack([est[s] for s in stamps])
        report["path_length_m"] = float(path_lengths(poses)[-1])
    if gt and stamps:
        gt_stamps = np.array(sorted(gt))
        paired_est, paired_gt, matched = [], [], []
        for s in stamps:
            k = int(np.argmin(np.abs(gt_stamps - s)))
            if abs(gt_stamps[k] - s) <= 5_000_000:
                paired_est.append(est[s])
                paired_gt.append(gt[int(gt_stamps[k])])
                matched.append(s)
        if len(paired_est) >= 2:
            E, G = np.stack(paired_est), np.stack(paired_gt)
            G = np.linalg.inv(G[0]) @ G  # GT relative to the first matched scan, like odom
            E = np.linalg.inv(E[0]) @ E
            drift = rpe_drift_percent(E, G)   # NaN when the GT path has no length: None in the JSON
            report.update({"gt_matched": len(E), "ate_m": ate(E, G),
                           "drift_percent": drift if np.isfinite(drift) else None})
            check = covariance_check(matched, twist_cov, E, G, odo.cfg.covariance_scale)
            if check is not None:
                check["covariance_prior_deviation"] = odo.cfg.covariance_prior_deviation
                report["covariance_check"] = check
    return report


COVARIANCE_AXES = ("x", "y", "z", "roll", "pitch", "yaw")


def covariance_check(stamps: list[int], twist_cov: dict[int, np.ndarray], E: np.ndarray, G: np.ndarray,
                     scale: float) -> dict | None:
    """How honest the published covariances are. For each motion step between consecutive scans (base_link
    frame: x, y, z, then rotation about x, y, z; as the twist, times dt), the error against ground truth in
    units of the standard deviation the twist covariance claims, |z|. A Gaussian with honest covariances
    gives |z| a median of 0.67 and a 90th percentile of 1.64 on every axis. Reported per axis: those two,
    and the RMS error over the RMS claimed deviation (x, y, yaw are what a ground robot's filter fuses; run
    again with other --covariance-scale / --covariance-prior-deviation to calibrate). `stamps` are the scans
    matched to `E` / `G` (relative poses, in order). None with fewer than 5 steps."""
    from vg_ros.registration.odometry import motion_step

    errors, deviations = [], []
    for k in range(1, len(stamps)):
        cov = twist_cov.get(stamps[k])
        if cov is None:   # the first scan, a re-localisation: no motion published
            continue
        dt = (stamps[k] - stamps[k - 1]) / 1e9
        errors.append(motion_step(E[k - 1], E[k]) - motion_step(G[k - 1], G[k]))
        deviations.append(np.sqrt(np.maximum(np.diag(cov), 0.0)) * dt)
    if len(errors) < 5:
        return None
    errors, deviations = np.asarray(errors), np.maximum(np.asarray(deviations), 1e-15)
    z = np.abs(errors) / deviations
    rms_ratio = np.sqrt(np.mean(errors ** 2, axis=0) / np.mean(deviations ** 2, axis=0))
    p90 = np.percentile(z, 90, axis=0)

    def per_axis(values: np.ndarray) -> dict:
        return {a: float(v) for a, v in zip(COVARIANCE_AXES, values)}
    return {"steps": len(errors), "covariance_scale": scale, "z_median": per_axis(np.median(z, axis=0)),
            "z_p90": per_axis(p90), "rms_error_over_claimed": per_axis(rms_ratio),
            "rms_error": per_axis(np.sqrt(np.mean(errors ** 2, axis=0)))}


def odometry_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vg-ros odometry", description="LiDAR odometry over a bag's PointCloud2 topic.")
    parser.add_argument("bag")
    parser.add_argument("--topic", required=True, help="sensor_msgs/PointCloud2 topic")
    parser.add_argument("--gt-topic", default=None,
                        help="ground-truth pose topic (default /gt/ego_pose, scored when the bag has it; one given "
                             "here must be in the bag)")
    parser.add_argument("--rig", default=None, help="rig (name or path) for T_base_lidar when the bag's /tf_static "
                        "does not give the clouds' frame (default: the default rig, if it names that frame; else "
                        "identity, said so)")
    parser.add_argument("--weights", default="default", help="VBReg weights for re-localisation ('none': compat-only)")
    parser.add_argument("--base-frame", default="base_link", help="the robot's body frame the poses are of (default "
                        "base_link, as the node's base_frame)")
    parser.add_argument("--deskew", action="store_true", help="undistort sweeps with per-point time (the node's "
                        "deskew parameter)")
    parser.add_argument("--deskew-tolerance", type=float, default=None,
                        help="the node's deskew_tolerance (default: OdometryConfig's)")
    parser.add_argument("--covariance-scale", type=float, default=None,
                        help="the node's covariance_scale (default: OdometryConfig's), to calibrate against --gt-topic")
    parser.add_argument("--covariance-prior-deviation", type=float, default=None,
                        help="the node's covariance_prior_deviation (default: OdometryConfig's)")
    parser.add_argument("--max-scans", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.max_scans is not None and args.max_scans < 1:
        raise UserError(f"--max-scans {args.max_scans}: must be >= 1 (leave it out for every scan)")
    from vg_ros.registration.odometry import OdometryConfig
    from vg_ros.types import Rig
    overrides = {k: getattr(args, k) for k in ("covariance_scale", "covariance_prior_deviation", "deskew_tolerance")
                 if getattr(args, k) is not None}
    try:
        cfg = OdometryConfig(deskew=args.deskew, **overrides)   # out of range: one clear error
        if args.rig:
            Rig.load(args.rig)   # a bad name is one clear error before the bag is read
        report = run_bag_odometry(args.bag, args.topic, args.gt_topic or "/gt/ego_pose",
                                  cfg, None,
                                  None if args.weights == "none" else args.weights, args.max_scans,
                                  require_gt=args.gt_topic is not None, rig=args.rig, base_frame=args.base_frame)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(report))
    else:
        print(f"scans {report['scans']}  converged {report['converged']}  re-localised {report['relocalized']}  "
              f"failed {report['failed']}  {report['hz']:.1f} Hz"
              + (f"  map restarted {report['map_restarts']}x" if report["map_restarts"] else ""))
        print(f"extrinsics: {report['extrinsics']}")
        if "path_length_m" in report:
            print(f"path length {report['path_length_m']:.1f} m")
        if "ate_m" in report:
            drift = report["drift_percent"]
            print(f"vs {report['gt_topic']} ({report['gt_matched']} poses): ATE {report['ate_m']:.3f} m  "
                  + (f"drift {drift:.2f} %" if drift is not None else "drift - (the ground truth does not move)"))
            if check := report.get("covariance_check"):
                planar = ("x", "y", "yaw")
                print(f"covariances (covariance_scale {check['covariance_scale']:g}) over {check['steps']} steps: "
                      "|error| / claimed sigma median " + " ".join(f"{a} {check['z_median'][a]:.2f}" for a in planar)
                      + ", 90th percentile " + " ".join(f"{a} {check['z_p90'][a]:.2f}" for a in planar)
                      + f" (honest: 0.67, 1.64); covariance_prior_deviation {check['covariance_prior_deviation']:g}")
        elif report["gt_topic"] is None:
            print("no ground truth in the bag (/gt/ego_pose): not scored; --gt-topic names another")
        else:
            print(f"{report['gt_topic']}: fewer than two poses within 5 ms of a registered scan: not scored")
        for reason in report["first_failures"]:
            print(f"  failure: {reason}")
        if report["gt_malformed"]:
            print(f"{report['gt_malformed']} ground-truth pose(s) not scored, e.g. {report['first_gt_malformed'][0]}")
    return 0
