"""occupancy_node over real DDS: synchronised surround images in; OccupancyGrid (transient-local), labelled voxel
cloud and markers out with the input's stamp; a missing camera degrades its sector to unknown; bad input
(wrong size, foreign encoding, zero focal length, NaN extrinsic) is counted and the node keeps running."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ros_helpers import ros_session

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy wheels) not installed")

DOMAIN = 44


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """An untrained tiny TPVFormer: the node's plumbing does not depend on trained values."""
    from vg_ros.occupancy.model import TPVFormer, model_config
    from vg_ros.occupancy.pipeline import save_checkpoint
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_checkpoint(TPVFormer(model_config("tiny")), path)
    return path


def _node(ros, weights, tmp_path, **overrides):
    from rclpy.parameter import Parameter
    from vg_ros.nodes.occupancy_node import OccupancyNode
    cfg = tmp_path / "perception.yaml"
    cfg.write_text("occupancy_node:\n  ros__parameters: {diagnostics_period: 0.0, device: cpu, num_threads: 2,"
                   " missing_camera_timeout: 0.3}\n")
    node = OccupancyNode(config_path=cfg, context=ros.context,
                         parameter_overrides=[Parameter("weights", value=str(weights))]
                         + [Parameter(k, value=v) for k, v in overrides.items()])
    node.configure()
    node.activate()
    return ros.add(node)


