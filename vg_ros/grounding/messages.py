"""The message-level steps of grounding that `grounding_node` and `vg-ros replay` share: one image or one
synchronised camera set in, the camera to publish and its result out; the target's LiDAR position from the
cloud nearest the image. Messages are duck-typed (rclpy or rosbags classes alike); no rclpy import here.

Each step counts what it cannot do in the caller's DropCounter (`drops.drop(reason, detail)`) and goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from vg_ros.grounding.pipeline import GroundingPipeline, best_camera, camera_evidence, check_image
from vg_ros.types import CameraFrame, CameraModel, GroundingResult


@dataclass
class Grounded:
    """The published camera of one image set: its image message, decoded RGB, frame and result.
    `calibrated` False: no intrinsics were known for the camera, so the 2D outputs stand but no 3D position
    is computed from them."""

    msg: Any
    rgb: np.ndarray
    frame: CameraFrame
    result: GroundingResult
    calibrated: bool = True


@dataclass
class CloudPoints:
    """A LiDAR cloud as the position lookup needs it: the PointCloud2's header (stamp, frame_id) and its
    finite points (N, 3) in that frame, parsed once when it arrives."""

    header: Any
    xyz: np.ndarray


def parse_cloud(msg: Any) -> CloudPoints:
    """CloudPoints of a sensor_msgs/PointCloud2; ValueError for a malformed one (no x/y/z field, a
    point_step or data that does not fit its fields and size)."""
    from vg_ros.convert import pointcloud2_to_scan
    return CloudPoints(msg.header, pointcloud2_to_scan(msg).xyz)


def add_cloud(clouds: Any, msg: Any, drops: Any, topic: str) -> None:
    """Parse a cloud into `clouds` (a StampedBuffer); a malformed one is counted (`bad_cloud`) and left out,
    so it never stands in for a good cloud near an image."""
    from vg_ros.convert import stamp_of
    try:
        cloud = parse_cloud(msg)
    except ValueError as exc:
        drops.drop("bad_cloud", f"cloud {stamp_of(msg)} on {topic}: {exc}")
        return
    clouds.add(stamp_of(msg), cloud)


def image_camera(msg: Any, width: int, height: int, info: Any, rig: Any, drops: Any, *,
                 rectified: bool = False) -> CameraModel | None:
    """The intrinsics of an image `msg` of `width` x `height`: its camera's latest CameraInfo `info` (binning
    and region of interest applied; P's with `rectified`) when it describes an image of that size (a
    malformed one is counted, `bad_camera_info`, and passed over), else the rig camera named by the image's
    frame, scaled to the image; None when neither knows the camera."""
    from vg_ros.convert import camera_info_to_model

    if info is not None:
        try:
            camera = camera_info_to_model(info, rectified=rectified)
        except ValueError as exc:
            drops.drop("bad_camera_info", f"{msg.header.frame_id!r}: {exc}")
        else:
            if (camera.width, camera.height) == (width, height):
                return camera
    frame = msg.header.frame_id
    for cam in rig.cameras:
        if frame in (cam.frame_id, cam.name):
            return cam.scaled(width, height)
    return None


def _nominal_camera(frame: str, width: int, height: int) -> CameraModel:
    """A pinhole stand-in for a camera without intrinsics: the network's 2D outputs do not depend on it."""
    f = float(width)
    return CameraModel(frame or "camera", width, height, np.array([[f, 0, width / 2], [0, f, height / 2],
                                                                    [0, 0, 1.0]]), np.eye(4), frame)


