"""`vg-ros replay`: the offline path — all three pipelines over a rosbag2, no DDS, outputs into a bag, scored.

    vg-ros replay drive.mcap --out replay_out.mcap [--report DIR] [--json]

Messages are read in log-time order and handed to one stage per pipeline, each configured exactly as its
node (the node's own parameter defaults, then its section of `config/perception.yaml`): the occupancy
stage synchronises the rig's cameras with the node's approximate-time policy (`ApproxTimeSync`), the
registration stage runs LiDAR odometry scan by scan, the grounding stage follows `/command` and the
command camera. Each stage writes the messages its node publishes (same topics — the node's topic
parameters —, same types, the input's header stamp) into OUT.mcap; with the stage defaults:

    /occupancy/grid      nav_msgs/OccupancyGrid       /occupancy/voxels  sensor_msgs/PointCloud2 (x,y,z,label,confidence)
    /registration/odometry  nav_msgs/Odometry         /registration/pose geometry_msgs/PoseStamped
    /grounding/mask      sensor_msgs/Image mono8      /grounding/box     geometry_msgs/PolygonStamped (score in z)
    /grounding/position  geometry_msgs/PointStamped

(`/occupancy/markers`, `/registration/cloud` and `/registration/local_map` are visualisation only and not written.)

`score_bags(input, output)` then scores an output bag — this one, or one the demo recorded from the live
nodes — against the input's `/gt/*` topics, matching by header stamp: occupancy mIoU / IoU (Occ3D, camera
mask), odometry ATE (aligned) and drift %, grounding Prec@0.5 and mask mIoU. Scores are over the frames
that have an output; `coverage` says how many of the ground-truth frames that is. Grounding ground truth
whose target is out of view (empty mask) is not scored but counted (`gt_target_not_visible`, and how
often the node still claimed a target: `found_when_not_visible`). Grounding in several cameras, the target
as the other cameras see it (`/gt/grounding_views`) counts too: a frame is scored while any grounded camera
shows the target, and a target published in one that shows it is scored against that view
(`found_in_other_view`), in one that does not it is a miss (`found_in_wrong_camera`). A pipeline that cannot
run (weights missing, module absent) gets `{"available": false, "reason": ...}` and the others still run.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vg_ros.sim.cli import GT_UNDESCRIBED   # stamps whose target the words no longer single out
from vg_ros.types import FREE_CLASS, NUM_OCC_CLASSES

PIPELINES = ("occupancy", "registration", "grounding")
# pipeline -> its section in the result (the JSON contract calls the registration section "odometry")
SECTIONS = {"occupancy": "occupancy", "registration": "odometry", "grounding": "grounding"}

# Topic parameters a stage reads from its node's parameters (these defaults apply until the node module exists).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "occupancy": {
        "image_topic_pattern": "/cameras/{name}/image_raw", "camera_info_topic_pattern": "/cameras/{name}/camera_info",
        "cameras": [], "grid_topic": "/occupancy/grid", "voxels_topic": "/occupancy/voxels",
        "sync_slop": 0.05, "sync_queue": 10, "missing_camera_timeout": 0.5,
    },
    "registration": {"points_topic": "/lidar/points", "odom_topic": "/registration/odometry",
                     "pose_topic": "/registration/pose",
                     "odom_frame": "odom"},
    "grounding": {"image_topic": "/cameras/CAM_FRONT/image_raw", "camera_info_topic": "/cameras/CAM_FRONT/camera_info",
                  "command_topic": "/command", "points_topic": "/lidar/points", "mask_topic": "/grounding/mask",
                  "box_topic": "/grounding/box", "position_topic": "/grounding/position", "max_cloud_age": 0.15},
}
# The pipeline config of each node, used directly while a node module is absent.
CONFIG_CLASSES = {"occupancy": ("vg_ros.occupancy.pipeline", "OccupancyConfig"),
                  "registration": ("vg_ros.registration.odometry", "OdometryConfig"),
                  "grounding": ("vg_ros.grounding.pipeline", "GroundingConfig")}
GT_TOPICS = {"occupancy": "/gt/occupancy", "odometry": "/gt/ego_pose", "grounding": "/gt/grounding"}
# the command's target as the cameras other than the command's see it (`vg-ros sim` writes one message per
# such camera and frame): a node grounding in several cameras is right to publish it in any of them
GT_GROUNDING_VIEWS = "/gt/grounding_views"
# the message types score_bags reads on each ground-truth topic (the ego pose as `vg-ros odometry` takes it)
GT_TYPES = {GT_TOPICS["occupancy"]: ("vg_ros/msg/SemanticVoxelGrid",),
            GT_TOPICS["odometry"]: ("geometry_msgs/msg/PoseStamped", "nav_msgs/msg/Odometry",
                                    "geometry_msgs/msg/TransformStamped"),
            GT_TOPICS["grounding"]: ("vg_ros/msg/GroundingTarget",),
            GT_GROUNDING_VIEWS: ("vg_ros/msg/GroundingTarget",),
            GT_UNDESCRIBED: ("std_msgs/msg/Header",)}


class PipelineUnavailable(Exception):
    """A pipeline cannot run here (module or weights missing): its section says why, the rest runs."""


# --------------------------------------------------------------------------------------------- settings


def node_class(capability: str):
    """The node class of `capability` (a PerceptionNode subclass), or None when its module is absent."""
    from vg_ros.up import NODES
    module_name = NODES[capability][1]
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    from vg_ros.nodes.base import PerceptionNode
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, PerceptionNode) and value.__module__ == module_name:
            return value
    return None


def node_settings(capability: str, config_path: str | Path | None = None) -> tuple[Any, dict]:
    """(pipeline config, node parameters) for `capability`, resolved as the node resolves them:
    node defaults, then its section of the YAML; topic names fully qualified as in the root namespace.
    While the node module is absent, its pipeline's config class and STAGE_DEFAULTS stand in. Raises
    PipelineUnavailable when the pipeline does not import."""
    from vg_ros.config import load_section, split_params
    from vg_ros.nodes.base import COMMON_PARAMS
    from vg_ros.up import NODES

    try:
        cls = node_class(capability)
        module_name, class_name = CONFIG_CLASSES[capability]
        config_cls = cls.config_cls if cls is not None else getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # noqa: BLE001 - an import error of a pipeline module: say which
        raise PipelineUnavailable(f"{capability} does not import: {type(exc).__name__}: {exc}") from None
    params = {k: v for k, (v, _) in COMMON_PARAMS.items()}
    params.update(STAGE_DEFAULTS[capability])
    if cls is not None:
        params.update({k: v for k, (v, _) in cls.node_params.items()})
    section = load_section(config_path, NODES[capability][0])
    cfg = None
    if config_cls is not None:
        cfg_values, rest = split_params(section, config_cls)
        cfg = config_cls.from_dict(cfg_values)
        for f in dataclasses.fields(cfg):
            if f.name in params:
                params[f.name] = getattr(cfg, f.name)
    else:
        rest = section
    params.update(rest)
    # topics as a node without a namespace resolves them (bags name them absolutely), and a compressed
    # camera read where its node reads it: <image topic>/compressed
    from vg_ros.nodes.topics import camera_topic, global_topics
    params = global_topics(params)
    transport = str(params.get("image_transport", "raw"))
    for key in ("image_topic", "image_topic_pattern"):
        if key in params:
            params[key] = camera_topic(str(params[key]), transport)
    if params.get("extra_image_topics"):
        params["extra_image_topics"] = [camera_topic(str(t), transport) for t in params["extra_image_topics"]]
    return cfg, params


def output_topics(config_path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """What each node publishes (and reads), from its parameters as configured:
    {"occupancy": {"grid", "voxels", "images"}, "odometry": {"odometry", "pose", "points"},
     "grounding": {"mask", "box", "position", "image", "images"}}. `primary` names the output counted per
    frame; grounding's `images` are its cameras' topics (image_topic, then extra_image_topics)."""
    from vg_ros.types import Rig
    p: dict[str, dict] = {}
    for cap in PIPELINES:
        try:
            p[cap] = node_settings(cap, config_path)[1]
        except (PipelineUnavailable, ValueError):
            p[cap] = {**STAGE_DEFAULTS[cap]}
    occ, reg, gro = p["occupancy"], p["registration"], p["grounding"]
    try:
        names = list(occ.get("cameras") or [c.name for c in Rig.load(str(occ.get("rig", "default"))).cameras])
    except ValueError:
        names = []
    grounding_images = [gro["image_topic"], *(gro.get("extra_image_topics") or [])]
    return {
        "occupancy": {"grid": occ["grid_topic"], "voxels": occ["voxels_topic"], "primary": occ["voxels_topic"],
                      "inputs": [str(occ["image_topic_pattern"]).format(name=n) for n in names]},
        "odometry": {"odometry": reg["odom_topic"], "pose": reg["pose_topic"], "primary": reg["odom_topic"],
                     "inputs": [reg["points_topic"]]},
        "grounding": {"mask": gro["mask_topic"], "box": gro["box_topic"], "position": gro["position_topic"],
                      "primary": gro["box_topic"], "inputs": grounding_images, "image": gro["image_topic"],
                      "images": grounding_images},
    }


def latency_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ms = np.asarray(seconds) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


# ----------------------------------------------------------------------------------------------- stages


class Stage:
    """One pipeline over the bag: `topics` it reads, `feed()` per message, `finish()` at the end."""

    name = ""

    def __init__(self, params: dict, writer: Any) -> None:
        self.params = params
        self.writer = writer
        self.seconds: list[float] = []
        self.frames = 0
        from vg_ros.nodes.inputs import DropCounter, StampGuard
        import logging
        self.drops = DropCounter(logging.getLogger(f"vg_ros.replay.{self.name}"), log_period_s=30.0)
        self.stamps = StampGuard(self.drops)
        self.topics: set[str] = set()

    def feed(self, topic: str, msg: Any) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def timed(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds.append(time.perf_counter() - start)

    def summary(self) -> dict:
        return {"available": True, "frames_out": self.frames, "latency_ms": latency_ms(self.seconds),
                "busy_seconds": float(sum(self.seconds)), **self.drops.snapshot()}


class OccupancyStage(Stage):
    name = "occupancy"

    def __init__(self, cfg: Any, params: dict, writer: Any, rig: Any, extrinsics: Any, device: str) -> None:
        super().__init__(params, writer)
        try:
            from vg_ros.occupancy.pipeline import OccupancyPipeline, bev_occupancy
            self.pipeline = OccupancyPipeline(cfg, weights=params.get("weights", "default"), device=device)
        except (ImportError, FileNotFoundError, OSError, ValueError, RuntimeError) as exc:
            raise PipelineUnavailable(f"{type(exc).__name__}: {exc}") from None
        from vg_ros.nodes.inputs import ApproxTimeSync
        self.cfg = cfg
        self.bev = bev_occupancy
        self.extrinsics = extrinsics
        names = list(params.get("cameras") or [c.name for c in rig.cameras])
        self.cameras = names
        self.image_topics = [str(params["image_topic_pattern"]).format(name=n) for n in names]
        self.info_topics = [str(params["camera_info_topic_pattern"]).format(name=n) for n in names]
        self.topics = set(self.image_topics) | set(self.info_topics)
        self.infos: dict[str, Any] = {}
        self.sync = ApproxTimeSync(len(names), self._on_set, slop_s=float(params["sync_slop"]),
                                   queue_size=int(params["sync_queue"]),
                                   partial_timeout_s=float(params["missing_camera_timeout"]) or None,
                                   min_topics=1, drops=self.drops, names=self.image_topics)
        # latched, as the node publishes it: RViz's Map display and Nav2's static layer ask for that
        writer.add_topic(params["grid_topic"], "nav_msgs/msg/OccupancyGrid", latched=True)
        writer.add_topic(params["voxels_topic"], "sensor_msgs/msg/PointCloud2")

    def feed(self, topic: str, msg: Any) -> None:
        from vg_ros.convert import stamp_of
        if topic in self.info_topics:
            self.infos[self.cameras[self.info_topics.index(topic)]] = msg
            return
        if self.stamps.accept(topic, stamp_of(msg)):
            self.sync.add(self.image_topics.index(topic), msg, stamp_of(msg))

    def finish(self) -> None:
        self.sync.flush(2**62)

    def _camera(self, index: int, image_msg: Any):
        from vg_ros.convert import camera_info_to_model
        name = self.cameras[index]
        T_base_cam, _ = self.extrinsics.lookup(image_msg.header.frame_id or name)
        info = self.infos.get(name)
        if info is not None:
            return camera_info_to_model(info, name=name, T_base_cam=T_base_cam,
                                        rectified=bool(self.params.get("images_rectified", False)))
        cam = self.extrinsics.rig.camera(name)
        return dataclasses.replace(cam, T_base_cam=T_base_cam)

    def _on_set(self, *images: Any) -> None:
        from vg_ros.convert import (
            array_to_occupancy_grid, image_to_rgb, stamp_of, xyz_fields_to_pointcloud2,
        )
        from vg_ros.geometry import voxel_centers
        from vg_ros.nodes.inputs import usable_frames
        from vg_ros.occupancy.pipeline import check_frame
        from vg_ros.types import CameraFrame

        def make_frame(i: int, msg: Any) -> CameraFrame:
            frame = CameraFrame(self._camera(i, msg), image_to_rgb(msg), stamp_of(msg))
            check_frame(frame)
            return frame

        # as occupancy_node; a frame neither TF nor the rig names (KeyError) is said apart, for main's --rig hint
        stamp, frames = usable_frames(
            self.cameras, images, make_frame, self.drops, self.image_topics,
            reason=lambda name, exc: f"unknown_frame:{name}" if isinstance(exc, KeyError) else f"bad_camera:{name}")
        if not frames:
            return
        try:
            result = self.timed(lambda: self.pipeline.infer(frames, stamp))
        except (ValueError, KeyError) as exc:
            self.drops.drop(f"pipeline_error:{type(exc).__name__}", f"set {stamp}: {exc}")
            return
        frame_id = str(self.params.get("base_frame", "base_link"))
        bev, origin_T, resolution = self.bev(result, self.cfg.z_min, self.cfg.z_max)
        self.writer.write(self.params["grid_topic"], stamp, array_to_occupancy_grid(
            bev, resolution, origin_T, stamp_ns=stamp, frame_id=frame_id, flavor="rosbags"))
        occupied = (result.semantics != FREE_CLASS) & result.observed  # as occupancy_node: seen voxels only
        centres = voxel_centers(result.grid)[occupied]
        self.writer.write(self.params["voxels_topic"], stamp, xyz_fields_to_pointcloud2(
            centres, {"label": result.semantics[occupied].astype(np.uint32),   # as occupancy_node: PCL's
                      "confidence": result.confidence[occupied].astype(np.float32)},
            stamp_ns=stamp, frame_id=frame_id, flavor="rosbags"))
        self.frames += 1


class RegistrationStage(Stage):
    name = "registration"

    def __init__(self, cfg: Any, params: dict, writer: Any, extrinsics: Any, device: str) -> None:
        super().__init__(params, writer)
        weights = params.get("weights", "default")
        self.weights = None if str(weights).lower() in ("", "none") else weights
        self.device = device
        self.global_registration = None
        try:
            self.odometry_cls = importlib.import_module("vg_ros.registration.odometry").LidarOdometry
            if cfg is not None and cfg.relocalize:  # as the node: a missing checkpoint fails here, clearly
                from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
                self.global_registration = RegistrationPipeline(RegistrationConfig.preset(cfg.global_preset),
                                                                weights=self.weights, device=device)
        except (ImportError, AttributeError, FileNotFoundError, OSError, ValueError, RuntimeError) as exc:
            raise PipelineUnavailable(f"{type(exc).__name__}: {exc}") from None
        self.cfg = cfg
        self.odometry = None  # built at the first scan, with base_link <- its frame from /tf_static or the rig
        self.extrinsics = extrinsics
        self.topics = {params["points_topic"]}
        writer.add_topic(params["odom_topic"], "nav_msgs/msg/Odometry")
        writer.add_topic(params["pose_topic"], "geometry_msgs/msg/PoseStamped")
        self.failed = 0

    def feed(self, topic: str, msg: Any) -> None:
        from vg_ros.convert import matrix_to_odometry, matrix_to_pose_stamped, pointcloud2_to_scan, stamp_of
        stamp = stamp_of(msg)
        if not self.stamps.accept(topic, stamp):
            return
        try:
            scan = pointcloud2_to_scan(msg)
            if self.odometry is None:
                T_base_lidar, _ = self.extrinsics.lookup(msg.header.frame_id)
                self.odometry = self.odometry_cls(self.cfg, T_base_lidar=T_base_lidar, weights=self.weights,
                                                  device=self.device)
                if self.global_registration is not None:
                    self.odometry._global = self.global_registration  # loaded once, as registration_node does
            restarts = self.odometry.stats["map_restarts"]
            result = self.timed(lambda: self.odometry.update(scan))
        except (ValueError, KeyError) as exc:
            self.drops.drop(f"pipeline_error:{type(exc).__name__}", f"scan {stamp}: {exc}")
            return
        if self.odometry.stats["map_restarts"] > restarts:   # as the node: the new map starts from this scan
            self.failed += 1
            self.drops.drop("map_restarted", f"scan {stamp}: {result.reason}")
            return
        if not result.converged:
            self.failed += 1
            self.drops.drop("not_converged", f"scan {stamp}: {result.reason}")
            return
        odom = str(self.params.get("odom_frame", "odom"))
        base = str(self.params.get("base_frame", "base_link"))
        from vg_ros.registration.odometry import odometry_twist
        twist, twist_cov = odometry_twist(result)
        self.writer.write(self.params["odom_topic"], stamp, matrix_to_odometry(
            result.pose, result.covariance, stamp_ns=stamp, frame_id=odom, child_frame_id=base, flavor="rosbags",
            twist=twist, twist_cov=twist_cov))
        self.writer.write(self.params["pose_topic"], stamp, matrix_to_pose_stamped(
            result.pose, stamp_ns=stamp, frame_id=odom, flavor="rosbags"))
        self.frames += 1


class GroundingStage(Stage):
    name = "grounding"

    def __init__(self, cfg: Any, params: dict, writer: Any, rig: Any, extrinsics: Any, device: str) -> None:
        super().__init__(params, writer)
        try:
            from vg_ros.grounding.pipeline import GroundingPipeline
            self.pipeline = GroundingPipeline(cfg, weights=params.get("weights", "default"), device=device)
        except (ImportError, FileNotFoundError, OSError, ValueError, RuntimeError) as exc:
            raise PipelineUnavailable(f"{type(exc).__name__}: {exc}") from None
        from vg_ros.nodes.inputs import ApproxTimeSync, PoseBuffer, StampedBuffer
        from vg_ros.nodes.topics import camera_info_sibling
        self.rig = rig
        self.extrinsics = extrinsics
        p = params
        # as the node: image_topic, then the extra cameras (their CameraInfo on the sibling topic)
        self.image_topics = [str(p["image_topic"])] + [str(t) for t in p.get("extra_image_topics") or []]
        self.info_topics = [str(p.get("camera_info_topic") or "")] + \
            [camera_info_sibling(t) for t in self.image_topics[1:]]
        self.infos: list[Any] = [None] * len(self.image_topics)
        self.topics = {p["command_topic"], *self.image_topics, *(t for t in self.info_topics if t)} \
            | ({p["points_topic"]} if p.get("points_topic") else set())
        self.sync = None
        if len(self.image_topics) > 1:
            self.sync = ApproxTimeSync(len(self.image_topics), self._on_set, slop_s=float(p.get("sync_slop", 0.05)),
                                       partial_timeout_s=float(p.get("missing_camera_timeout", 0.5)), min_topics=1,
                                       drops=self.drops, names=self.image_topics)
        from vg_ros.grounding.messages import CameraChoice
        self.camera_choice = CameraChoice(float(p.get("camera_evidence_half_life", 0.1)))
        self.clouds = StampedBuffer(10)   # as the node: the cloud nearest the image, not just the last
        self.odom_topic = str(p.get("odom_topic") or "")
        self.motion = PoseBuffer() if self.odom_topic else None   # used when the bag holds that odometry
        if self.odom_topic:
            self.topics.add(self.odom_topic)
        writer.add_topic(p["mask_topic"], "sensor_msgs/msg/Image")
        writer.add_topic(p["box_topic"], "geometry_msgs/msg/PolygonStamped")
        writer.add_topic(p["position_topic"], "geometry_msgs/msg/PointStamped")
        self.found = 0

    def feed(self, topic: str, msg: Any) -> None:
        from vg_ros.convert import stamp_of
        p = self.params
        if topic == p["command_topic"]:
            try:
                self.pipeline.set_command(msg.data)
            except ValueError as exc:
                self.drops.drop("bad_command", str(exc))
            return
        if topic in self.info_topics:
            self.infos[self.info_topics.index(topic)] = msg
            return
        if topic == self.odom_topic:
            from vg_ros.grounding.messages import add_odometry
            add_odometry(self.motion, msg, self.extrinsics, self.drops, topic)
            return
        if topic == p.get("points_topic") and topic not in self.image_topics:
            from vg_ros.grounding.messages import add_cloud
            add_cloud(self.clouds, msg, self.drops, topic)
            return
        if not self.stamps.accept(topic, stamp_of(msg)):
            return
        index = self.image_topics.index(topic)
        if self.sync is None:
            self._on_set(msg)
        else:
            self.sync.add(index, msg, stamp_of(msg))

    def finish(self) -> None:
        if self.sync is not None:
            self.sync.flush(2**62)

    def _camera(self, index: int, msg: Any, rgb: np.ndarray):
        from vg_ros.grounding.messages import image_camera
        return image_camera(msg, rgb.shape[1], rgb.shape[0], self.infos[index], self.rig, self.drops,
                            rectified=bool(self.params.get("images_rectified", False)))

    def _on_set(self, *msgs: Any) -> None:
        from vg_ros.convert import grounding_to_msgs, point_to_point_stamped, stamp_of
        from vg_ros.grounding.messages import ground_set, target_position
        if self.pipeline.command is None:
            self.drops.drop("no_command", f"image {stamp_of(next(m for m in msgs if m is not None))}")
            return
        try:
            grounded = self.timed(lambda: ground_set(self.pipeline, msgs, self.image_topics, self._camera, self.drops,
                                                    self.camera_choice))
        except (ValueError, KeyError) as exc:
            self.drops.drop(f"pipeline_error:{type(exc).__name__}", f"image set: {exc}")
            return
        if grounded is None:
            return
        stamp, frame_id = grounded.frame.stamp_ns, grounded.msg.header.frame_id
        for topic, out in zip((self.params["mask_topic"], self.params["box_topic"]),
                              grounding_to_msgs(grounded.result, stamp, frame_id, flavor="rosbags")):
            self.writer.write(topic, stamp, out)
        self.frames += 1
        self.found += int(grounded.result.found)
        located = target_position(self.pipeline, grounded, self.clouds, float(self.params.get("max_cloud_age", 0.15)),
                                  self.extrinsics, self.drops, self.motion)
        if located is not None:
            position, cloud = located
            self.writer.write(self.params["position_topic"], stamp,
                              point_to_point_stamped(position, stamp, cloud.header.frame_id, flavor="rosbags"))

    def summary(self) -> dict:
        return {**super().summary(), "found": self.found}


# ------------------------------------------------------------------------------------------------ replay


def parse_remaps(items: list[str] | None) -> dict[str, str]:
    """['/velodyne_points:=/lidar/points', ...] -> {bag topic: topic the pipelines read}. ValueError for a
    pair that is not FROM:=TO, a topic remapped twice, or two topics onto one."""
    remap: dict[str, str] = {}
    for item in items or []:
        src, sep, dst = item.partition(":=")
        src, dst = src.strip(), dst.strip()
        if not sep or not src.startswith("/") or not dst.startswith("/"):
            raise ValueError(f"--remap {item!r}: expected FROM:=TO with absolute topic names, e.g. "
                             f"/velodyne_points:=/lidar/points")
        if src in remap:
            raise ValueError(f"--remap: {src} is remapped twice")
        remap[src] = dst
    targets = list(remap.values())
    if len(set(targets)) != len(targets):
        raise ValueError(f"--remap: two topics onto one ({sorted(t for t in targets if targets.count(t) > 1)[0]})")
    return remap


def replay(bag: str | Path, out: str | Path, *, config: str | Path | None = None, rig: str | None = None,
           device: str = "cpu", pipelines: tuple[str, ...] = PIPELINES, overwrite: bool = False,
           progress: bool = False, score: bool = True, remap: dict[str, str] | None = None) -> dict:
    """Run the pipelines over `bag`, write their outputs into `out`, score when `/gt/*` exists.
    `remap` {bag topic: name}: the bag's topic is read as that name (a robot's /velodyne_points as the
    pipelines' /lidar/points), as `ros2 bag play --remap`. Returns the `--json` object (see the module
    docstring)."""
    from vg_ros.bag import BagReader, BagWriter
    from vg_ros.nodes.extrinsics import TfOrRig
    from vg_ros.types import Rig

    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown:
        raise ValueError(f"pipelines: unknown {unknown}; choose from {list(PIPELINES)}")
    bag, out = Path(bag), Path(out)
    if out.resolve() == bag.resolve():
        raise ValueError("--out must differ from the input bag")
    reader = BagReader(bag)
    remap = dict(remap or {})
    result: dict = {"bag": str(bag), "out": str(out)}
    try:
        if missing := sorted(set(remap) - set(reader.topics)):   # before --out is created
            raise ValueError(f"--remap: {missing} not in the bag (it has {sorted(reader.topics)})")
        writer = BagWriter(out, overwrite=overwrite)
        stages: dict[str, Stage] = {}
        rig_cache: dict[str, Any] = {}
        try:
            for name in PIPELINES:
                if name not in pipelines:
                    result[SECTIONS[name]] = {"available": False, "reason": "not requested (--pipelines)"}
                    continue
                try:
                    cfg, params = node_settings(name, config)
                    rig_name = str(rig or params.get("rig", "default"))
                    if rig_name not in rig_cache:
                        rig_cache[rig_name] = Rig.load(rig_name)
                    rig_obj = rig_cache[rig_name]
                    extr = TfOrRig(rig_obj, str(params.get("base_frame", "base_link")))
                    if name == "occupancy":
                        stages[name] = OccupancyStage(cfg, params, writer, rig_obj, extr, device)
                    elif name == "registration":
                        stages[name] = RegistrationStage(cfg, params, writer, extr, device)
                    else:
                        stages[name] = GroundingStage(cfg, params, writer, rig_obj, extr, device)
                except PipelineUnavailable as exc:
                    result[SECTIONS[name]] = {"available": False, "reason": str(exc)}
            topics = set().union(*(s.topics for s in stages.values())) if stages else set()
            # the name each read topic goes by: remapped ones by their new name, a topic remapped onto
            # is hidden by the one remapped onto it
            as_read = {remap.get(t, t): t for t in reader.topics if t in remap or t not in remap.values()}
            in_bag = set(as_read)
            wanted = sorted((topics | {"/tf_static"}) & in_bag)
            for name, stage in stages.items():
                if not stage.topics & in_bag:
                    result[SECTIONS[name]] = {"available": False,
                                    "reason": f"the bag has none of its input topics {sorted(stage.topics)}"
                                              + ("" if remap else " (--remap FROM:=TO reads another topic as one)")}
            total = sum(reader.topics[as_read[t]][1] for t in wanted)
            bar = _progress(total, "replay", progress)
            wall0 = time.perf_counter()
            renamed = {as_read[t]: t for t in wanted}
            for bag_topic, _, _, msg in reader.messages(sorted(renamed)) if wanted else ():
                topic = renamed[bag_topic]
                if topic == "/tf_static":
                    for stage in stages.values():
                        extr = getattr(stage, "extrinsics", None)
                        if extr is not None:
                            bad = len(msg.transforms) - extr.add_transforms(msg.transforms)
                            for _ in range(bad):   # a NaN or zero quaternion: the rig stands in, said so
                                stage.drops.drop("bad_tf_static", "a /tf_static transform is not finite or has "
                                                 "a zero quaternion: not used (the rig's mounting, if it names "
                                                 "the frame)")
                for stage in stages.values():
                    if topic in stage.topics:
                        try:
                            stage.feed(topic, msg)
                        except Exception as exc:  # noqa: BLE001 - as a node would: count, go on
                            stage.drops.drop(f"callback_error:{type(exc).__name__}", f"{topic}: {exc}")
                bar.update(1)
            for stage in stages.values():
                stage.finish()
            wall = time.perf_counter() - wall0
            bar.close()
        finally:
            writer.close()
        sensor_seconds = reader.duration_s
    finally:
        reader.close()
    for name, stage in stages.items():
        if SECTIONS[name] not in result:
            summary = stage.summary()
            busy = summary["busy_seconds"]
            summary["realtime_factor"] = sensor_seconds / busy if busy > 0 else None
            result[SECTIONS[name]] = summary
    result["sensor_seconds"] = sensor_seconds
    result["wall_seconds"] = wall
    result["realtime_factor"] = sensor_seconds / wall if wall > 0 else None
    if score:
        merge_scores(result, score_bags(bag, out, config=config))
    return result


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="msg", leave=False, file=sys.stderr)
        except ImportError:
            pass

    class _Nothing:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass
    return _Nothing()


# ------------------------------------------------------------------------------------------------ scoring


def merge_scores(result: dict, scores: dict) -> dict:
    """Put `score_bags` output into a replay/demo result, beside each section's latency and drops."""
    for section, values in scores.items():
        target = result.setdefault(section, {})
        if isinstance(target, dict):
            target.update(values)
    return result


