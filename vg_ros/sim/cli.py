"""`vg-ros sim`: write a simulated drive as an mcap rosbag2 with sensor topics, commands and ground truth,
and optionally preview PNGs. `write_bag(...)` is the same as a function (used by the bench and the demo)."""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vg_ros.types import Expression, Rig

WORLD_FRAME = "map"   # the simulated world, fixed (REP-105 map); our odometry starts its own odom at the first scan
ANY_CAMERA = "any"   # --command-camera any: each command about an object in a camera drawn at random
BASE_FRAME = "base_link"


# std_msgs/Header at the stamps whose /gt/grounding target the command's words no longer single out
GT_UNDESCRIBED = "/gt/grounding_undescribed"

@dataclass
class SimBagStats:
    """What `write_bag` produced: frames, commands, seconds of data and wall seconds."""

    path: Path
    frames: int
    commands: int
    data_seconds: float
    wall_seconds: float
    preview: list[Path]


def _topics(rig: Rig, lidar_labels: bool) -> list[tuple[str, str, bool]]:
    # latched (offered transient-local): `ros2 bag play` re-offers them, so a node started late still gets
    # the static TF and the active command
    t = [("/tf_static", "tf2_msgs/msg/TFMessage", True), ("/command", "std_msgs/msg/String", True)]
    for cam in rig.cameras:
        t += [(f"/cameras/{cam.name}/image_raw", "sensor_msgs/msg/Image", False),
              (f"/cameras/{cam.name}/camera_info", "sensor_msgs/msg/CameraInfo", False)]
    t += [("/lidar/points", "sensor_msgs/msg/PointCloud2", False),
          ("/gt/ego_pose", "geometry_msgs/msg/PoseStamped", False),
          ("/gt/occupancy", "vg_ros/msg/SemanticVoxelGrid", False),
          ("/gt/grounding", "vg_ros/msg/GroundingTarget", False),
          ("/gt/grounding_views", "vg_ros/msg/GroundingTarget", False),
          (GT_UNDESCRIBED, "std_msgs/msg/Header", False)]
    if lidar_labels:
        t.append(("/gt/lidar_labels", "sensor_msgs/msg/PointCloud2", False))
    return t