class CameraChoice:
    """Which camera of a set to publish, from the evidence of the command's sets so far: each camera's
    `camera_evidence` summed over the sets since the command came, an earlier set's weighed down by half per
    `half_life` seconds of stamp between them (0.1 s: at the default rig's 10 Hz, half per set, the last three
    sets carrying seven eighths; a gap in the images lets the old evidence fade as the time passes, and a
    faster camera does not shorten the memory). One set alone is easily fooled (for a frame, something like
    the target scores a little higher in another camera); a few frames together less so: in `vg-ros replay`
    of two drives of commands about any camera (docs/grounding.md; scored then against the command's camera
    alone) the summed evidence gave Prec@0.5 30.9 / 31.5 % with the default weights and 38.3 / 34.2 % with
    the first presence head, one set alone (`best_camera`) 26.8 / 29.3 % and 34.6 / 31.5 %. The sums start
    again with each new command; a camera missing from a set keeps its sum, decayed. `half_life` 0: each set
    on its own (`best_camera`, found results first)."""

    MAX_HALF_LIFE = 60.0

    def __init__(self, half_life: float = 0.1) -> None:
        self.half_life = float(half_life)
        if not 0.0 <= self.half_life <= self.MAX_HALF_LIFE:
            raise ValueError(f"camera evidence half-life {half_life} s: must be in [0, {self.MAX_HALF_LIFE:g}]")
        self.command: str | None = None
        self.sums: dict[str, float] = {}
        self.weight = 0.0   # the sets' decayed count: sums / weight is each camera's weighted mean evidence
        self.stamp_ns: int | None = None

    def choose(self, command: str | None, cameras: Sequence[str], results: Sequence[GroundingResult],
               stamp_ns: int) -> int:
        """The index into `results` (one per camera of the set stamped `stamp_ns`, named by `cameras`) to
        publish. A set stamped before the last one (out of order) decays nothing."""
        if self.half_life == 0.0:   # this set alone
            self.command, self.weight = command, 1.0
            self.sums = {camera: camera_evidence(result) for camera, result in zip(cameras, results)}
            return best_camera(results)
        if command != self.command:
            self.command, self.sums, self.weight, self.stamp_ns = command, {}, 0.0, None
        if self.stamp_ns is not None:
            weight = 0.5 ** (max(int(stamp_ns) - self.stamp_ns, 0) / (self.half_life * 1e9))
            for camera in self.sums:
                self.sums[camera] *= weight
            self.weight *= weight
        self.stamp_ns = int(stamp_ns) if self.stamp_ns is None else max(self.stamp_ns, int(stamp_ns))
        for camera, result in zip(cameras, results):
            self.sums[camera] = self.sums.get(camera, 0.0) + camera_evidence(result)
        self.weight += 1.0
        return max(range(len(results)), key=lambda i: (self.sums[cameras[i]], -i))

    def mean_evidence(self, camera: str) -> float:
        """`camera`'s evidence over the command's sets so far as a weighted mean (the sum over the sets'
        decayed count), in [0, 1] as `camera_evidence`; 0 for a camera not seen yet."""
        return self.sums.get(camera, 0.0) / self.weight if self.weight > 0 else 0.0


def ground_set(pipeline: GroundingPipeline, msgs: Sequence[Any], topics: Sequence[str],
               camera_of: Callable[[int, Any, np.ndarray], CameraModel | None], drops: Any,
               choice: CameraChoice | None = None) -> Grounded | None:
    """Ground the pipeline's command in each image of `msgs` (one per camera, None for a camera missing from
    the set; `topics` names them) and return the camera to publish (`choice`'s, else `best_camera`). An
    image in a foreign encoding (`bad_image`, a ValueError) is left out; one whose camera has no intrinsics
    (`camera_of(index, msg, rgb)` None, e.g. `image_camera`'s) is grounded through a nominal pinhole and
    marked uncalibrated (`target_position` then computes no position from it). None when no image is
    left."""
    from vg_ros.convert import image_to_rgb, stamp_of

    frames = []
    for index, msg in enumerate(msgs):
        if msg is None:
            continue
        stamp = stamp_of(msg)
        try:
            rgb = image_to_rgb(msg)
            check_image(rgb)   # one image too small for the network must not lose the others of the set
            camera = camera_of(index, msg, rgb)
        except ValueError as exc:
            drops.drop("bad_image", f"image {stamp} on {topics[index]}: {exc}")
            continue
        calibrated = camera is not None
        if not calibrated:
            camera = _nominal_camera(msg.header.frame_id, rgb.shape[1], rgb.shape[0])
        frames.append((topics[index], msg, rgb, CameraFrame(camera, rgb, stamp), calibrated))
    if not frames:
        return None
    results = pipeline.infer_many([f[3] for f in frames])   # one batch through the network
    best = (best_camera(results) if choice is None
            else choice.choose(pipeline.command, [f[0] for f in frames], results, frames[0][3].stamp_ns))
    _, msg, rgb, frame, calibrated = frames[best]
    return Grounded(msg, rgb, frame, results[best], calibrated)