def _pred_semantics(voxel_msg: Any, grid: Any) -> np.ndarray:
    """/occupancy/voxels (occupied voxel centres with `label`) -> semantics (X, Y, Z) on `grid`, free elsewhere."""
    from vg_ros.convert import pointcloud2_to_structured
    from vg_ros.geometry import voxel_indices
    cloud = pointcloud2_to_structured(voxel_msg)
    pred = np.full(grid.shape, FREE_CLASS, dtype=np.uint8)
    if cloud.size == 0:
        return pred
    if "label" not in (cloud.dtype.names or ()):
        raise ValueError("/occupancy/voxels has no `label` field")
    xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)
    idx, inside = voxel_indices(xyz, grid)
    idx = idx[inside]
    pred[idx[:, 0], idx[:, 1], idx[:, 2]] = cloud["label"][inside].astype(np.uint8)
    return pred


def _gt_malformed(topic: str, stamp: int, exc: Exception) -> None:
    """Log one ground-truth message that cannot be scored (its section counts it)."""
    import logging
    where = f"{topic} stamp {stamp}" if stamp else topic
    logging.getLogger("vg_ros.replay.score").warning(f"ground truth on {where} not scored: {exc}")


def _box_of_polygon(msg: Any) -> tuple[bool, np.ndarray, float]:
    pts = list(msg.polygon.points)
    if not pts:
        return False, np.zeros(4), 0.0
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    return True, np.array([min(xs), min(ys), max(xs), max(ys)], dtype=np.float64), float(pts[0].z)