def write_bag(out: str | Path, seed: int, seconds: float, rig: Rig | None = None, *, preview_dir: str | Path | None = None,
              command_every: float = 3.0, command_camera: str = "CAM_FRONT", lidar_labels: bool = True,
              overwrite: bool = False, progress: bool = False, lidar_motion: bool = False) -> SimBagStats:
    """Simulate `seconds` of world `seed` into an mcap rosbag2 at `out` (see docs/sim.md for the topics).
    `command_camera`: the camera the commands refer to, or "any": each command is about an object in a
    camera drawn at random and names nothing in the other cameras at that instant (for multi-camera
    grounding; /gt/grounding names the camera in its header). `lidar_motion`: each sweep distorted by the
    vehicle's motion during it, as a real spinning LiDAR's (`simulate`).
    Raises ValueError for bad arguments (unknown camera, negative duration, existing output...)."""
    from vg_ros import convert
    from vg_ros.bag import BagWriter, typestore
    from vg_ros.sim.core import get_renderer, simulate
    from vg_ros.sim.language import make_expressions, mask_box, resolve, visible_objects

    rig = rig if rig is not None else Rig.load("default")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--seconds: must be a positive number, got {seconds}")
    if math.floor(seconds * rig.lidar.rate_hz + 1e-9) < 1:   # as `simulate` counts its ticks
        raise ValueError(f"--seconds {seconds}: shorter than one sensor period of rig {rig.name!r} "
                         f"({1 / rig.lidar.rate_hz:g} s): the bag would hold no frame")
    if not (math.isfinite(command_every) and command_every > 0):
        raise ValueError(f"--command-every: must be a positive number of seconds, got {command_every}")
    names = [c.name for c in rig.cameras]
    if command_camera != ANY_CAMERA and command_camera not in names:
        raise ValueError(f"--command-camera: rig {rig.name!r} has no camera {command_camera!r} "
                         f"(has {names}, or {ANY_CAMERA!r})")
    world, _ = get_renderer(seed, rig)
    ticks_per_command = max(int(round(command_every * rig.lidar.rate_hz)), 1)
    wall0 = time.perf_counter()
    F = "rosbags"
    store = typestore()
    frames = commands = 0
    active: Expression | None = None
    due = True
    preview_frame = None
    with BagWriter(out, overwrite=overwrite) as bag:
        for topic, msgtype, latched in _topics(rig, lidar_labels):
            bag.add_topic(topic, msgtype, latched=latched)
        for frame in simulate(seed, seconds, rig, expressions=0, lidar_motion=lidar_motion):
            S = frame.stamp_ns
            if frames == 0:
                tfs = [convert.matrix_to_transform_stamped(c.T_base_cam, S, BASE_FRAME, c.frame_id, flavor=F)
                       for c in rig.cameras]
                tfs.append(convert.matrix_to_transform_stamped(rig.lidar.T_base_lidar, S, BASE_FRAME,
                                                               rig.lidar.frame_id, flavor=F))
                bag.write("/tf_static", S - 2, store.types["tf2_msgs/msg/TFMessage"](transforms=tfs))
            if frame.tick % ticks_per_command == 0:
                due = True
            if due:
                rng = np.random.default_rng([int(seed), frame.tick, 11])
                if command_camera != ANY_CAMERA:
                    new = make_expressions(world, command_camera, frame.instance[command_camera],
                                           frame.depth[command_camera], rng, 1, S)
                else:
                    new = _command_about_any_camera(world, frame, names, rng, S)
                if new:
                    active, due = new[0], False
                    bag.write("/command", S - 1, store.types["std_msgs/msg/String"](data=active.text))
                    commands += 1
                    if preview_frame is None:
                        preview_frame = (frame, active)
            for c in rig.cameras:
                bag.write(f"/cameras/{c.name}/image_raw", S,
                          convert.array_to_image(frame.images[c.name], "rgb8", stamp_ns=S, frame_id=c.frame_id, flavor=F))
                bag.write(f"/cameras/{c.name}/camera_info", S, convert.camera_model_to_info(c, S, flavor=F))
            bag.write("/lidar/points", S, convert.scan_to_pointcloud2(frame.lidar, flavor=F))
            bag.write("/gt/ego_pose", S, convert.matrix_to_pose_stamped(frame.T_odom_base, S, WORLD_FRAME, flavor=F))
            bag.write("/gt/occupancy", S, convert.voxel_grid_to_msg(frame.occupancy, frame.grid, S, BASE_FRAME,
                                                                    frame.mask_camera, frame.mask_lidar, flavor=F))
            if active is not None:
                cam = rig.camera(active.camera)
                mask = frame.instance[cam.name] == active.instance_id
                target = Expression(active.text, cam.name, active.instance_id, mask_box(mask), mask, active.hops, S)
                bag.write("/gt/grounding", S, convert.expression_to_msg(target, S, cam.frame_id, flavor=F))
                # the words may stop singling out the target as the scene moves on ("the car left of the bus"
                # once the bus has passed): the label stays (the command meant that object), and this topic
                # marks the frame so the scores can also be read over the frames the words still describe
                if mask.any() and resolve(visible_objects(world, frame.instance[cam.name], frame.depth[cam.name]),
                                          active.text) != [active.instance_id]:
                    bag.write(GT_UNDESCRIBED, S, convert.make_header(S, cam.frame_id, F))
                for other in rig.cameras:   # the same target wherever else it is seen (multi-camera scoring)
                    if other.name == cam.name:
                        continue
                    view = frame.instance[other.name] == active.instance_id
                    if view.any():
                        bag.write("/gt/grounding_views", S, convert.expression_to_msg(
                            replace(target, camera=other.name, box=mask_box(view), mask=view), S,
                            other.frame_id, flavor=F))
            if lidar_labels:
                bag.write("/gt/lidar_labels", S, convert.xyz_fields_to_pointcloud2(
                    frame.lidar.xyz, {"label": frame.lidar_labels.astype(np.uint8),
                                      "instance": frame.lidar_instance.astype(np.int32)},
                    stamp_ns=S, frame_id=rig.lidar.frame_id, flavor=F))
            if preview_frame is None and frames == 0:
                preview_frame = (frame, None)
            elif preview_frame is not None and preview_frame[1] is None and active is not None:
                preview_frame = (frame, active)
            frames += 1
            if progress and frames % 10 == 0:
                print(f"  {frames} frames, {time.perf_counter() - wall0:.1f} s", flush=True)
    paths = []
    if preview_dir and preview_frame:
        shown = preview_frame[1].camera if preview_frame[1] is not None else names[0]
        paths = write_preview(preview_dir, *preview_frame, command_camera=shown)
    return SimBagStats(Path(out), frames, commands, frames / rig.lidar.rate_hz, time.perf_counter() - wall0, paths)