def test_node_publishes_grid_voxels_markers_and_degrades(weights_file, tmp_path):
    # Stamps near the wall clock when the test runs (not when the module is collected, minutes earlier in
    # the full suite): the partial-set timeout is judged against the node clock, and a stamp more than a
    # minute off it is taken for another clock, which never flushes early.
    STAMP = (time.time_ns() // 10**9) * 10**9  # noqa: N806 - one constant of this test
    from nav_msgs.msg import OccupancyGrid
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from visualization_msgs.msg import MarkerArray
    from vg_ros.convert import (array_to_image, camera_model_to_info, occupancy_grid_to_array,
                                pointcloud2_to_structured)
    from vg_ros.nodes.qos import latched_qos
    from vg_ros.types import Rig

    rig = Rig.load("default")
    rng = np.random.default_rng(0)
    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path)
        io = ros.node("io")
        grids, clouds, markers = [], [], []
        io.create_subscription(OccupancyGrid, "/occupancy/grid", grids.append, latched_qos())
        io.create_subscription(PointCloud2, "/occupancy/voxels", clouds.append, 10)
        io.create_subscription(MarkerArray, "/occupancy/markers", markers.append, 10)
        img_pubs = {c.name: io.create_publisher(Image, f"/cameras/{c.name}/image_raw", 10) for c in rig.cameras}
        info_pubs = {c.name: io.create_publisher(CameraInfo, f"/cameras/{c.name}/camera_info", 10) for c in rig.cameras}
        for pub in list(img_pubs.values()) + list(info_pubs.values()):
            assert ros.wait_for_match(pub, timeout=10)
        for cam in rig.cameras:
            info_pubs[cam.name].publish(camera_model_to_info(cam, STAMP))
        assert ros.spin_until(lambda: len(node.camera_infos) == 6, timeout=15)

        sent: list[int] = []

        def next_stamp() -> int:
            # Each set stamped near the wall clock when it is sent, not when the test started: loading the model
            # and the first sets take a minute on a loaded machine, and the partial set of step 2 is flushed
            # against the node clock only while its stamp is within a minute of it (ApproxTimeSync.flush).
            now = (time.time_ns() // 100_000_000) * 100_000_000
            sent.append(max(now, sent[-1] + 100_000_000) if sent else now)
            return sent[-1]

        def send(stamp, skip=(), broken=None):
            for cam in rig.cameras:
                if cam.name in skip:
                    continue
                pixels = rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
                if broken and cam.name in broken:
                    pixels = broken[cam.name](pixels)
                encoding = "rgb8" if pixels.ndim == 3 else "32FC1"
                img_pubs[cam.name].publish(array_to_image(pixels, encoding, stamp_ns=stamp, frame_id=cam.frame_id))

        # 1. a full set
        send(next_stamp())
        assert ros.spin_until(lambda: grids and clouds and markers, timeout=120), (node.drops.snapshot(), node.sync.pending())
        grid_msg, cloud = grids[-1], clouds[-1]
        stamp_ns = grid_msg.header.stamp.sec * 10**9 + grid_msg.header.stamp.nanosec
        assert stamp_ns == sent[0] and grid_msg.header.frame_id == "base_link" == cloud.header.frame_id
        full, origin_T, resolution = occupancy_grid_to_array(grid_msg)
        assert full.shape == (200, 200) and resolution == pytest.approx(0.4)
        np.testing.assert_allclose(origin_T[:2, 3], [-40.0, -40.0])
        assert set(np.unique(full)) <= {-1, 0, 100} and (full >= 0).mean() > 0.5
        arr = pointcloud2_to_structured(cloud)
        # PCL's PointXYZL layout: label uint32 at 12 (pcl::fromROSMsg matches name and type), confidence at 16
        assert arr.dtype["label"] == np.uint32 and arr.dtype["confidence"] == np.float32
        assert [(f.name, f.offset) for f in cloud.fields] == [("x", 0), ("y", 4), ("z", 8), ("label", 12),
                                                              ("confidence", 16)] and cloud.point_step == 20
        assert len(arr) > 0 and np.all(arr["label"] < 17) and np.all((arr["confidence"] > 0) & (arr["confidence"] <= 1))
        assert markers[-1].markers[0].action == 3 and len(markers[-1].markers) >= 2  # DELETEALL, then classes

        # 2. CAM_BACK never arrives: the set goes on after the timeout with its sector unknown
        send(next_stamp(), skip={"CAM_BACK"})
        assert ros.spin_until(lambda: len(grids) >= 2, timeout=120)
        degraded, _, _ = occupancy_grid_to_array(grids[-1])
        behind = (slice(90, 110), slice(0, 60))  # rows = y cells around the centre line, columns = x < -16 m
        assert (degraded[behind] == -1).mean() > (full[behind] == -1).mean() + 0.5
        assert node.drops.drops["camera_missing"] >= 1

        # 3. bad input: wrong size and a depth encoding are dropped per camera; the rest still gives a grid
        send(next_stamp(), broken={"CAM_FRONT": lambda p: p[:100],
                                          "CAM_FRONT_LEFT": lambda p: p[:, :, 0].astype(np.float32)})
        assert ros.spin_until(lambda: len(grids) >= 3, timeout=120)
        assert node.drops.drops["bad_camera:CAM_FRONT"] == 1 and node.drops.drops["bad_camera:CAM_FRONT_LEFT"] == 1

        # 4. a camera_info with zero focal length and a NaN extrinsic from TF: dropped cameras, node alive
        bad_info = camera_model_to_info(rig.camera("CAM_BACK_LEFT"), STAMP)
        bad_info.k[0] = 0.0
        info_pubs["CAM_BACK_LEFT"].publish(bad_info)
        assert ros.spin_until(lambda: node.camera_infos["CAM_BACK_LEFT"].k[0] == 0.0, timeout=30)
        nan_T = np.eye(4)
        nan_T[0, 3] = np.nan
        node.extrinsics.static[rig.camera("CAM_BACK_RIGHT").frame_id] = ("base_link", nan_T)
        send(next_stamp())
        assert ros.spin_until(lambda: len(grids) >= 4, timeout=120)
        assert node.drops.drops["bad_camera:CAM_BACK_LEFT"] == 1 and node.drops.drops["bad_camera:CAM_BACK_RIGHT"] == 1
        stamps = [g.header.stamp.sec * 10**9 + g.header.stamp.nanosec for g in grids]
        assert stamps == sent


def test_band_and_confidence_floor_change_while_running(weights_file, tmp_path):
    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path)
        [ok] = ros.set_parameters("occupancy_node", min_confidence=0.4)
        assert ok.successful and node.pipeline.cfg.min_confidence == 0.4
        [crossed] = ros.set_parameters("occupancy_node", z_min=3.0)   # above z_max 2.0: the config's own check
        assert not crossed.successful and "z_max" in crossed.reason and node.cfg.z_min == 0.2
        [refused] = ros.set_parameters("occupancy_node", cameras=["CAM_FRONT"])
        assert not refused.successful and "restart" in refused.reason


def test_compressed_cameras_are_subscribed_where_image_transport_puts_them(weights_file, tmp_path):
    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path, image_transport="compressed")
        assert node.image_topics == [f"/cameras/{n}/image_raw/compressed" for n in node.camera_names]
        io = ros.node("io")
        assert ros.spin_until(lambda: all(("sensor_msgs/msg/CompressedImage" in types) for name, types
                                          in io.get_topic_names_and_types() if name in node.image_topics)
                              and set(node.image_topics) <= {n for n, _ in io.get_topic_names_and_types()}, timeout=10)