def score_bags(in_bag: str | Path, out_bag: str | Path, *, grounding_image_topic: str | None = None,
               keep_frames: int = 0, topics: dict | None = None, config: str | Path | None = None) -> dict:
    """Score the outputs in `out_bag` against the `/gt/*` of `in_bag` (see the module docstring).

    Returns {"occupancy": {...}, "odometry": {...}, "grounding": {...}} for the sections with ground
    truth and outputs; with `keep_frames` N > 0, each section also carries the data the report draws for
    about N evenly spaced frames (keys starting with '_'). Output topic names come from `topics`
    (default: `output_topics(config)`, i.e. the nodes' parameters)."""
    from vg_ros.bag import BagReader
    from vg_ros.convert import image_to_array, msg_to_expression, msg_to_voxel_grid, odometry_to_matrix
    from vg_ros.convert import stamp_of, stamped_pose_to_matrix

    topics = topics or output_topics(config)
    with BagReader(out_bag) as out:
        out_topics = set(out.topics)
        pred: dict[str, dict[int, Any]] = collections.defaultdict(dict)
        for topic, _, _, msg in out.messages(sorted(out_topics)) if out_topics else ():
            pred[topic][stamp_of(msg)] = msg
    scores: dict = {}
    with BagReader(in_bag) as src:
        gt_topics = set(src.topics)
        for topic, accepted in GT_TYPES.items():   # another type on a /gt topic: that section says so
            msgtype = src.topics.get(topic, ("", 0))[0]
            if topic in gt_topics and msgtype not in accepted:
                gt_topics.discard(topic)
                reason = f"{topic} is {msgtype}, not {' / '.join(accepted)}: not scored"
                _gt_malformed(topic, 0, ValueError(reason))
                section = next((k for k, v in GT_TOPICS.items() if v == topic), None)
                if section is not None:
                    scores[section] = {"frames": 0, "gt_frames": 0, "coverage": 0.0, "gt_error": reason,
                                       **{k: None for k in {"occupancy": ("miou", "iou", "obstacle_iou"),
                                                            "odometry": ("ate_m", "drift_pct"),
                                                            "grounding": ("prec_at_05", "miou")}[section]}}

        def every(topic: str) -> int:
            return max(1, math.ceil(src.topics[topic][1] / keep_frames)) if keep_frames else 0

        # a stamp that two ground-truth messages of one topic carry (a concatenated or looped bag: two drives
        # over the same time) matches an output to either: such stamps are counted, not scored
        ambiguous: dict[str, set[int]] = {}
        for topic in (GT_TOPICS["occupancy"], GT_TOPICS["odometry"], GT_TOPICS["grounding"]):
            if topic in gt_topics:
                seen_stamps = collections.Counter(stamp_of(m) for _, _, _, m in src.messages([topic]))
                ambiguous[topic] = {s for s, n in seen_stamps.items() if n > 1}
                if ambiguous[topic]:
                    _gt_malformed(topic, 0, ValueError(
                        f"{len(ambiguous[topic])} stamps carried by more than one message (a concatenated or "
                        f"looped bag?): not scored"))

        # occupancy
        if GT_TOPICS["occupancy"] in gt_topics:
            from vg_ros.occupancy.metrics import OccupancyScore
            acc = OccupancyScore()
            gt_frames = 0
            frames = []
            keep = every(GT_TOPICS["occupancy"])
            voxels = pred.get(topics["occupancy"]["voxels"], {})
            malformed = unmasked = 0
            for _, _, _, msg in src.messages([GT_TOPICS["occupancy"]]):
                stamp = stamp_of(msg)
                if stamp in ambiguous[GT_TOPICS["occupancy"]]:
                    continue
                try:   # malformed ground truth is counted and left out, not the end of every section's scores
                    sem, grid, mask_camera, _ = msg_to_voxel_grid(msg)
                    if sem.size and sem.max() >= NUM_OCC_CLASSES:
                        raise ValueError(f"semantics: labels outside 0..{NUM_OCC_CLASSES - 1}")
                except ValueError as exc:
                    malformed += 1
                    _gt_malformed(GT_TOPICS["occupancy"], stamp, exc)
                    continue
                gt_frames += 1
                if stamp not in voxels:
                    continue
                unmasked += mask_camera is None   # scored over every voxel, not the camera-visible ones
                p = _pred_semantics(voxels[stamp], grid)
                if keep and acc.frames % keep == 0:
                    frames.append((stamp, p, sem, mask_camera, grid))
                acc.add(p, sem, mask_camera)
            if acc.frames:
                r = acc.result()
                scores["occupancy"] = {"miou": r["miou"], "iou": r["iou"], "obstacle_iou": r["obstacle_iou"],
                                       "frames": acc.frames, "gt_frames": gt_frames,
                                       "coverage": acc.frames / max(gt_frames, 1), "per_class": r["per_class"]}
            else:
                scores["occupancy"] = {"miou": None, "iou": None, "obstacle_iou": None, "frames": 0,
                                       "gt_frames": gt_frames, "coverage": 0.0}
            scores["occupancy"].update({"gt_malformed": malformed, "gt_without_camera_mask": unmasked,
                                        "gt_ambiguous_stamps": len(ambiguous[GT_TOPICS["occupancy"]])})
            if keep_frames:
                scores["occupancy"]["_frames"] = frames

        # odometry
        if GT_TOPICS["odometry"] in gt_topics:
            from vg_ros.registration.metrics import ate, rpe_drift_percent
            gt_poses: dict[int, np.ndarray] = {}
            malformed = 0
            for _, _, _, m in src.messages([GT_TOPICS["odometry"]]):
                if stamp_of(m) in ambiguous[GT_TOPICS["odometry"]]:
                    continue
                try:
                    gt_poses[stamp_of(m)] = stamped_pose_to_matrix(m)   # PoseStamped, Odometry or TransformStamped
                except ValueError as exc:   # a NaN position, a zero quaternion: counted, left out
                    malformed += 1
                    _gt_malformed(GT_TOPICS["odometry"], stamp_of(m), exc)
            odo = pred.get(topics["odometry"]["odometry"], {})
            stamps = sorted(s for s in odo if s in gt_poses)
            section: dict = {"frames": len(stamps), "gt_frames": len(gt_poses),
                             "coverage": len(stamps) / max(len(gt_poses), 1), "gt_malformed": malformed,
                             "gt_ambiguous_stamps": len(ambiguous[GT_TOPICS["odometry"]])}
            if len(stamps) >= 3:  # ATE aligns rigidly: fewer poses say nothing
                est = np.stack([odometry_to_matrix(odo[s])[0] for s in stamps])
                gt = np.stack([gt_poses[s] for s in stamps])
                section.update({"ate_m": ate(est, gt), "drift_pct": rpe_drift_percent(est, gt),
                                "path_m": float(np.sum(np.linalg.norm(np.diff(gt[:, :3, 3], axis=0), axis=1)))})
                if keep_frames:
                    section["_traj"] = (stamps, est, gt)
            else:
                section.update({"ate_m": None, "drift_pct": None})
            scores["odometry"] = section

        # grounding
        if GT_TOPICS["grounding"] in gt_topics:
            from vg_ros.grounding.metrics import box_iou, mask_ious
            image_topics = [grounding_image_topic] if grounding_image_topic else \
                list(topics["grounding"].get("images") or [topics["grounding"]["image"]])
            cameras = [t.strip("/").split("/")[1] if t.startswith("/cameras/") else None for t in image_topics]
            boxes, masks = pred.get(topics["grounding"]["box"], {}), pred.get(topics["grounding"]["mask"], {})
            ious, m_ious, hops, found, frames = [], [], [], 0, []
            keep = every(GT_TOPICS["grounding"])
            # several named cameras: where else each frame's target is seen, {stamp: {frame_id: Expression}}
            views: dict[int, dict[str, Any]] = collections.defaultdict(dict)
            if GT_GROUNDING_VIEWS in gt_topics and None not in cameras and len(cameras) > 1:
                for _, _, _, msg in src.messages([GT_GROUNDING_VIEWS]):
                    try:
                        view = msg_to_expression(msg)
                    except ValueError as exc:
                        _gt_malformed(GT_GROUNDING_VIEWS, stamp_of(msg), exc)
                        continue
                    if view.camera in cameras and view.mask.any():
                        views[view.stamp_ns][msg.header.frame_id] = view
            from vg_ros.convert import time_to_ns
            undescribed = ({time_to_ns(m.stamp) for _, _, _, m in src.messages([GT_UNDESCRIBED])}
                           if GT_UNDESCRIBED in gt_topics else set())
            described: list[bool] = []
            gt_count = other_camera = invisible = found_invisible = wrong_camera = other_view = 0
            malformed = size_mismatch = 0
            for _, _, _, msg in src.messages([GT_TOPICS["grounding"]]):
                if stamp_of(msg) in ambiguous[GT_TOPICS["grounding"]]:
                    continue
                try:
                    expr = msg_to_expression(msg)
                except ValueError as exc:   # a NaN box, a mask in a foreign encoding: counted, left out
                    malformed += 1
                    _gt_malformed(GT_TOPICS["grounding"], stamp_of(msg), exc)
                    continue
                if None not in cameras and expr.camera not in cameras:
                    other_camera += 1
                    continue
                stamp = expr.stamp_ns
                seen_elsewhere = views.get(stamp, {})
                if not expr.mask.any() and not seen_elsewhere:
                    # the target left the view of every grounded camera while its command is active: not scored
                    invisible += 1
                    found_invisible += int(stamp in boxes and _box_of_polygon(boxes[stamp])[0])
                    continue
                gt_count += 1
                if stamp not in boxes:
                    continue
                ok, box, score = _box_of_polygon(boxes[stamp])
                frame_out, frame_gt = boxes[stamp].header.frame_id, msg.header.frame_id
                # an output mask of another size than the label it is scored against (the camera's images
                # changed size, or a label of the wrong size): its box and mask are in other pixels, so the
                # frame is not scored, but counted (and not covered)
                other = bool(ok and frame_out and frame_gt and frame_out != frame_gt)
                label = seen_elsewhere.get(frame_out) if other else expr   # None: a miss whatever its size
                out_mask = image_to_array(masks[stamp]) if stamp in masks else None
                if label is not None and out_mask is not None and out_mask.shape[:2] != label.mask.shape:
                    size_mismatch += 1
                    _gt_malformed(GT_TOPICS["grounding"], stamp, ValueError(
                        f"mask {label.mask.shape[1]}x{label.mask.shape[0]} but the output mask is "
                        f"{out_mask.shape[1]}x{out_mask.shape[0]}: not scored"))
                    continue
                found += int(ok)
                # several cameras: a target published in a camera that does not show it is a miss; one that
                # does (the target passed into it, or cameras overlap) is scored against that camera's view
                if ok and frame_out and frame_gt and frame_out != frame_gt:
                    if frame_out in seen_elsewhere:
                        expr = seen_elsewhere[frame_out]
                        other_view += 1
                    else:
                        wrong_camera += 1
                        ok = False
                elif ok and not expr.mask.any():   # found in the command's camera, which does not show it now
                    wrong_camera += 1
                    ok = False
                mask = out_mask > 0 if out_mask is not None else np.zeros_like(expr.mask)
                if not ok:
                    mask = np.zeros_like(expr.mask)
                if keep and len(ious) % keep == 0:
                    frames.append((stamp, expr, ok, box, score, mask))
                described.append(stamp not in undescribed)
                ious.append(float(box_iou(box, expr.box)) if ok else 0.0)
                # a miss scores 0: the label may be empty (the target is in another grounded camera only), and
                # an empty mask against an empty label is a perfect IoU to `mask_ious`
                m_ious.append(float(mask_ious([mask], [expr.mask])[0]) if ok and mask.shape == expr.mask.shape
                              else 0.0)
                hops.append(expr.hops)
            section = {"frames": len(ious), "gt_frames": gt_count, "coverage": len(ious) / max(gt_count, 1),
                       "found_rate": found / max(len(ious), 1), "gt_on_other_cameras": other_camera,
                       "gt_target_not_visible": invisible, "found_when_not_visible": found_invisible,
                       "found_in_wrong_camera": wrong_camera, "found_in_other_view": other_view,
                       "gt_malformed": malformed, "mask_size_mismatch": size_mismatch,
                       "gt_ambiguous_stamps": len(ambiguous[GT_TOPICS["grounding"]]),
                       "camera": cameras[0], "cameras": cameras,
                       "image_topic": image_topics[0], "image_topics": image_topics}
            if ious:
                ious_a, m_a, hops_a = np.asarray(ious), np.asarray(m_ious), np.asarray(hops)
                section.update({
                    "prec_at_05": float((ious_a >= 0.5).mean()), "miou": float(m_a.mean()),
                    "by_hops": {int(h): {"prec_at_05": float((ious_a[hops_a == h] >= 0.5).mean()),
                                         "miou": float(m_a[hops_a == h].mean()), "count": int((hops_a == h).sum())}
                                for h in np.unique(hops_a)}})
            else:
                section.update({"prec_at_05": None, "miou": None})
            if undescribed:   # the same scores over the frames whose command still singles out its target
                d = np.asarray(described, bool)
                section["words_still_describe"] = {
                    "frames": int(d.sum()), "of": len(described),
                    "prec_at_05": float((np.asarray(ious)[d] >= 0.5).mean()) if d.any() else None,
                    "miou": float(np.asarray(m_ious)[d].mean()) if d.any() else None}
            if keep_frames:
                section["_frames"] = frames
            scores["grounding"] = section
    return scores


