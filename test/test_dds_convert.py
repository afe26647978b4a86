"""Converted messages survive real DDS: one rclpy node publishes, another receives, bytes and numbers intact.

In-process (one executor, a fresh rclpy.Context per test, ROS_DOMAIN_ID 10-12, localhost discovery).
"""
from __future__ import annotations

import numpy as np
import pytest

from ros_helpers import ros_session
from vg_ros import convert as C

pytestmark = pytest.mark.dds


def _roundtrip(msg, msg_class, topic: str, domain_id: int):
    """Publish `msg` from one node and return what a second node receives (or fail after ~4 s)."""
    with ros_session(domain_id) as ros:
        talker, listener = ros.node("vg_test_talker"), ros.node("vg_test_listener")
        got = []
        listener.create_subscription(msg_class, topic, got.append, 10)
        pub = talker.create_publisher(msg_class, topic, 10)
        assert ros.wait_for_match(pub, timeout=3.0), "publisher never matched the subscription"
        pub.publish(msg)
        assert ros.spin_until(lambda: got, timeout=3.0), f"nothing received on {topic}"
        return got[0]


def test_image_over_dds_is_intact():
    from sensor_msgs.msg import Image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    msg = C.array_to_image(rgb, "bgr8", stamp_ns=1_700_000_000_123_456_789, frame_id="cam_front_optical")
    out = _roundtrip(msg, Image, "/vg_test/image", 10)
    assert C.stamp_of(out) == 1_700_000_000_123_456_789
    assert out.header.frame_id == "cam_front_optical"
    np.testing.assert_array_equal(C.image_to_array(out), rgb)
    np.testing.assert_array_equal(C.image_to_rgb(out), rgb[:, :, ::-1])


def test_pointcloud2_over_dds_is_intact():
    from sensor_msgs.msg import PointCloud2
    rng = np.random.default_rng(1)
    n = 20_000
    xyz = rng.normal(0, 20, (n, 3)).astype(np.float32)
    label = rng.integers(0, 18, n).astype(np.uint8)
    conf = rng.random(n).astype(np.float32)
    msg = C.xyz_fields_to_pointcloud2(xyz, {"label": label, "confidence": conf}, stamp_ns=42, frame_id="base_link")
    out = _roundtrip(msg, PointCloud2, "/vg_test/cloud", 11)
    cloud = C.pointcloud2_to_structured(out)
    assert cloud.shape == (n,)
    np.testing.assert_array_equal(np.stack([cloud["x"], cloud["y"], cloud["z"]], 1), xyz)
    np.testing.assert_array_equal(cloud["label"], label)
    np.testing.assert_array_equal(cloud["confidence"], conf)
    # C-struct layout: confidence at 16 after 3 bytes of padding, not at 13
    assert out.point_step == 20 and [f.offset for f in out.fields] == [0, 4, 8, 12, 16]
    assert out.header.frame_id == "base_link"


def test_occupancy_grid_over_dds_is_intact():
    from nav_msgs.msg import OccupancyGrid
    from vg_ros.geometry import make_T, rpy_to_R
    rng = np.random.default_rng(2)
    grid = rng.integers(-1, 101, (200, 300)).astype(np.int8)
    origin = make_T(rpy_to_R(0, 0, 0.5), [-10.0, -15.0, 0.0])
    msg = C.array_to_occupancy_grid(grid, 0.1, origin, stamp_ns=7, frame_id="map")
    out = _roundtrip(msg, OccupancyGrid, "/vg_test/map", 12)
    grid2, origin2, res = C.occupancy_grid_to_array(out)
    np.testing.assert_array_equal(grid2, grid)
    np.testing.assert_allclose(origin2, origin, atol=1e-12)
    assert res == pytest.approx(0.1, abs=1e-7)
