"""registration_node over real DDS: simulated LiDAR scans in, Odometry / PoseStamped / registered cloud
out with the input stamps and a real covariance; a scan that cannot be registered is counted, not
published."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="registration_node needs rclpy (ros-jazzy wheels)")

from ros_helpers import ros_session  # noqa: E402

from vg_ros.geometry import invert_T  # noqa: E402

DOMAIN = 33


def make_node(ros, **params):
    from rclpy.parameter import Parameter
    from vg_ros.nodes.registration_node import RegistrationNode
    overrides = [Parameter("weights", value="none"), Parameter("diagnostics_period", value=0.0)]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    node = RegistrationNode(context=ros.context, parameter_overrides=overrides)
    node.configure()
    node.activate()
    return ros.add(node)


@pytest.fixture(scope="module")
def frames():
    from vg_ros.sim import simulate
    return list(simulate(4242, 0.6, cameras=False, occupancy=False, expressions=0))


def test_node_publishes_odometry_pose_cloud_with_input_stamps(frames):
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert

    with ros_session(DOMAIN) as ros:
        node = make_node(ros, map_period=0.2)
        client = ros.node("client")
        odoms, poses, clouds, maps = [], [], [], []
        client.create_subscription(Odometry, "/registration/odometry", odoms.append, 10)
        client.create_subscription(PoseStamped, "/registration/pose", poses.append, 10)
        client.create_subscription(PointCloud2, "/registration/cloud", clouds.append, 10)
        client.create_subscription(PointCloud2, "/registration/local_map", maps.append, 10)
        pub = client.create_publisher(PointCloud2, "/lidar/points", 10)
        assert ros.wait_for_match(pub, timeout=5.0)
        assert ros.spin_until(node.map_pub.get_subscription_count, timeout=5.0)
        for k, frame in enumerate(frames):
            scan = frame.lidar
            scan.frame_id = frame.rig.lidar.frame_id
            pub.publish(convert.scan_to_pointcloud2(scan))
            assert ros.spin_until(lambda: len(odoms) > k and len(poses) > k and len(clouds) > k, timeout=10.0), \
                f"no output for scan {k}: {node.drops.summary()}"
        assert [convert.stamp_of(m) for m in odoms] == [f.stamp_ns for f in frames]
        assert all(m.header.frame_id == "odom" and m.child_frame_id == "base_link" for m in odoms)
        assert clouds[-1].header.frame_id == "odom" and clouds[-1].width > 1000
        # pose vs ground truth (odom = base_link at the first scan)
        T_last, cov = convert.odometry_to_matrix(odoms[-1])
        gt = invert_T(frames[0].T_odom_base) @ frames[-1].T_odom_base
        assert np.linalg.norm(T_last[:3, 3] - gt[:3, 3]) < 0.1
        assert np.allclose(convert.pose_stamped_to_matrix(poses[-1]), T_last, atol=1e-6)
        # covariance: a real, symmetric, positive-definite 6x6, not a constant
        assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)
        assert np.sqrt(cov[0, 0]) < 0.05
        covs = [convert.odometry_to_matrix(m)[1] for m in odoms[1:]]
        assert not all(np.allclose(c, covs[0]) for c in covs[1:])
        assert node.drops.total == 0
        # the local map: every map_period (0.2 s) of stamp time, in odom, the voxel means of the scans so far
        assert [convert.stamp_of(m) for m in maps] == [f.stamp_ns for f in frames][::2]
        from scipy.spatial import cKDTree
        so_far = np.concatenate([convert.pointcloud2_to_scan(m).xyz for m in clouds])
        for m in maps:
            xyz = convert.pointcloud2_to_scan(m).xyz
            assert m.header.frame_id == "odom" and len(xyz) > 500
            assert np.quantile(cKDTree(so_far).query(xyz)[0], 0.99) < node.cfg.map_voxel_size
        assert len(convert.pointcloud2_to_scan(maps[-1]).xyz) > len(convert.pointcloud2_to_scan(maps[0]).xyz)


def test_failed_registration_is_counted_not_published(frames):
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert
    from vg_ros.types import LidarScan

    with ros_session(DOMAIN) as ros:
        node = make_node(ros, relocalize=False)
        client = ros.node("client")
        odoms = []
        client.create_subscription(Odometry, "/registration/odometry", odoms.append, 10)
        pub = client.create_publisher(PointCloud2, "/lidar/points", 10)
        assert ros.wait_for_match(pub, timeout=5.0)
        lidar_frame = frames[0].rig.lidar.frame_id
        first = frames[0].lidar
        first.frame_id = lidar_frame
        pub.publish(convert.scan_to_pointcloud2(first))
        assert ros.spin_until(lambda: len(odoms) == 1, timeout=10.0)
        tiny = LidarScan(np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32) * 5,
                         frames[1].stamp_ns, lidar_frame)
        pub.publish(convert.scan_to_pointcloud2(tiny))
        assert ros.spin_until(lambda: node.drops.drops["registration_failed"] == 1, timeout=10.0)
        ros.spin_for(0.3)
        assert len(odoms) == 1  # nothing published for the failed scan


def test_a_looped_bag_restarts_the_odometry_instead_of_dropping_it_for_ever(frames):
    """The clouds start again (`vg-ros play --loop`, a restarted bag): the first stamp far behind is
    dropped, the second resets the node and odometry starts again at identity from it."""
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert

    with ros_session(DOMAIN) as ros:
        node = make_node(ros, time_jump_reset=0.2)
        client = ros.node("client")
        odoms = []
        client.create_subscription(Odometry, "/registration/odometry", odoms.append, 20)
        pub = client.create_publisher(PointCloud2, "/lidar/points", 20)
        assert ros.wait_for_match(pub, timeout=5.0)
        for k, frame in enumerate(frames + frames):
            scan = frame.lidar
            scan.frame_id = frame.rig.lidar.frame_id
            pub.publish(convert.scan_to_pointcloud2(scan))
            expected = k + 1 if k < len(frames) else k
            assert ros.spin_until(lambda: len(odoms) >= expected and node.drops.drops["time_jump_back"] == (
                k >= len(frames)), timeout=10.0), f"scan {k}: {node.drops.summary()}"
        stamps = [f.stamp_ns for f in frames]
        assert [convert.stamp_of(m) for m in odoms] == stamps + stamps[1:]
        assert node.stamps.jumps == 1 and node.diagnostics()["time_jump_resets"] == 1
        assert dict(node.drops.drops) == {"time_jump_back": 1}
        # every scan reached the subscription, the dropped one too: received counts before any check
        assert node.diagnostics()["received"] == {"/lidar/points": 2 * len(frames)}
        second = [convert.odometry_to_matrix(m)[0] for m in odoms[len(frames):]]
        assert np.allclose(second[0], np.eye(4))          # odom = base_link at the first scan after the reset
        gt = invert_T(frames[1].T_odom_base) @ frames[-1].T_odom_base
        assert np.linalg.norm(second[-1][:3, 3] - gt[:3, 3]) < 0.1


def test_odometry_parameters_change_while_running(frames):
    with ros_session(DOMAIN) as ros:
        node = make_node(ros)
        node._odometry_for(frames[0].rig.lidar.frame_id)
        [ok] = ros.set_parameters("registration_node", max_range=40.0)
        assert ok.successful and node.odometry.cfg.max_range == 40.0
        [refused] = ros.set_parameters("registration_node", map_voxel_size=0.5)   # the map is built with it
        assert not refused.successful and "restart" in refused.reason and node.odometry.cfg.map_voxel_size == 1.0
        [bad] = ros.set_parameters("registration_node", min_range=-1.0)
        assert not bad.successful and node.odometry.cfg.min_range == 1.0


def test_a_sensor_that_stops_is_named_in_the_diagnostics(frames):
    """A matched publisher that sends nothing for `input_silence_warn` s makes the status a WARN naming
    the topic (a hung driver, a transport that stopped delivering); a message clears it; no publisher,
    no warning."""
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert
    from vg_ros.nodes.base import DIAG_WARN, diagnostic_status

    with ros_session(DOMAIN) as ros:
        node = make_node(ros, input_silence_warn=0.5)
        ros.spin_for(0.6)
        assert node.silent_inputs() == {}                    # nobody publishes: nothing to wait for
        client = ros.node("client")
        pub = client.create_publisher(PointCloud2, "/lidar/points", 10)
        assert ros.wait_for_match(pub, timeout=5.0)
        silent = node.silent_inputs()
        assert list(silent) == ["/lidar/points"] and silent["/lidar/points"]["publishers"] == 1
        level, message, _ = diagnostic_status(node.diagnostics(), None, 5.0)
        assert level == DIAG_WARN and "silent: /lidar/points (nothing for" in message and "1 publisher)" in message
        scan = frames[0].lidar
        scan.frame_id = frames[0].rig.lidar.frame_id
        pub.publish(convert.scan_to_pointcloud2(scan))
        assert ros.spin_until(lambda: node.received["/lidar/points"] == 1, timeout=10.0)
        assert node.silent_inputs() == {}
        assert ros.spin_until(lambda: node.silent_inputs(), timeout=5.0)   # and again once it stops
        node.set_parameters([Parameter("input_silence_warn", value=0.0)])
        assert node.silent_inputs() == {}                    # 0 = off, changeable while running


def test_a_node_in_a_namespace_reads_and_publishes_its_data_topics_there(frames):
    """The data topics are relative names: a node started in /robot1 (launch `namespace:=robot1`, `vg-ros
    up --namespace robot1`) reads /robot1/lidar/points and publishes /robot1/registration/odometry; a scan
    on the root /lidar/points does not reach it; its counts name the resolved topic."""
    from nav_msgs.msg import Odometry
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert
    from vg_ros.nodes.registration_node import RegistrationNode

    with ros_session(DOMAIN) as ros:
        node = RegistrationNode(context=ros.context, namespace="robot1", parameter_overrides=[
            Parameter("weights", value="none"), Parameter("diagnostics_period", value=0.0)])
        node.configure()
        node.activate()
        ros.add(node)
        assert node.get_fully_qualified_name() == "/robot1/registration_node"
        client = ros.node("client")
        odoms, root_odoms = [], []
        client.create_subscription(Odometry, "/robot1/registration/odometry", odoms.append, 10)
        client.create_subscription(Odometry, "/registration/odometry", root_odoms.append, 10)
        pub = client.create_publisher(PointCloud2, "/robot1/lidar/points", 10)
        root_pub = client.create_publisher(PointCloud2, "/lidar/points", 10)
        assert ros.wait_for_match(pub, timeout=5.0)
        assert root_pub.get_subscription_count() == 0
        for k, frame in enumerate(frames[:2]):
            scan = frame.lidar
            scan.frame_id = frame.rig.lidar.frame_id
            root_pub.publish(convert.scan_to_pointcloud2(scan))
            pub.publish(convert.scan_to_pointcloud2(scan))
            assert ros.spin_until(lambda: len(odoms) > k, timeout=10.0), node.drops.summary()
        ros.spin_for(0.2)
        assert [convert.stamp_of(m) for m in odoms] == [f.stamp_ns for f in frames[:2]] and not root_odoms
        assert node.diagnostics()["received"] == {"/robot1/lidar/points": 2}


def test_scans_that_never_reach_the_callback_are_counted_as_missed(frames):
    """A burst while the node's keep-last queue holds one scan: the newest is processed, the others are
    counted as missed (from the lone publisher's sequence numbers) in the diagnostics and the exit line,
    not silently lost; with two publishers matched (numbers would interleave) nothing is guessed."""
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert
    from vg_ros.nodes.base import diagnostic_status

    def scan_msg(frame):
        scan = frame.lidar
        scan.frame_id = frame.rig.lidar.frame_id
        return convert.scan_to_pointcloud2(scan)

    topic = "/lidar/points"
    with ros_session(DOMAIN) as ros:
        node = make_node(ros, qos_depth=1)
        client = ros.node("client")
        pub = client.create_publisher(PointCloud2, topic, 10)
        assert ros.wait_for_match(pub, timeout=5.0)
        pub.publish(scan_msg(frames[0]))
        assert ros.spin_until(lambda: node.received[topic] == 1, timeout=10.0)
        burst = frames[1:]
        for frame in burst:          # nobody spins meanwhile: the queue keeps the newest only
            pub.publish(scan_msg(frame))
        time.sleep(0.5)              # let DDS deliver the burst into the queue before anything is taken
        assert ros.spin_until(lambda: node.received[topic] >= 2, timeout=10.0)
        ros.spin_for(0.5)
        assert node.received[topic] == 2 and node.missed[topic] == len(burst) - 1
        assert node.received[topic] + node.missed[topic] == len(frames)
        values = dict(diagnostic_status(node.diagnostics(), None, 5.0)[2])
        assert values[f"missed/{topic}"] == str(len(burst) - 1)
        second = ros.node("second").create_publisher(PointCloud2, topic, 10)
        assert ros.spin_until(lambda: node.count_publishers(topic) == 2, timeout=5.0)
        for frame in frames[:3]:
            second.publish(scan_msg(frame))
        ros.spin_for(0.5)
        assert node.missed[topic] == len(burst) - 1


def test_first_scans_wait_for_tf_before_the_rig_extrinsics_are_taken(frames, monkeypatch):
    """Where TF is listened to, the LiDAR's extrinsics are taken from it, even when /tf_static arrives after
    the first scans (they wait, `waiting_for_tf`, up to `tf_wait` s); the rig's only when TF gives none by
    then, with a warning. Before: the first scan took the rig's for the whole drive (TF was not even
    listened to until that scan)."""
    from types import SimpleNamespace

    from vg_ros import convert
    from vg_ros.geometry import make_T
    from vg_ros.nodes.extrinsics import TfOrRig
    monkeypatch.setattr(TfOrRig, "listens", property(lambda self: True))   # as with tf2_ros on a ROS install
    msgs = []
    for frame in frames[:4]:
        scan = frame.lidar
        scan.frame_id = frame.rig.lidar.frame_id
        msgs.append(convert.scan_to_pointcloud2(scan))
    with ros_session(DOMAIN + 1) as ros:
        node = make_node(ros, tf_wait=30.0)
        node.on_points(msgs[0])
        node.on_points(msgs[1])
        assert node.odometry is None and node.drops.drops["waiting_for_tf"] == 2
        # the robot's static TF arrives (here a lever arm unlike the rig's): the next scan uses it
        T_tf = make_T(None, [0.5, -0.2, 1.7])
        ts = SimpleNamespace(header=SimpleNamespace(frame_id="base_link"), child_frame_id=msgs[2].header.frame_id,
                             transform=convert.matrix_to_transform_stamped(T_tf, 0, "base_link", "x").transform)
        assert node.extrinsics.add_transforms([ts]) == 1
        node.on_points(msgs[2])
        assert node.odometry is not None and np.allclose(node.odometry.T_base_lidar, T_tf)
    with ros_session(DOMAIN + 2) as ros:   # no TF ever: the rig's after tf_wait
        node = make_node(ros, tf_wait=0.3)
        node.on_points(msgs[0])
        assert node.odometry is None
        time.sleep(0.35)
        node.on_points(msgs[1])
        assert node.odometry is not None and node.drops.drops["waiting_for_tf"] == 1
        assert np.allclose(node.odometry.T_base_lidar, frames[0].rig.lidar.T_base_lidar)


def test_a_degenerate_first_scan_does_not_stop_the_odometry_for_ever(frames):
    """The first cloud becomes the map unchecked; one that nothing can be registered against (a partial sweep:
    20 points on a line) made every later good scan fail, for ever (found by fuzzing the node). A map of one
    sweep that the next scan cannot match is replaced by that scan at once, counted as `map_restarted` (not
    published: its pose is the prior's), and the scans after it are published with the right motion."""
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2
    from vg_ros import convert

    with ros_session(DOMAIN) as ros:
        node = make_node(ros)
        client = ros.node("client")
        odoms = []
        client.create_subscription(Odometry, "/registration/odometry", odoms.append, 20)
        pub = client.create_publisher(PointCloud2, "/lidar/points", 20)
        assert ros.wait_for_match(pub, timeout=5.0)
        lidar_frame = frames[0].rig.lidar.frame_id
        line = np.stack([np.linspace(2, 12, 20), np.zeros(20), np.zeros(20)], 1).astype(np.float32)
        pub.publish(convert.xyz_fields_to_pointcloud2(line, stamp_ns=frames[0].stamp_ns - 50_000_000,
                                                      frame_id=lidar_frame))
        assert ros.spin_until(lambda: len(odoms) == 1, timeout=10.0)
        for k, frame in enumerate(frames):
            scan = frame.lidar
            scan.frame_id = lidar_frame
            pub.publish(convert.scan_to_pointcloud2(scan))
            assert ros.spin_until(lambda: node.received["/lidar/points"] == k + 2 and
                                  node.drops.total + sum(node.drops.processed.values()) == k + 2, timeout=15.0), \
                f"scan {k}: {node.drops.summary()}"
        assert node.drops.drops["map_restarted"] == 1 and node.drops.drops["registration_failed"] == 0, \
            node.drops.summary()
        assert ros.spin_until(lambda: len(odoms) == len(frames), timeout=10.0), node.drops.summary()
        published = [convert.stamp_of(m) for m in odoms[1:]]
        assert published == [f.stamp_ns for f in frames[1:]], node.drops.summary()
        poses = [convert.odometry_to_matrix(m)[0] for m in odoms[1:]]
        gt = [invert_T(frames[0].T_odom_base) @ f.T_odom_base for f in frames[1:]]
        # the restart pose is the prior's (identity: the line gave no motion); the motion after it is right
        assert all(np.isfinite(T).all() for T in poses)
        assert all(np.linalg.norm(T[:3, 3] - G[:3, 3]) < 0.1 for T, G in zip(poses, gt)), node.drops.summary()
