"""`registration_node`: LiDAR odometry over ROS 2 — scan-to-map GICP with VBReg re-localisation
(`vg_ros.registration.odometry.LidarOdometry`).

Subscribes:
  points_topic   sensor_msgs/PointCloud2   (sensor-data QoS; any frame the rig or TF knows)
Publishes, stamped with the input cloud's stamp:
  odom_topic     nav_msgs/Odometry         (odom -> base_link; pose covariance: the GICP Hessian x covariance_scale^2
                                            + the correction against the motion prior; twist with its covariance)
  pose_topic     geometry_msgs/PoseStamped (frame odom)
  cloud_topic    sensor_msgs/PointCloud2   (the registered scan in odom)
  map_topic      sensor_msgs/PointCloud2   (the local map's voxel means in odom, every `map_period`, only while
                                            subscribed)
  TF odom -> base_link when tf2_ros imports (via ros_compat; skipped otherwise)

A scan whose registration fails (too few points, low fitness, a correction far from the motion prior
that re-localisation cannot confirm) is logged, counted in `~/diagnostics` and not published: no
confident pose ever comes from a failed registration.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from vg_ros import ros_compat
from vg_ros.convert import stamp_of
from vg_ros.nodes.base import PerceptionNode
from vg_ros.nodes.process import node_main
from vg_ros.registration.odometry import LidarOdometry, OdometryConfig


class RegistrationNode(PerceptionNode):
    default_node_name = "registration_node"
    config_cls = OdometryConfig
    node_params = {
        "points_topic": ("lidar/points", "input sensor_msgs/PointCloud2"),
        "odom_topic": ("registration/odometry", "output nav_msgs/Odometry (odom -> base_link)"),
        "pose_topic": ("registration/pose", "output geometry_msgs/PoseStamped in odom"),
        "cloud_topic": ("registration/cloud", "output sensor_msgs/PointCloud2, the registered scan in odom ('' = off)"),
        "map_topic": ("registration/local_map", "output sensor_msgs/PointCloud2 in odom: the local map the scans are "
                      "registered to (voxel means), only while subscribed ('' = off)"),
        "map_period": (1.0, "least stamp time (s) between two local maps"),
        "odom_frame": ("odom", "frame of the published poses and cloud"),
        "publish_tf": (True, "broadcast odom -> base_link on /tf (needs tf2_ros)"),
        "tf_wait": (1.0, "seconds of scans to wait, from the first, for TF to give base_frame <- the LiDAR's "
                    "frame before the rig's extrinsics are used (then kept until the node is activated again)"),
    }

    # read per scan by LidarOdometry.update (the map's resolution, horizon and re-localisation target are
    # built with the map: read at start)
    live_params = frozenset({"min_range", "max_range", "voxel_size", "max_correspondence_distance", "max_iterations",
                             "deskew", "deskew_tolerance", "min_fitness", "max_prior_deviation",
                             "max_prior_deviation_deg", "relocalize", "num_threads", "map_period", "covariance_scale",
                             "covariance_prior_deviation", "restart_after_failures"})

    def on_parameters_changed(self, names: set[str]) -> None:
        with self._lock:
            if self.odometry is not None:
                self.odometry.cfg = self.cfg

    def check_parameters(self) -> None:
        for key in ("map_period", "tf_wait"):
            if not 0 <= float(self.params[key]) <= 1e9:
                raise ValueError(f"registration_node.{key} = {self.params[key]}: must be in [0, 1e9]")
        for key in ("points_topic", "odom_topic", "pose_topic", "odom_frame"):
            if not str(self.params[key]).strip():
                raise ValueError(f"registration_node.{key} is empty")

    def load(self) -> None:
        weights = self.params["weights"]
        self._weights = None if str(weights).lower() in ("", "none") else weights
        if self.cfg.relocalize:  # load the checkpoint now: a bad one fails configuration with one clear line
            from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
            self._global = RegistrationPipeline(RegistrationConfig.preset(self.cfg.global_preset),
                                                weights=self._weights, device=self.device)
        else:
            self._global = None
        self.odometry: LidarOdometry | None = None
        self.lidar_frame: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        from geometry_msgs.msg import PoseStamped
        from nav_msgs.msg import Odometry
        from sensor_msgs.msg import PointCloud2

        self.odom_pub = self.create_publisher(Odometry, self.params["odom_topic"], self.output_qos())
        self.pose_pub = self.create_publisher(PoseStamped, self.params["pose_topic"], self.output_qos())
        self.cloud_pub = (self.create_publisher(PointCloud2, self.params["cloud_topic"], self.output_qos())
                          if self.params["cloud_topic"] else None)
        self.map_pub = (self.create_publisher(PointCloud2, self.params["map_topic"], self.output_qos())
                        if str(self.params["map_topic"]).strip() else None)
        self._map_stamp_ns: int | None = None
        self.tf_broadcaster = None
        if self.params["publish_tf"] and ros_compat.HAVE_TF2_ROS:
            self.tf_broadcaster = ros_compat.tf2_ros.TransformBroadcaster(self)
        self._tf_wait_since: float | None = None
        self.extrinsics   # listening to TF from now, not from the first scan (a latched /tf_static takes a moment)
        self.subscribe(PointCloud2, self.params["points_topic"], self.on_points, self.sensor_qos())
        self.get_logger().info(f"odometry ready: {self.resolve_topic_name(self.params['points_topic'])} -> "
                               f"{self.odom_pub.topic_name}, "
                               f"TF {'on' if self.tf_broadcaster else 'off (tf2_ros missing or publish_tf false)'}")

    def stop(self) -> None:
        """Scans missed while inactive break the motion prior: activated again, odometry starts afresh."""
        with self._lock:
            if self.odometry is not None:
                self.get_logger().info(f"odometry stats: {self.odometry.stats}")
            self.odometry = None
            self.lidar_frame = None

    def unload(self) -> None:
        self._global = None

    def on_time_jump(self) -> None:
        with self._lock:   # odometry starts again at identity with the next scan
            if self.odometry is not None:
                self.odometry.reset()
            self._map_stamp_ns = None

    def _odometry_for(self, frame_id: str) -> LidarOdometry | None:
        """The odometry, built on the first scan once the LiDAR frame (hence T_base_lidar) is known. While TF is
        listened to but has not given that frame yet, None for `tf_wait` seconds from the first such scan:
        the rig's extrinsics, once taken, would stay for the whole drive, wrong for any robot but the rig's."""
        if self.odometry is None:
            T_base_lidar, source = self.extrinsics.lookup(frame_id)
            if source == "rig" and self.extrinsics.listens:
                now = time.monotonic()
                if self._tf_wait_since is None:
                    self._tf_wait_since = now
                if now - self._tf_wait_since < float(self.params["tf_wait"]):
                    return None
                self.get_logger().warning(
                    f"TF gave no {self.params['base_frame']} <- {frame_id} within tf_wait "
                    f"{float(self.params['tf_wait']):g} s: using rig {self.extrinsics.rig.name!r}'s extrinsics")
            self.odometry = LidarOdometry(self.cfg, T_base_lidar=T_base_lidar, weights=self._weights, device=self.device)
            self.odometry._global = self._global
            self.lidar_frame = frame_id
            self._tf_wait_since = None
            self.get_logger().info(f"T_{self.params['base_frame']}_{frame_id} from {source}")
        elif frame_id != self.lidar_frame:
            raise ValueError(f"frame_id {frame_id!r} changed (was {self.lidar_frame!r})")
        return self.odometry

    def on_points(self, msg) -> None:
        from vg_ros.convert import pointcloud2_to_scan

        stamp_ns = stamp_of(msg)
        try:
            scan = pointcloud2_to_scan(msg)
            odometry = self._odometry_for(msg.header.frame_id or "lidar")
        except (ValueError, KeyError) as exc:
            self.drops.drop("bad_cloud", f"cloud {stamp_ns} on {self.params['points_topic']}: {exc}")
            return
        if odometry is None:
            self.drops.drop("waiting_for_tf", f"cloud {stamp_ns}: TF has not given {self.params['base_frame']} <- "
                                              f"{msg.header.frame_id} yet (tf_wait {self.params['tf_wait']} s)")
            return
        scan.stamp_ns = stamp_ns
        with self._lock:
            skipped, restarts = odometry.stats["deskew_skipped"], odometry.stats["map_restarts"]
            result = odometry.update(scan)
            if odometry.stats["deskew_skipped"] > skipped:
                self.drops.ok("not_deskewed:non_finite_point_time")
        if odometry.stats["map_restarts"] > restarts:   # not published either: the new map starts from it
            self.drops.drop("map_restarted", f"cloud {stamp_ns}: {result.reason}; pose not published")
            return
        if not result.converged:
            self.drops.drop("registration_failed", f"cloud {stamp_ns}: {result.reason}; pose not published")
            return
        self.publish(result, odometry.registered_cloud)
        self.publish_map(result.stamp_ns, odometry)
        self.drops.ok("relocalized" if result.reason else "registered")

    def publish_map(self, stamp_ns: int, odometry: LidarOdometry) -> None:
        """The local map, at most every `map_period` of stamp time and only while someone subscribes."""
        if self.map_pub is None or not self.map_pub.get_subscription_count():
            return
        last = self._map_stamp_ns
        if last is not None and stamp_ns - last < float(self.params["map_period"]) * 1e9:
            return
        from vg_ros import convert
        with self._lock:
            points = odometry.local_map().astype(np.float32)
        self._map_stamp_ns = stamp_ns
        self.map_pub.publish(convert.xyz_fields_to_pointcloud2(points, stamp_ns=stamp_ns,
                                                               frame_id=self.params["odom_frame"]))

    def publish(self, result, registered_cloud: np.ndarray) -> None:
        from vg_ros import convert

        frame, child = self.params["odom_frame"], self.params["base_frame"]
        from vg_ros.registration.odometry import odometry_twist
        twist, twist_cov = odometry_twist(result)
        self.odom_pub.publish(convert.matrix_to_odometry(result.pose, result.covariance, result.stamp_ns, frame, child,
                                                         twist=twist, twist_cov=twist_cov))
        self.pose_pub.publish(convert.matrix_to_pose_stamped(result.pose, result.stamp_ns, frame))
        if self.cloud_pub is not None:
            self.cloud_pub.publish(convert.xyz_fields_to_pointcloud2(registered_cloud.astype(np.float32),
                                                                     stamp_ns=result.stamp_ns, frame_id=frame))
        if self.tf_broadcaster is not None:
            self.tf_broadcaster.sendTransform(convert.matrix_to_transform_stamped(result.pose, result.stamp_ns, frame, child))


main = node_main(RegistrationNode)

if __name__ == "__main__":
    main()
