"""`grounding_node`: VG-LAW over ROS 2 — a camera image and a spoken-style command in, the target's mask, box
and (with a LiDAR cloud) 3D position out.

Subscribes (topic names are parameters):
  image_topic        sensor_msgs/Image            (sensor QoS; every encoding `convert.image_to_rgb` reads: rgb/bgr(a)
                     8 and 16 bit, mono8/16, yuv422 (UYVY, YUYV), Bayer 8/16); with image_transport
                     compressed, sensor_msgs/CompressedImage (jpeg, png) on image_topic/compressed
  camera_info_topic  sensor_msgs/CameraInfo       (sensor QoS; intrinsics for the 3D position)
  command_topic      std_msgs/String              (reliable + transient-local: a late joiner gets the last; and
                     a second, volatile subscription for volatile publishers such as a plain `ros2 topic pub`)
  points_topic       sensor_msgs/PointCloud2      (optional; "" disables the 3D position)
  odom_topic         nav_msgs/Odometry            (optional, default /registration/odometry; "" = off): the
                     vehicle's motion between a cloud's and an image's stamps moves the cloud to the image's
                     instant before the position is looked up
  extra_image_topics more cameras (optional): each image set of image_topic and these, synchronised by stamp
                     (`sync_slop`; after `missing_camera_timeout` a set goes on without a late camera), is
                     grounded in every camera with the command's cached weights, and the camera with the most
                     evidence for the target over the command's sets is published (`camera_evidence_half_life`,
                     `grounding.messages.CameraChoice`). Each extra camera's CameraInfo is read from
                     the sibling `camera_info` topic (/cameras/X/image_raw -> /cameras/X/camera_info), as
                     image_transport's camera subscriber pairs them.
Publishes, each with the header (stamp and frame) of the image it was found in:
  mask_topic         sensor_msgs/Image mono8      (255 = target; all zero when not found)
  box_topic          geometry_msgs/PolygonStamped (corners (x0,y0) (x1,y0) (x1,y1) (x0,y1) in pixels, the score
                     in every point's z; an EMPTY polygon = not found). A standard type because pip rclpy
                     cannot publish the package's own msg/ types.
  position_topic     geometry_msgs/PointStamped   (target centre in the LiDAR frame; only when found and one of
                     the last 10 clouds is within `max_cloud_age` of the image (the nearest is used) and the
                     camera<-LiDAR extrinsics are known)
  overlay_topic      sensor_msgs/Image rgb8       (debug view for RViz: the image, the published mask and box,
                     the command and found / not found; drawn only while someone subscribes)

Bad input never stops the node: an empty / over-long / unusable command, an image in a foreign encoding, an
image before any command — each is logged and counted in `~/diagnostics` (drops), and the node goes on.
Non-ASCII commands are accepted (the tokenizer handles them).
"""
from __future__ import annotations

import collections
import threading

import numpy as np

from vg_ros.convert import grounding_to_msgs, point_to_point_stamped, stamp_of, time_to_ns
from vg_ros.grounding.pipeline import GroundingConfig
from vg_ros.nodes.base import PerceptionNode
from vg_ros.nodes.inputs import PoseBuffer, StampedBuffer
from vg_ros.nodes.process import node_main
from vg_ros.nodes.qos import volatile_command_qos
from vg_ros.nodes.topics import camera_info_sibling, camera_topic