# ----------------------------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def summary_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(pipeline, scores, latency p50/p90/p99, frames) rows for the printed table."""
    rows = []
    for name, label in (("occupancy", "occupancy"), ("odometry", "odometry"), ("grounding", "grounding")):
        sec = result.get(name) or {}
        if sec.get("available") is False:
            reason = str(sec.get("reason", "?"))
            rows.append((label, "unavailable: " + (reason if len(reason) <= 90 else reason[:87] + "..."), "", ""))
            continue
        if name == "occupancy":
            score = (f"mIoU {_fmt(sec.get('miou'))} %  IoU {_fmt(sec.get('iou'))} %  "
                     f"obstacle IoU {_fmt(sec.get('obstacle_iou'))} %")
        elif name == "odometry":
            score = f"ATE {_fmt(sec.get('ate_m'), '.3f')} m  drift {_fmt(sec.get('drift_pct'))} %"
        else:
            p = sec.get("prec_at_05")
            m = sec.get("miou")
            score = (f"Prec@0.5 {_fmt(None if p is None else 100 * p, '.1f')} %  "
                     f"mIoU {_fmt(None if m is None else 100 * m, '.1f')} %")
            still = sec.get("words_still_describe")
            if still and still.get("prec_at_05") is not None:
                score += (f"  ({still['frames']}/{still['of']} frames the words still single out: "
                          f"{100 * still['prec_at_05']:.1f} %)")
            if len(sec.get("cameras") or []) > 1:
                score += f"  ({len(sec['cameras'])} cameras; in the wrong one {sec.get('found_in_wrong_camera', 0)})"
        if sec.get("gt_error"):
            score += f"  ({sec['gt_error']})"
        lat = sec.get("latency_ms") or {}
        latency = f"{_fmt(lat.get('p50'), '.0f')}/{_fmt(lat.get('p90'), '.0f')}/{_fmt(lat.get('p99'), '.0f')} ms"
        frames = f"{sec.get('frames', 0)}/{sec.get('gt_frames', '?')}"
        rows.append((label, score, latency, frames))
    return rows


