"""vg_ros.nodes.base: counted drops, stamp checks, the approximate-time policy, extrinsics, parameters
from the YAML, QoS, and a node's setup failure as one ERROR line — over real rclpy/DDS where a node
is involved."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vg_ros import ros_compat
from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import make_T, rpy_to_R
from vg_ros.nodes.base import (
    DIAG_ERROR, DIAG_OK, DIAG_WARN, TfOrRig, command_qos, diagnostic_status, latched_qos, resolve_device, sensor_qos,
)
from vg_ros.nodes.inputs import ApproxTimeSync, DropCounter, StampGuard
from vg_ros.types import Rig

MS = 1_000_000


class ListLogger:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, text):
        self.lines.append(text)

    info = error = warning


# ------------------------------------------------------------------------------------ DropCounter


def test_drop_counter_counts_every_drop_and_rate_limits_logs():
    now = [0.0]
    log = ListLogger()
    drops = DropCounter(log, log_period_s=5.0, clock=lambda: now[0])
    for _ in range(10):
        drops.drop("stale_stamp", "on /x")
    drops.drop("out_of_order", "on /y")
    assert drops.drops["stale_stamp"] == 10 and drops.drops["out_of_order"] == 1 and drops.total == 11
    assert len(log.lines) == 2  # one per reason within the period
    now[0] = 6.0
    drops.drop("stale_stamp")
    assert len(log.lines) == 3 and "+9 more" in log.lines[-1]
    drops.ok()
    assert drops.snapshot() == {"drops": {"stale_stamp": 11, "out_of_order": 1}, "processed": {"processed": 1}}
    assert "stale_stamp=11" in drops.summary()


def test_diagnostic_status_levels_follow_the_period_not_the_totals():
    start = {"drops": {"stale_stamp": 4}, "processed": {"registered": 10}}
    level, message, values = diagnostic_status(start, None, 5.0)
    assert level == DIAG_WARN and message == "10 processed, 4 dropped in 5.0 s: stale_stamp 4"
    assert dict(values) == {"rate_hz": "2.00", "period_s": "5.00", "processed/registered": "10",
                            "dropped/stale_stamp": "4"}
    clean = {"drops": {"stale_stamp": 4}, "processed": {"registered": 60}}
    assert diagnostic_status(clean, start, 5.0)[:2] == (DIAG_OK, "50 processed in 5.0 s (10.0 Hz)")
    assert diagnostic_status(clean, clean, 5.0)[:2] == (DIAG_WARN, "no input in 5.0 s")
    all_dropped = {"drops": {"stale_stamp": 9, "bad_cloud": 2}, "processed": {"registered": 60}}
    assert diagnostic_status(all_dropped, clean, 5.0)[:2] == (DIAG_ERROR, "0 processed, 7 dropped in 5.0 s: "
                                                                          "stale_stamp 5, bad_cloud 2")
    raised = {"drops": {"stale_stamp": 4, "callback_error:RuntimeError": 1}, "processed": {"registered": 70}}
    assert diagnostic_status(raised, clean, 5.0)[0] == DIAG_ERROR
    waiting = {"drops": {"no_command": 50}, "processed": {}}
    assert diagnostic_status(waiting, None, 5.0)[0] == DIAG_WARN   # waiting for a command is not a failure
    # what reached each subscription is reported beside (a node's diagnostics() carries it)
    deaf = {"drops": {}, "processed": {}, "received": {"/cam/image_raw": 1, "/clock": 0}}
    assert ("received/%s" % "/cam/image_raw", "1") in diagnostic_status(deaf, None, 5.0)[2]


# ------------------------------------------------------------------------------------- StampGuard


def test_stamp_guard_drops_duplicates_out_of_order_stale_and_zero():
    drops = DropCounter(ListLogger())
    guard = StampGuard(drops, max_age_s=0.5)
    assert guard.accept("/a", 100 * MS, now_ns=150 * MS)
    assert not guard.accept("/a", 100 * MS, now_ns=150 * MS)       # duplicate
    assert not guard.accept("/a", 90 * MS, now_ns=150 * MS)        # out of order
    assert guard.accept("/b", 90 * MS, now_ns=150 * MS)            # topics are independent
    assert not guard.accept("/a", 200 * MS, now_ns=800 * MS)       # 0.6 s old
    assert guard.accept("/a", 700 * MS, now_ns=800 * MS)           # the stale one did not advance the topic
    assert not guard.accept("/a", 0, now_ns=800 * MS)
    assert dict(drops.drops) == {"duplicate_stamp": 1, "out_of_order": 1, "stale_stamp": 1, "zero_stamp": 1}


def test_stamp_guard_age_check_off_without_clock_or_max_age():
    guard = StampGuard(DropCounter(ListLogger()), max_age_s=0.5)
    assert guard.accept("/a", 1 * MS, now_ns=0)  # sim time not received yet
    off = StampGuard(DropCounter(ListLogger()), max_age_s=0.0)
    assert off.accept("/a", 1 * MS, now_ns=10**18)
    with pytest.raises(ValueError, match="max_age_s"):
        StampGuard(DropCounter(), max_age_s=-1.0)


def test_stamp_guard_resets_when_a_source_starts_again_but_not_for_a_straggler():
    jumps = []
    drops = DropCounter(ListLogger())
    guard = StampGuard(drops, jump_back_s=1.0, on_jump=lambda topic, back: jumps.append((topic, back)))
    for t in (10_000, 10_100, 10_200):
        assert guard.accept("/a", t * MS)
    assert guard.accept("/b", 10_150 * MS)
    assert not guard.accept("/a", 10_150 * MS)     # 0.05 s behind: an ordinary out-of-order stamp
    assert not guard.accept("/a", 5_000 * MS)      # 5.2 s behind: dropped and remembered
    assert guard.accept("/a", 10_300 * MS)         # the source goes on: it was a straggler, nothing reset
    assert not guard.accept("/a", 4_000 * MS)      # another straggler ...
    assert not guard.accept("/a", 3_000 * MS)      # ... and one before it: not a time base going on in order
    assert jumps == [] and guard.last_ns == {"/a": 10_300 * MS, "/b": 10_150 * MS}
    assert not guard.accept("/a", 1_000 * MS)      # the bag starts again: its first stamp is dropped ...
    assert guard.accept("/a", 1_100 * MS)          # ... the second, in order after it, resets and is accepted
    assert jumps == [("/a", pytest.approx(9.2))] and guard.jumps == 1
    assert guard.accept("/b", 1_120 * MS)          # every topic was forgotten
    assert not guard.accept("/a", 1_100 * MS)      # and the checks go on in the new time base
    assert dict(drops.drops) == {"out_of_order": 1, "time_jump_back": 4, "duplicate_stamp": 1}
    # off (the default of the class, as replay uses it): a source starting again is only ever out of order
    off = StampGuard(DropCounter(ListLogger()))
    assert off.accept("/a", 10_000 * MS) and not off.accept("/a", 1_000 * MS) and not off.accept("/a", 1_100 * MS)
    assert dict(off.drops.drops) == {"out_of_order": 2}
    # a stale stamp (by the node clock) never resets
    stale = StampGuard(DropCounter(ListLogger()), max_age_s=0.5, jump_back_s=1.0, on_jump=lambda *a: jumps.append(a))
    assert stale.accept("/a", 10_000 * MS, now_ns=10_100 * MS)
    assert not stale.accept("/a", 1_000 * MS, now_ns=10_200 * MS)
    assert not stale.accept("/a", 1_100 * MS, now_ns=10_200 * MS)
    assert dict(stale.drops.drops) == {"out_of_order": 2} and len(jumps) == 1   # out of order first, as ever
    with pytest.raises(ValueError, match="jump_back_s"):
        StampGuard(DropCounter(), jump_back_s=-1.0)


def test_stamped_buffer_gives_the_nearest_message_within_the_gap():
    from vg_ros.nodes.inputs import StampedBuffer
    buffer = StampedBuffer(3)
    assert buffer.nearest(0, 1.0) == (None, None)
    for k in range(5):                       # keeps the last 3: stamps 200, 300, 400 ms
        buffer.add(k * 100 * MS, f"m{k}")
    assert buffer.nearest(290 * MS, 0.05) == ("m3", pytest.approx(0.01))
    assert buffer.nearest(1000 * MS, 0.15) == (None, pytest.approx(0.6))   # too far: None, and how far
    assert buffer.nearest(0, 0.5)[0] == "m2"                                 # the oldest kept
    buffer.clear()
    assert buffer.nearest(300 * MS, 1.0) == (None, None)
    with pytest.raises(ValueError, match="size"):
        StampedBuffer(0)


def test_pose_buffer_interpolates_extrapolates_briefly_and_gives_the_motion_between_stamps():
    from scipy.spatial.transform import Rotation

    from vg_ros.geometry import make_T
    from vg_ros.nodes.inputs import PoseBuffer
    buffer = PoseBuffer(size=4, max_gap_s=0.5, max_extrapolation_s=0.2)
    assert buffer.at(0) is None and buffer.motion(0, 1) is None
    yaw = lambda deg: Rotation.from_euler("z", deg, degrees=True).as_matrix()   # noqa: E731
    for k in range(3):   # 10 m/s along x, turning 10 deg per 100 ms
        buffer.add(k * 100 * MS, make_T(yaw(10 * k), [1.0 * k, 0, 0]))
    buffer.add(100 * MS, np.eye(4))   # not newer: ignored
    assert np.allclose(buffer.at(100 * MS), make_T(yaw(10), [1.0, 0, 0]))
    assert np.allclose(buffer.at(150 * MS), make_T(yaw(15), [1.5, 0, 0]))      # between: lerp + slerp
    assert np.allclose(buffer.at(350 * MS), make_T(yaw(35), [3.5, 0, 0]))      # after: the last velocity
    assert buffer.at(450 * MS) is None and buffer.at(-1) is None               # too far on / before
    moved = buffer.motion(0, 100 * MS)   # a world point seen at 0 ms, seen from the vehicle at 100 ms
    assert np.allclose(moved, np.linalg.inv(make_T(yaw(10), [1.0, 0, 0])))
    buffer.add(900 * MS, np.eye(4))      # odometry lost for 0.7 s: nothing in between
    assert buffer.at(500 * MS) is None and np.allclose(buffer.at(900 * MS), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        buffer.add(1000 * MS, np.full((4, 4), np.nan))
    buffer.clear()
    assert buffer.at(900 * MS) is None
    with pytest.raises(ValueError, match="size"):
        PoseBuffer(1)


def test_odometry_of_another_vehicle_frame_becomes_the_base_pose():
    """grounding.messages.odometry_base_pose: odometry of the LiDAR frame (a LiDAR odometry's usual child)
    gives the same base pose as odometry of base_link; an unknown child frame is a KeyError."""
    from vg_ros.convert import matrix_to_odometry
    from vg_ros.geometry import make_T, rpy_to_R
    from vg_ros.grounding.messages import odometry_base_pose
    from vg_ros.nodes.base import TfOrRig
    extrinsics = TfOrRig("default")
    T_odom_base = make_T(rpy_to_R(0.0, 0.0, 0.4), [5.0, -2.0, 0.1])
    T_base_lidar, _ = extrinsics.lookup("lidar_top")
    as_base = matrix_to_odometry(T_odom_base, stamp_ns=1, child_frame_id="base_link", flavor="rosbags")
    as_lidar = matrix_to_odometry(T_odom_base @ T_base_lidar, stamp_ns=1, child_frame_id="lidar_top",
                                  flavor="rosbags")
    assert np.allclose(odometry_base_pose(as_base, extrinsics), T_odom_base)
    assert np.allclose(odometry_base_pose(as_lidar, extrinsics), T_odom_base)
    with pytest.raises(KeyError):
        odometry_base_pose(matrix_to_odometry(T_odom_base, child_frame_id="mast", flavor="rosbags"), extrinsics)


# ----------------------------------------------------------------------------------- ApproxTimeSync


def make_sync(n=3, **kw):
    out: list[tuple] = []
    drops = DropCounter(ListLogger())
    sync = ApproxTimeSync(n, lambda *msgs: out.append(msgs), drops=drops, **kw)
    return sync, out, drops


def test_sync_matches_within_slop_in_topic_order():
    sync, out, _ = make_sync(3, slop_s=0.02)
    sync.add(0, "a0", 100 * MS)
    sync.add(2, "c0", 105 * MS)
    assert out == []
    sync.add(1, "b0", 110 * MS)
    assert out == [("a0", "b0", "c0")]
    assert sync.pending() == 0


def test_sync_rejects_sets_wider_than_slop():
    sync, out, _ = make_sync(2, slop_s=0.02)
    sync.add(0, "a0", 100 * MS)
    sync.add(1, "b0", 125 * MS)  # 25 ms apart
    assert out == []
    sync.add(0, "a1", 130 * MS)
    assert out == [("a1", "b0")]


def test_sync_picks_nearest_partner_and_drops_older_leftovers():
    sync, out, drops = make_sync(2, slop_s=0.05)
    for i, stamp in enumerate((100, 110, 120)):
        sync.add(0, f"a{i}", stamp * MS)
    assert out == [] and sync.pending() == 3
    sync.add(1, "b", 119 * MS)
    assert out == [("a2", "b")]
    assert drops.drops["sync_stale"] == 2 and sync.pending() == 0  # a0, a1 can never be emitted in order
    sync.add(0, "late", 115 * MS)
    assert drops.drops["sync_late"] == 1 and sync.pending() == 0


def test_sync_queue_overflow_counts():
    sync, out, drops = make_sync(2, slop_s=0.01, queue_size=3)
    for i in range(5):
        sync.add(0, i, (100 + 100 * i) * MS)
    assert drops.drops["sync_queue_overflow"] == 2 and sync.pending() == 3


def test_sync_partial_sets_after_timeout_when_a_camera_is_missing():
    sync, out, drops = make_sync(3, slop_s=0.02, partial_timeout_s=0.25, min_topics=2)
    for k in range(6):  # topic 2 never publishes
        sync.add(0, f"a{k}", (100 + 100 * k) * MS)
        sync.add(1, f"b{k}", (101 + 100 * k) * MS)
    # stamps 100..601 seen; sets older than 601 - 250 ms come out partially, in order, with None
    assert out[:3] == [("a0", "b0", None), ("a1", "b1", None), ("a2", "b2", None)]
    assert len(out) == 3 and drops.drops["sync_partial"] == 3
    time.sleep(0.3)                 # input stopped: the clock-driven flush takes the rest
    sync.flush(10_000 * MS)
    assert [m[0] for m in out] == [f"a{k}" for k in range(6)]


def test_sync_flush_ignores_a_clock_of_another_time_base_and_a_running_backlog():
    sync, out, drops = make_sync(2, slop_s=0.02, partial_timeout_s=0.1)
    sync.add(0, "a0", 100 * MS)
    sync.flush(400 * MS)            # input arrived just now: a backlog may still be coming, no flush
    assert out == []
    time.sleep(0.15)
    sync.flush(10**18)              # wall clock against bag stamps: no early partial set
    assert out == [] and sync.pending() == 1
    sync.flush(400 * MS)            # idle, same time base: the timeout applies
    assert out == [("a0", None)]
    sync.add(1, "b0-late", 100 * MS)  # the missing camera's image for that stamp: never a second set
    assert drops.drops["sync_late"] == 1 and sync.pending() == 0


def test_sync_partial_below_min_topics_is_dropped():
    sync, out, drops = make_sync(3, slop_s=0.02, partial_timeout_s=0.1, min_topics=2)
    sync.add(0, "lonely", 100 * MS)
    time.sleep(0.15)
    sync.flush(300 * MS)
    assert out == [] and drops.drops["sync_timeout"] == 1 and sync.pending() == 0


def test_sync_reset_forgets_queued_and_emitted_stamps():
    sync, out, drops = make_sync(2)
    sync.add(0, "a0", 100 * MS)
    sync.add(1, "b0", 100 * MS)
    sync.add(0, "a1", 200 * MS)                   # queued, waiting for its partner
    assert out == [("a0", "b0")] and sync.pending() == 1
    assert sync.reset() == 1 and drops.drops["sync_reset"] == 1 and sync.pending() == 0
    sync.add(0, "a2", 50 * MS)                    # before the emitted set: `sync_late` without the reset
    sync.add(1, "b2", 50 * MS)
    assert out[-1] == ("a2", "b2") and drops.drops["sync_late"] == 0


def test_sync_rejects_bad_arguments():
    with pytest.raises(ValueError, match="slop_s"):
        ApproxTimeSync(2, print, slop_s=0.0)
    with pytest.raises(ValueError, match="min_topics"):
        ApproxTimeSync(2, print, min_topics=3)
    sync, _, _ = make_sync(2)
    with pytest.raises(ValueError, match="topic index"):
        sync.add(5, "x", 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 400)), min_size=1, max_size=60),
       st.integers(5, 40))
def test_sync_property_sets_are_tight_unique_and_ordered(events, slop_ms):
    sync, out, _ = make_sync(3, slop_s=slop_ms / 1000, queue_size=5)
    for topic, stamp in events:
        sync.add(topic, (topic, stamp * MS), stamp * MS)
    seen = set()
    last = [-1, -1, -1]
    for msgs in out:
        stamps = [m[1] for m in msgs]
        assert max(stamps) - min(stamps) <= slop_ms * MS
        for topic, (t, stamp) in enumerate(msgs):
            assert t == topic and (t, stamp) not in seen and stamp > last[topic]
            seen.add((t, stamp))
            last[topic] = stamp


# ----------------------------------------------------------------------------------------- TfOrRig


def test_extrinsics_from_rig_and_from_static_transforms():
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    Transform, TransformStamped = ts.types["geometry_msgs/msg/Transform"], ts.types["geometry_msgs/msg/TransformStamped"]
    Vector3, Quaternion = ts.types["geometry_msgs/msg/Vector3"], ts.types["geometry_msgs/msg/Quaternion"]

    rig = Rig.load("default")
    extr = TfOrRig(rig)
    T, source = extr.lookup("cam_front_optical")
    assert source == "rig" and np.allclose(T, rig.camera("CAM_FRONT").T_base_cam)
    T, _ = extr.lookup(rig.lidar.frame_id)
    assert np.allclose(T[:3, 3], [0.94, 0.0, 1.84])
    assert np.allclose(extr.lookup("base_link")[0], np.eye(4))
    with pytest.raises(KeyError, match="no transform"):
        extr.lookup("nowhere")

    def stamped(parent, child, xyz, yaw_deg):
        R = rpy_to_R(0, 0, np.radians(yaw_deg))
        from vg_ros.geometry import R_to_quat
        q = R_to_quat(R)
        return TransformStamped(Header(Time(0, 0), parent), child,
                                Transform(Vector3(*xyz), Quaternion(*q)))

    # base_link -> mount -> lidar_top chain; TF wins over the rig
    used = extr.add_transforms([stamped("base_link", "mount", [1.0, 0.0, 0.0], 90),
                                stamped("mount", "lidar_top", [0.0, 2.0, 0.0], 0)])
    assert used == 2
    T, source = extr.lookup("lidar_top")
    assert source == "tf_static"
    expected = make_T(rpy_to_R(0, 0, np.pi / 2), [1.0, 0.0, 0.0]) @ make_T(None, [0.0, 2.0, 0.0])
    assert np.allclose(T, expected)
    assert np.allclose(T[:3, 3], [-1.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------- QoS


def test_qos_conventions():
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy
    assert sensor_qos(3).reliability == ReliabilityPolicy.BEST_EFFORT and sensor_qos(3).depth == 3
    assert sensor_qos(3, "reliable").reliability == ReliabilityPolicy.RELIABLE
    assert command_qos().durability == DurabilityPolicy.TRANSIENT_LOCAL
    assert latched_qos().reliability == ReliabilityPolicy.RELIABLE
    with pytest.raises(ValueError, match="sensor_reliability"):
        sensor_qos(3, "sometimes")
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_ros_compat_flags_are_honest():
    import importlib.util
    for name, ok in ros_compat.available().items():
        if name == "launch":  # a checkout's launch/ folder imports as an empty namespace package
            continue
        assert ok == (importlib.util.find_spec(name) is not None), name
    assert ros_compat.HAVE_LAUNCH == hasattr(ros_compat.launch, "LaunchDescription")
    assert all("(" in line for line in ros_compat.missing())


# ---------------------------------------------------------------------------------- PerceptionNode


@dataclasses.dataclass
class ToyConfig(PipelineConfig):
    voxel_size: float = param(0.5, "voxel edge (m)", low=0.01, high=5.0)
    iterations: int = param(10, "iterations", low=1, high=100)
    weights: str = param("default", "also a common node parameter: declared once, from the config")


@pytest.fixture
def ros_context():
    import rclpy
    from rclpy.context import Context
    ctx = Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


def spin_until(executor, predicate, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not predicate():
        executor.spin_once(timeout_sec=0.05)
    return predicate()


def toy_node_class():
    from vg_ros.nodes.base import PerceptionNode

    class ToyNode(PerceptionNode):
        default_node_name = "toy_node"
        config_cls = ToyConfig
        node_params = {"input_topic": ("/toy/in", "input")}
    return ToyNode


def test_parameters_from_yaml_then_overrides(tmp_path, ros_context):
    from rclpy.parameter import Parameter
    cfg_file = tmp_path / "perception.yaml"
    cfg_file.write_text(textwrap.dedent("""
        toy_node:
          ros__parameters:
            voxel_size: 1.5
            input_topic: /from/yaml
            qos_depth: 2
            weights: /tmp/w.safetensors
            typo_param: 3
    """))
    ToyNode = toy_node_class()
    node = ToyNode(config_path=cfg_file, context=ros_context,
                   parameter_overrides=[Parameter("iterations", value=42)])
    try:
        assert node.cfg == ToyConfig(voxel_size=1.5, iterations=42, weights="/tmp/w.safetensors")
        assert node.params["weights"] == "/tmp/w.safetensors"
        assert node.params["input_topic"] == "/from/yaml" and node.params["qos_depth"] == 2
        assert node.params["device"] == "auto" and node.sensor_qos().depth == 2
        assert node.get_parameter("voxel_size").value == 1.5
    finally:
        node.destroy_node()
    cfg_file.write_text("toy_node:\n  ros__parameters:\n    voxel_size: 50.0\n")
    with pytest.raises(ValueError, match=r"voxel_size = 50.0: must be in \[0.01, 5.0\]"):
        ToyNode(config_path=cfg_file, context=ros_context)
    with pytest.raises(ValueError, match="does not exist"):
        ToyNode(config_path=tmp_path / "missing.yaml", context=ros_context)


def test_subscription_guards_stamps_and_survives_callback_errors(tmp_path, ros_context):
    from rclpy.executors import SingleThreadedExecutor
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import PointStamped
    from std_msgs.msg import Header, String

    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("toy_node:\n  ros__parameters: {diagnostics_period: 0.2}\n")
    ToyNode = toy_node_class()
    node = ToyNode(config_path=cfg_file, context=ros_context)
    node.configure()
    node.activate()
    received: list[int] = []

    def on_msg(msg):
        if msg.header.stamp.nanosec == 13:
            raise RuntimeError("unlucky frame")
        received.append(msg.header.stamp.nanosec)

    node.subscribe(PointStamped, "/toy/in", on_msg, node.sensor_qos())
    diag: list[str] = []
    node.create_subscription(String, "/toy_node/diagnostics", lambda m: diag.append(m.data), 10)
    from diagnostic_msgs.msg import DiagnosticArray
    statuses: list = []
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: statuses.extend(m.status), 10)
    pub = node.create_publisher(PointStamped, "/toy/in", 10)
    ex = SingleThreadedExecutor(context=ros_context)
    ex.add_node(node)
    try:
        assert spin_until(ex, lambda: pub.get_subscription_count() > 0)
        for nanosec in (10, 11, 11, 9, 13, 14):
            pub.publish(PointStamped(header=Header(stamp=Time(sec=1, nanosec=nanosec))))
            ex.spin_once(timeout_sec=0.05)
        assert spin_until(ex, lambda: len(received) >= 3 and diag)
        assert received == [10, 11, 14]
        assert node.drops.drops["duplicate_stamp"] == 1 and node.drops.drops["out_of_order"] == 1
        assert node.drops.drops["callback_error:RuntimeError"] == 1
        assert '"duplicate_stamp": 1' in diag[-1]
        # the standard /diagnostics: the period with the raising callback is an ERROR, then no input: WARN
        assert spin_until(ex, lambda: len(statuses) >= 2)
        first = next(s for s in statuses if s.values and dict((v.key, v.value) for v in s.values)
                     .get("dropped/callback_error:RuntimeError") == "1")
        assert first.name == "vg_ros: /toy_node" and first.hardware_id == "cpu"
        assert first.level == bytes([DIAG_ERROR]) and "callback_error:RuntimeError 1" in first.message
        assert statuses[-1].level == bytes([DIAG_WARN]) and statuses[-1].message.startswith("no input in")
    finally:
        ex.shutdown()
        node.destroy_node()


NODE_SCRIPT = textwrap.dedent("""
    import sys
    from vg_ros.nodes.base import PerceptionNode, run_node

    class Broken(PerceptionNode):
        default_node_name = "broken_node"
        def load(self):
            if sys.argv[1] == "missing":
                raise FileNotFoundError("checkpoint /nope/model.safetensors does not exist")
            self.get_logger().info("READY")

    sys.exit(run_node(Broken, args=[]))
""")


def test_run_node_setup_failure_is_one_error_line_and_sigint_is_clean(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script), "missing"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 2
    assert "configure failed: FileNotFoundError: checkpoint /nope/model.safetensors" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout

    proc = subprocess.Popen([sys.executable, str(script), "ok"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "active on" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in rest and "stopping:" in rest


def test_node_processes_run_numpy_blas_on_one_thread_unless_the_user_set_it():
    """limit_blas_threads (run_node and replay call it): OpenBLAS's pool at one thread, so a large numpy
    product does not leave BLAS threads spinning beside torch's; an OPENBLAS_NUM_THREADS of the user's is
    left alone; the limiter undoes itself."""
    from threadpoolctl import threadpool_info

    from vg_ros.nodes.base import limit_blas_threads

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy has no BLAS pool threadpoolctl can see"
    assert limit_blas_threads({"OPENBLAS_NUM_THREADS": "3"}) is None and blas_threads() == before
    limiter = limit_blas_threads({})
    try:
        assert set(blas_threads()) == {1}
        a = np.random.default_rng(0).normal(size=(60000, 2))
        assert np.allclose(a @ np.eye(2), a)   # products still work, on the calling thread
    finally:
        limiter.restore_original_limits()
    assert blas_threads() == before