def odometry_base_pose(msg: Any, extrinsics: Any) -> np.ndarray:
    """T_odom_base (4, 4) from a nav_msgs/Odometry whose child frame may be another frame fixed on the vehicle
    (base_footprint, a sensor): T_odom_child T_child_base, the latter from `extrinsics` (a TfOrRig; identity
    for the base frame itself). KeyError for a child frame the extrinsics do not know, ValueError for a
    malformed pose."""
    from vg_ros.convert import odometry_to_matrix
    from vg_ros.geometry import invert_T

    T_odom_child, _ = odometry_to_matrix(msg)
    child = str(msg.child_frame_id or "")
    if not child:
        return T_odom_child
    T_base_child, _ = extrinsics.lookup(child)
    return T_odom_child @ invert_T(T_base_child)


def add_odometry(motion: Any, msg: Any, extrinsics: Any, drops: Any, topic: str) -> None:
    """Add a nav_msgs/Odometry from `topic` to `motion` (a PoseBuffer) as T_odom_base
    (`odometry_base_pose`); a malformed pose or an unknown child frame is counted (`bad_odometry`)."""
    from vg_ros.convert import stamp_of
    try:
        motion.add(stamp_of(msg), odometry_base_pose(msg, extrinsics))
    except (ValueError, KeyError) as exc:
        drops.drop("bad_odometry", f"on {topic}: {exc}")


def target_position(pipeline: GroundingPipeline, grounded: Grounded, clouds: Any, max_cloud_age: float,
                    extrinsics: Any, drops: Any, motion: Any = None) -> tuple[np.ndarray, Any] | None:
    """(the target's position (3,) in the LiDAR frame at the image's stamp, the CloudPoints it came from)
    for a found result: from the cloud of `clouds` (a StampedBuffer of `add_cloud`'s CloudPoints) nearest the
    image within `max_cloud_age` s, the camera and LiDAR extrinsics (`extrinsics.lookup(frame)`, a TfOrRig) and the points inside the mask.

    `motion` (a PoseBuffer of the vehicle's odometry, or None): a cloud swept at another instant than the
    image is first moved by the vehicle's motion between the two stamps, so a target is looked up where the
    camera saw it, not where the LiDAR did (at 10 m/s, 0.05 s apart: half a metre). Counted in `drops`'
    processed as `position_motion_compensated`, or `position_not_compensated` when the odometry does not
    cover both stamps. None, counted (`no_matching_cloud`, `no_intrinsics`, `no_extrinsics`,
    `too_few_points_in_mask`), when one of the inputs is missing; also None, uncounted, when not found or
    before any cloud came."""
    from vg_ros.convert import stamp_of
    from vg_ros.geometry import transform_points

    result, camera = grounded.result, grounded.frame.camera
    if not result.found:
        return None
    stamp = grounded.frame.stamp_ns
    cloud, gap_s = clouds.nearest(stamp, float(max_cloud_age))
    if cloud is None:
        if gap_s is not None:   # clouds came, none near this image
            drops.drop("no_matching_cloud", f"image {stamp}: the nearest of the recent clouds is {gap_s:.3f} s "
                       f"away (max_cloud_age {max_cloud_age})")
        return None
    if not grounded.calibrated:
        drops.drop("no_intrinsics", f"image {stamp}: no CameraInfo or rig camera for frame "
                   f"{grounded.msg.header.frame_id!r}, so no position")
        return None
    try:
        T_base_cam, _ = extrinsics.lookup(grounded.msg.header.frame_id or camera.name)
        T_base_lidar, _ = extrinsics.lookup(cloud.header.frame_id)
    except KeyError as exc:
        drops.drop("no_extrinsics", str(exc))
        return None
    xyz = cloud.xyz
    cloud_stamp = stamp_of(cloud)
    if motion is not None and cloud_stamp != stamp:
        T_img_cloud = motion.motion(cloud_stamp, stamp)   # base at the image <- base at the sweep
        if T_img_cloud is None:
            drops.ok("position_not_compensated")
        else:
            xyz = transform_points(np.linalg.inv(T_base_lidar) @ T_img_cloud @ T_base_lidar, xyz)
            drops.ok("position_motion_compensated")
    position = pipeline.locate(result, xyz, np.linalg.inv(T_base_cam) @ T_base_lidar, camera)
    if position is None:
        drops.drop("too_few_points_in_mask", f"image {stamp}: not enough LiDAR points inside the mask")
        return None
    return position, cloud