def format_summary(result: dict, title: str = "vg-ros replay") -> str:
    rows = [("pipeline", "score", "latency p50/p90/p99", "frames scored/GT")] + summary_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title]
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    rtf = result.get("realtime_factor")
    lines.append(f"sensor {result.get('sensor_seconds', 0):.1f} s in {result.get('wall_seconds', 0):.1f} s wall: "
                 f"real-time factor {_fmt(rtf, '.2f')}")
    return "\n".join(lines)


def public(result: dict) -> dict:
    """`result` without the per-frame data (keys starting with '_'), JSON-ready."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not str(k).startswith("_")}
    if isinstance(result, (list, tuple)):
        return [public(v) for v in result]
    if isinstance(result, (np.floating, np.integer)):
        return public(result.item())
    if isinstance(result, float) and not math.isfinite(result):   # strict JSON has no NaN or inf
        return None
    return result


def main(argv: list[str]) -> int:
    """`vg-ros replay BAG --out OUT.mcap [--report DIR] [--json]`."""
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros replay", description=(
        "Run the occupancy, odometry and grounding pipelines over a rosbag2 offline (no DDS), write their "
        "outputs as the nodes' messages into --out, and score them against the bag's /gt topics."))
    parser.add_argument("bag", help="input rosbag2 (e.g. from `vg-ros sim`)")
    parser.add_argument("--out", required=True, help="output rosbag2 (mcap directory)")
    parser.add_argument("--report", default=None, help="write an HTML report with PNGs into this folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--config", default=None, help="ROS params file (default config/perception.yaml)")
    parser.add_argument("--rig", default=None, help="rig name or YAML (default: the nodes' `rig` parameter)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--remap", nargs="+", metavar="FROM:=TO", default=[],
                        help="read the bag's topic FROM as TO, e.g. /velodyne_points:=/lidar/points")
    args = parser.parse_args(argv)
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    from vg_ros.nodes.process import limit_blas_threads
    limit_blas_threads()   # as in the nodes: numpy's BLAS pool would take the cores from torch's
    if args.config is not None:
        from vg_ros.config import NODE_NAMES, unknown_sections
        try:
            stray = unknown_sections(args.config) if Path(args.config).exists() else []
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if stray:
            print(f"vg-ros replay: warning: {args.config}: section(s) {stray} match no node ({', '.join(NODE_NAMES)} "
                  "or /**): a misspelt node name leaves that pipeline on its defaults", file=sys.stderr)
    try:
        remap = parse_remaps(args.remap)
        result = replay(args.bag, args.out, config=args.config, rig=args.rig, device=args.device,
                        pipelines=tuple(args.pipelines), overwrite=args.force, progress=not args.json, remap=remap)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    sections = [result.get(SECTIONS[name], {}) for name in args.pipelines]
    if sections and all(section.get("available") is False for section in sections):
        reasons = "; ".join(f"{name}: {section.get('reason')}" for name, section in zip(args.pipelines, sections))
        raise UserError(f"nothing replayed ({args.out} holds no output): {reasons}")
    ran = [(name, section) for name, section in zip(args.pipelines, sections) if section.get("available")]
    dropping = [(name, section) for name, section in ran if section.get("drops")]
    if dropping and not any(section.get("frames_out") for _, section in ran):
        reasons = "; ".join(f"{name}: every input dropped ("
                            + ", ".join(f"{k}={v}" for k, v in sorted(section["drops"].items())) + ")"
                            for name, section in dropping)
        hint = ("; a frame the rig does not name: --rig for the robot's sensors, or a bag with its /tf_static"
                if any("KeyError" in k or k.startswith("unknown_frame:") for _, section in dropping
                       for k in section["drops"]) else "")
        raise UserError(f"nothing replayed ({args.out} holds no output): {reasons}{hint}")
    if args.report:
        from vg_ros.report import write_report
        topics = output_topics(args.config)
        original = {dst: src for src, dst in remap.items()}   # the report draws the bag's own camera topic
        topics["grounding"]["image"] = original.get(topics["grounding"]["image"], topics["grounding"]["image"])
        try:
            index = write_report(args.report, args.bag, args.out, result, title="vg-ros replay", topics=topics)
        except OSError as exc:
            raise UserError(f"--report {args.report}: cannot write {exc.filename or args.report}: "
                            f"{exc.strerror or exc}") from None
        result["report"] = str(index)
    if args.json:
        print(json.dumps(public(result), sort_keys=True))
    else:
        print(format_summary(result))
        if args.report:
            print(f"report: {result['report']}")
    return 0
