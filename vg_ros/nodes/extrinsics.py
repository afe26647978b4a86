"""Sensor extrinsics for the nodes: from TF (tf2_ros, or /tf_static) when it has them, else from the rig."""
from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from vg_ros import ros_compat
from vg_ros.geometry import invert_T, make_T, quat_to_R
from vg_ros.nodes.qos import latched_qos
from vg_ros.types import Rig

if ros_compat.HAVE_RCLPY:
    import rclpy


def transform_to_matrix(transform: Any) -> np.ndarray:
    """geometry_msgs/Transform (rclpy or rosbags) -> (4, 4). A zero quaternion raises ValueError."""
    t, q = transform.translation, transform.rotation
    T = make_T(quat_to_R(np.array([q.x, q.y, q.z, q.w], dtype=np.float64)), np.array([t.x, t.y, t.z]))
    if not np.all(np.isfinite(T)):
        raise ValueError("transform.translation is not finite")
    return T


class TfOrRig:
    """Sensor extrinsics `T_base_sensor` (4, 4): from TF when it has them, else from the rig YAML.

    Sources, in order: a tf2_ros buffer (when tf2_ros imports), the static transforms this object has
    seen on /tf_static (subscribed when tf2_msgs imports, or fed by `add_transforms`, e.g. from a bag),
    then the rig (`Rig.load(rig)`; camera `frame_id` or name, LiDAR `frame_id`). `lookup` returns the
    matrix and the source's name so a node can log where its calibration came from.
    """

    def __init__(self, rig: Rig | str = "default", base_frame: str = "base_link", node: Any = None) -> None:
        self.rig = rig if isinstance(rig, Rig) else Rig.load(rig)
        self.source = (rig if isinstance(rig, str) else rig.name, base_frame)   # the parameters it was built from
        self.base_frame = base_frame
        self.static: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, T_parent_child)
        self.tf_buffer = None
        self._tf_listener = self._tf_sub = None
        self._node = node
        self._lock = threading.Lock()
        if node is not None and ros_compat.HAVE_TF2_ROS:
            tf2_ros = ros_compat.tf2_ros
            self.tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self.tf_buffer, node)
        elif node is not None and ros_compat.HAVE_TF2_MSGS:
            # depth 100 as tf2's static listener: several static publishers' latched messages at once
            self._tf_sub = node.create_subscription(ros_compat.TFMessage, "/tf_static",
                                                    lambda m: self.add_transforms(m.transforms), latched_qos(100))

    @property
    def listens(self) -> bool:
        """TF is a source (tf2_ros, or our /tf_static subscription): a frame missing there now may arrive."""
        return self.tf_buffer is not None or self._tf_sub is not None

    def close(self) -> None:
        """Stop listening to TF (the node's subscriptions for it are destroyed)."""
        if self._tf_listener is not None:
            self._tf_listener.unregister()
        if self._tf_sub is not None and self._node is not None:
            self._node.destroy_subscription(self._tf_sub)
        self._tf_listener = self._tf_sub = None

    def add_transforms(self, transforms: Sequence[Any]) -> int:
        """Remember static TransformStamped messages (duck-typed); returns how many were usable."""
        used = 0
        for ts in transforms:
            try:
                T = transform_to_matrix(ts.transform)
            except ValueError:
                continue
            with self._lock:
                self.static[ts.child_frame_id.lstrip("/")] = (ts.header.frame_id.lstrip("/"), T)
            used += 1
        return used

    def _from_static(self, frame: str) -> np.ndarray | None:
        T = np.eye(4)
        seen = set()
        with self._lock:
            while frame != self.base_frame:
                if frame in seen or frame not in self.static:
                    return None
                seen.add(frame)
                parent, T_parent_child = self.static[frame]
                T = T_parent_child @ T
                frame = parent
        return T

    def _from_tf2(self, frame: str) -> np.ndarray | None:
        if self.tf_buffer is None:
            return None
        try:
            ts = self.tf_buffer.lookup_transform(self.base_frame, frame, rclpy.time.Time())
        except Exception:  # noqa: BLE001 - tf2 raises several lookup/connectivity exception types
            return None
        return transform_to_matrix(ts.transform)

    def _from_rig(self, frame: str) -> np.ndarray | None:
        if frame == self.base_frame:
            return np.eye(4)
        for cam in self.rig.cameras:
            if frame in (cam.frame_id, cam.name):
                return cam.T_base_cam.copy()
        if frame == self.rig.lidar.frame_id:
            return self.rig.lidar.T_base_lidar.copy()
        return None

    def lookup(self, frame: str) -> tuple[np.ndarray, str]:
        """(T_base_frame (4, 4), source in {"tf2", "tf_static", "rig"}). Unknown frame: KeyError."""
        frame = frame.lstrip("/")
        for source, get in (("tf2", self._from_tf2), ("tf_static", self._from_static), ("rig", self._from_rig)):
            T = get(frame)
            if T is not None:
                return T, source
        raise KeyError(f"no transform {self.base_frame} <- {frame!r}: not in TF and not in rig {self.rig.name!r} "
                       f"(rig frames: {[c.frame_id for c in self.rig.cameras] + [self.rig.lidar.frame_id]})")

    def lookup_inverse(self, frame: str) -> np.ndarray:
        """T_frame_base (4, 4)."""
        return invert_T(self.lookup(frame)[0])