def _command_about_any_camera(world, frame, names: list[str], rng: np.random.Generator, stamp_ns: int) -> list:
    """[an Expression] about an object in one of the cameras, tried in a random order, that names nothing in
    the other cameras at this instant (the target itself seen by a second camera included, down to 40 pixels):
    for a multi-camera node the command has one right answer. [] when no camera offers one."""
    from vg_ros.sim.language import make_expressions, resolve, visible_objects

    seen = {name: visible_objects(world, frame.instance[name], frame.depth[name], min_pixels=40, min_box=6)
            for name in names}
    for k in rng.permutation(len(names)):
        name = names[int(k)]
        for expr in make_expressions(world, name, frame.instance[name], frame.depth[name], rng, 3, stamp_ns):
            if not any(resolve(seen[other], expr.text) for other in names if other != name):
                return [expr]
    return []


def write_preview(out_dir: str | Path, frame, expression: Expression | None, command_camera: str = "CAM_FRONT") -> list[Path]:
    """PNGs of one SimFrame: cameras.png, bev_occupancy.png, bev_lidar.png and command.png (when given)."""
    from PIL import Image

    from vg_ros.geometry import transform_points
    from vg_ros.sim.preview import bev_image, camera_grid, lidar_on_bev, overlay_mask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(name, rgb):
        p = out / name
        Image.fromarray(rgb).save(p, optimize=False)
        paths.append(p)

    save("cameras.png", camera_grid(frame.images))
    bev = bev_image(frame.occupancy)
    save("bev_occupancy.png", bev)
    pts = transform_points(frame.rig.lidar.T_base_lidar, frame.lidar.xyz.astype(np.float64))
    save("bev_lidar.png", lidar_on_bev((bev * 0.6).astype(np.uint8), pts, frame.grid))
    if expression is not None:
        mask = frame.instance[command_camera] == expression.instance_id
        from vg_ros.sim.language import mask_box
        save("command.png", overlay_mask(frame.images[command_camera], mask, mask_box(mask),
                                         f"[{command_camera}, {expression.hops}-hop] {expression.text}"))
    return paths


def _writable_target(out: Path) -> None:
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot write {str(out)!r} (directory {str(probe)!r} is not writable)")


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError

    ap = argparse.ArgumentParser(prog="vg-ros sim", description=__doc__)
    ap.add_argument("--seed", type=int, default=0, help="world seed (int >= 0)")
    ap.add_argument("--seconds", type=float, required=True, help="seconds of driving to simulate (> 0)")
    ap.add_argument("--out", required=True, help="output rosbag2 (a directory named like drive.mcap)")
    ap.add_argument("--rig", default="default", help="rig name (config/rig_<name>.yaml) or a YAML path")
    ap.add_argument("--preview", default=None, help="directory for preview PNGs")
    ap.add_argument("--command-every", type=float, default=3.0, help="seconds between /command messages")
    ap.add_argument("--command-camera", default="CAM_FRONT",
                    help="camera the commands refer to, or 'any': each command about an object in a camera drawn at "
                         "random, naming nothing in the others (for multi-camera grounding)")
    ap.add_argument("--no-lidar-labels", action="store_true", help="do not write /gt/lidar_labels")
    ap.add_argument("--lidar-motion", action="store_true",
                    help="fire each LiDAR azimuth column from the vehicle's pose at its own time in the sweep (the "
                         "motion distortion of a real spinning LiDAR; undo it with `deskew`); default: each sweep "
                         "at one instant")
    ap.add_argument("--force", action="store_true", help="replace an existing output bag")
    args = ap.parse_args(argv)
    if args.seed < 0:
        raise UserError(f"--seed: must be >= 0, got {args.seed}")
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise UserError(f"--seconds: must be a positive number, got {args.seconds}")
    try:
        rig = Rig.load(args.rig)
        out = Path(args.out)
        _writable_target(out)
        if args.preview:
            _writable_target(Path(args.preview) / "x")
        stats = write_bag(out, args.seed, args.seconds, rig, preview_dir=args.preview,
                          command_every=args.command_every, command_camera=args.command_camera,
                          lidar_labels=not args.no_lidar_labels, overwrite=args.force,
                          lidar_motion=args.lidar_motion)
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or args.out!s}: {exc.strerror or exc}") from None
    except (ValueError, KeyError) as exc:
        raise UserError(str(exc).strip("'\"")) from None
    rate = stats.data_seconds / max(stats.wall_seconds, 1e-9)
    print(f"wrote {stats.path}: {stats.frames} frames ({stats.data_seconds:.1f} s of data), {stats.commands} commands "
          f"in {stats.wall_seconds:.1f} s ({rate:.2f} s of data per wall second)")
    for p in stats.preview:
        print(f"preview: {p}")
    return 0