class GroundingNode(PerceptionNode):
    default_node_name = "grounding_node"
    config_cls = GroundingConfig
    node_params = {
        "image_topic": ("cameras/CAM_FRONT/image_raw", "input sensor_msgs/Image"),
        "images_rectified": (False, "the images are rectified (image_rect, as image_proc or Isaac ROS publish them): "
                             "intrinsics from CameraInfo's P, no distortion"),
        "image_transport": ("raw", "raw: sensor_msgs/Image on image_topic; compressed: sensor_msgs/CompressedImage "
                            "(jpeg, png) on image_topic/compressed, as image_transport names it"),
        "camera_info_topic": ("cameras/CAM_FRONT/camera_info", "input sensor_msgs/CameraInfo ('' = none)"),
        "command_topic": ("command", "input std_msgs/String: the referring expression"),
        "points_topic": ("lidar/points", "input sensor_msgs/PointCloud2 for the 3D position ('' = none)"),
        "mask_topic": ("grounding/mask", "output sensor_msgs/Image mono8"),
        "box_topic": ("grounding/box", "output geometry_msgs/PolygonStamped (empty = not found)"),
        "position_topic": ("grounding/position", "output geometry_msgs/PointStamped in the LiDAR frame"),
        "overlay_topic": ("grounding/overlay", "output sensor_msgs/Image rgb8 for RViz / rqt_image_view: the image "
                          "with the published mask, box, command and score, drawn only while subscribed ('' = off)"),
        "max_cloud_age": (0.15, "largest |image stamp - cloud stamp| (s) for a cloud used for the position"),
        "odom_topic": ("registration/odometry", "input nav_msgs/Odometry (odom -> base_link): a cloud swept at "
                       "another instant than the image is moved by the vehicle's motion between the two before "
                       "the position is looked up ('' = off)"),
        "extra_image_topics": ([], "more cameras to look in (image topics; CameraInfo on each one's sibling "
                               "camera_info): the target is grounded in image_topic and each of these, and the "
                               "camera with the most evidence is published ([] = image_topic only)"),
        "sync_slop": (0.05, "with extra_image_topics: largest stamp spread (s) of one image set"),
        "missing_camera_timeout": (0.5, "with extra_image_topics: seconds to wait for a late camera before "
                                   "grounding the set without it"),
        "camera_evidence_half_life": (0.1, "with extra_image_topics: the published camera is the one with the "
                                      "most evidence (score x presence) summed over the command's sets, an "
                                      "earlier set's halved per this many seconds of stamp (0.1: half per set at "
                                      "10 Hz); 0 = each set on its own, found results first"),
    }

    live_params = frozenset({"score_threshold", "presence_threshold", "mask_threshold", "single_region", "box_source",
                             "min_points", "depth_window", "max_cloud_age", "camera_evidence_half_life"})

    def on_parameters_changed(self, names: set[str]) -> None:
        from vg_ros.grounding.messages import CameraChoice
        with self._lock:   # the next image is grounded with them
            self.pipeline.config = self.cfg
            if "camera_evidence_half_life" in names:   # validated by check_parameters; the sums start again
                self.camera_choice = CameraChoice(float(self.params["camera_evidence_half_life"]))

    def check_parameters(self) -> None:
        from vg_ros.grounding.messages import CameraChoice
        p = self.params
        if not 0 <= float(p["max_cloud_age"]) <= 1e9:
            raise ValueError(f"grounding_node.max_cloud_age = {p['max_cloud_age']}: must be in [0, 1e9]")
        for key in ("image_topic", "command_topic", "mask_topic", "box_topic", "position_topic"):
            if not str(p[key]).strip():
                raise ValueError(f"grounding_node.{key} is empty")
        for key in ("sync_slop", "missing_camera_timeout"):
            if not 0 < float(p[key]) <= 1e6:
                raise ValueError(f"grounding_node.{key} = {p[key]}: must be in (0, 1e6]")
        try:
            CameraChoice(float(p["camera_evidence_half_life"]))
        except ValueError as exc:
            raise ValueError(f"grounding_node.camera_evidence_half_life: {exc}") from None
        topics = [str(p["image_topic"])] + [str(t) for t in p["extra_image_topics"]]
        # resolved names (namespace, remapping), as the subscriptions have them; ValueError for an unknown transport
        self.image_inputs = [self.resolve_topic_name(camera_topic(t, str(p["image_transport"])))
                             for t in topics if t.strip()]
        if len(set(self.image_inputs)) != len(topics):
            raise ValueError(f"grounding_node.extra_image_topics = {list(p['extra_image_topics'])}: must be distinct, "
                             f"non-empty topics other than image_topic {p['image_topic']!r}")
        self.info_topics = [self.resolve_topic_name(t) if t else "" for t in
                            [str(p["camera_info_topic"])] + [camera_info_sibling(t) for t in topics[1:]]]

    def load(self) -> None:
        from vg_ros.grounding.messages import CameraChoice
        from vg_ros.grounding.pipeline import GroundingPipeline

        self.pipeline = GroundingPipeline(self.cfg, weights=self.params["weights"], device=self.device)
        self.camera_choice = CameraChoice(float(self.params["camera_evidence_half_life"]))
        self._lock = threading.Lock()

    def start(self) -> None:
        from geometry_msgs.msg import PointStamped, PolygonStamped
        from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
        from std_msgs.msg import String

        self.camera_infos: list = [None] * len(self.image_inputs)
        self.clouds = StampedBuffer(10)   # ~1 s of LiDAR (sweeps are MBs): a lagging image still meets its own
        self.motion = PoseBuffer() if str(self.params["odom_topic"]).strip() else None
        self.last_result = None
        self.mask_pub = self.create_publisher(Image, self.params["mask_topic"], self.output_qos())
        self.box_pub = self.create_publisher(PolygonStamped, self.params["box_topic"], self.output_qos())
        self.position_pub = self.create_publisher(PointStamped, self.params["position_topic"], self.output_qos())
        self.overlay_pub = (self.create_publisher(Image, self.params["overlay_topic"], self.output_qos())
                            if str(self.params["overlay_topic"]).strip() else None)
        # Commands get their own callback group: in the default group a command waits behind every queued
        # image (seen in the demo: a new command applied 8 frames late); here it waits for one frame at most
        # (the pipeline lock), and the next image is grounded with it.
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        # before the subscriptions: a latched command can reach `on_command` (another executor thread) the
        # moment the first one exists
        self._seen_commands: collections.deque = collections.deque(maxlen=32)
        self.command_group = MutuallyExclusiveCallbackGroup()
        self.command_sub = self.subscribe(String, self.params["command_topic"], self.on_command, self.command_qos(),
                                          callback_group=self.command_group, seen_samples=self._seen_commands,
                                          count_missed=False, watch=False,
                                          incompatible_note="its commands arrive through the volatile subscription")
        # `ros2 topic pub` offers volatile durability, which a transient-local subscription never matches: a
        # second, volatile subscription takes its commands (the same group runs them one at a time); it matches
        # every publisher, so it alone counts lost commands (`missed`)
        self.command_sub_volatile = self.subscribe(String, self.params["command_topic"], self.on_command,
                                                   volatile_command_qos(), callback_group=self.command_group,
                                                   seen_samples=self._seen_commands, watch=False)
        image_type = CompressedImage if self.params["image_transport"] == "compressed" else Image
        if len(self.image_inputs) == 1:
            self.subscribe(image_type, self.image_inputs[0], self.on_images, self.sensor_qos())
        else:
            self.synchronized([(image_type, topic) for topic in self.image_inputs], self.on_images,
                              slop_s=float(self.params["sync_slop"]),
                              partial_timeout_s=float(self.params["missing_camera_timeout"]), min_topics=1)
        for index, topic in enumerate(self.info_topics):
            if topic:
                self.subscribe(CameraInfo, topic, lambda msg, i=index: self.camera_infos.__setitem__(i, msg),
                               self.sensor_qos(), guard_stamps=False)
        if self.params["points_topic"]:
            self.subscribe(PointCloud2, self.params["points_topic"], self.on_points, self.sensor_qos())
        if self.motion is not None:
            from nav_msgs.msg import Odometry
            self.subscribe(Odometry, str(self.params["odom_topic"]), self.on_odometry, self.sensor_qos())
        self.get_logger().info(f"VG-LAW {self.pipeline.spec.img_w}x{self.pipeline.spec.img_h} ({self.cfg.model}) "
                               f"ready on {len(self.image_inputs)} camera(s); waiting for a command on "
                               f"{self.params['command_topic']}")

    def unload(self) -> None:
        with self._lock:   # not under a command or an image callback in another callback group
            self.pipeline = None

    def on_time_jump(self) -> None:
        from vg_ros.grounding.messages import CameraChoice
        self.clouds.clear()   # clouds and poses of the old time base (the command stays)
        if self.motion is not None:
            self.motion.clear()
        with self._lock:
            # the evidence too: its stamp is the old time base's newest, and no set before it decays the sums
            # (a looped bag published the camera that led the last loop for up to a loop's length)
            self.camera_choice = CameraChoice(float(self.params["camera_evidence_half_life"]))

    # -- inputs -------------------------------------------------------------------------------------------
    def on_command(self, msg) -> None:
        # a transient-local publisher's live command reaches both subscriptions: `seen_samples` passes it once
        text = msg.data
        with self._lock:   # a cleanup in the default group may free the pipeline once this lock is released
            if self.pipeline is None:   # cleaned up meanwhile: the latched command comes again on activate
                return
            try:
                self.pipeline.set_command(text)
            except ValueError as exc:
                kept = self.pipeline.command
                self.drops.drop("bad_command", f"on {self.params['command_topic']}: {exc}; keeping {kept!r}")
                return
            command = self.pipeline.command
        self.drops.ok("commands")
        self.get_logger().info(f"command set: {command[:120]!r}")

    def on_points(self, msg) -> None:
        from vg_ros.grounding.messages import add_cloud
        add_cloud(self.clouds, msg, self.drops, str(self.params["points_topic"]))

    def on_odometry(self, msg) -> None:
        from vg_ros.grounding.messages import add_odometry
        add_odometry(self.motion, msg, self.extrinsics, self.drops, str(self.params["odom_topic"]))

    def on_images(self, *msgs) -> None:
        """One image, or one synchronised set (None for a camera that did not deliver): ground the command in
        each, publish the camera with the most evidence for the target (`self.camera_choice`)."""
        from vg_ros.grounding.messages import ground_set, image_camera, target_position

        if self.pipeline is None:   # cleaned up while this set waited
            return
        if self.pipeline.command is None:
            stamp_ns = stamp_of(next(m for m in msgs if m is not None))
            self.drops.drop("no_command", f"image {stamp_ns} on {self.image_inputs[0]}: no command received "
                            f"yet on {self.params['command_topic']}")
            return
        with self._lock:
            grounded = ground_set(self.pipeline, msgs, self.image_inputs,
                                  lambda i, msg, rgb: image_camera(
                                      msg, rgb.shape[1], rgb.shape[0], self.camera_infos[i], self.extrinsics.rig,
                                      self.drops, rectified=bool(self.params["images_rectified"])),
                                  self.drops, self.camera_choice)
            if grounded is None:
                return
        result, header = grounded.result, grounded.msg.header
        self.last_result = result
        self.publish_result(header, result)   # the 2D outputs stand whatever the position lookup meets
        try:
            with self._lock:
                located = None if self.pipeline is None else target_position(
                    self.pipeline, grounded, self.clouds, float(self.params["max_cloud_age"]), self.extrinsics,
                    self.drops, self.motion)
        except Exception as exc:  # noqa: BLE001 - counted; the mask and box are already out
            located = None
            self.drops.drop(f"position_error:{type(exc).__name__}", f"image {grounded.frame.stamp_ns}: {exc}")
        if located is not None:
            position, cloud = located
            self.position_pub.publish(point_to_point_stamped(position, grounded.frame.stamp_ns,
                                                             cloud.header.frame_id))
        if self.overlay_pub is not None and self.overlay_pub.get_subscription_count():
            self.publish_overlay(header, grounded.rgb, result)
        self.drops.ok("found" if result.found else "not_found")

    # -- outputs ------------------------------------------------------------------------------------------
    def publish_result(self, header, result) -> None:
        mask, box = grounding_to_msgs(result, time_to_ns(header.stamp), header.frame_id)
        self.mask_pub.publish(mask)
        self.box_pub.publish(box)

    def publish_overlay(self, header, rgb: np.ndarray, result) -> None:
        """The debug image: dimmed outside the published mask, the mask outlined, the box drawn, the command
        (with several cameras, after the shown camera's frame) and the verdict written over the top rows (same
        size and header as the input image)."""
        from vg_ros.convert import array_to_image
        from vg_ros.sim.preview import overlay_mask, with_caption

        command = result.command if len(result.command) <= 100 else result.command[:97] + "..."
        if len(self.image_inputs) > 1:   # the overlay shows whichever camera won: name it
            command = f"[{header.frame_id}] {command}"
        if result.found:
            picture = overlay_mask(rgb, result.mask, result.box)
            verdict = f"found, score {result.score:.2f}"
        else:
            picture = overlay_mask(rgb, np.zeros(rgb.shape[:2], bool), ())
            verdict = f"not found (score {result.score:.2f})"
        out = array_to_image(with_caption(picture, f"{command} -- {verdict}", inside=True), "rgb8")
        out.header = header
        self.overlay_pub.publish(out)


main = node_main(GroundingNode)

if __name__ == "__main__":
    main()
