"""vg_ros.nodes.base: the diagnostics levels, extrinsics, parameters from the YAML, QoS, stamp-guarded
subscriptions, and a node's setup failure as one ERROR line — over real rclpy/DDS where a node is involved.
The ROS-free input checks are in test_nodes_inputs.py."""
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

from vg_ros import ros_compat
from vg_ros.config import PipelineConfig, param
from vg_ros.geometry import make_T, rpy_to_R
from vg_ros.nodes.base import DIAG_ERROR, DIAG_OK, DIAG_WARN, diagnostic_status, resolve_device
from vg_ros.nodes.extrinsics import TfOrRig
from vg_ros.nodes.qos import command_qos, latched_qos, sensor_qos
from vg_ros.types import Rig


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


def test_odometry_of_another_vehicle_frame_becomes_the_base_pose():
    """grounding.messages.odometry_base_pose: odometry of the LiDAR frame (a LiDAR odometry's usual child)
    gives the same base pose as odometry of base_link; an unknown child frame is a KeyError."""
    from vg_ros.convert import matrix_to_odometry
    from vg_ros.geometry import make_T, rpy_to_R
    from vg_ros.grounding.messages import odometry_base_pose
    from vg_ros.nodes.extrinsics import TfOrRig
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
        assert spin_until(ex, lambda: len(received) >= 3)
        assert received == [10, 11, 14]
        assert node.drops.drops["duplicate_stamp"] == 1 and node.drops.drops["out_of_order"] == 1
        assert node.drops.drops["callback_error:RuntimeError"] == 1
        # the 0.2 s diagnostics timer runs from the node's construction: on a loaded machine its first reports
        # can come before the messages above were taken, so wait for the one that counts them
        assert spin_until(ex, lambda: diag and '"duplicate_stamp": 1' in diag[-1]), diag[-1:]

        # the standard /diagnostics: the period with the raising callback is an ERROR, then no input: WARN
        def raised_in(status) -> bool:
            return dict((v.key, v.value) for v in status.values).get("dropped/callback_error:RuntimeError") == "1"

        def error_then_quiet() -> bool:
            errors = [k for k, s in enumerate(statuses) if s.values and raised_in(s)]
            return bool(errors) and len(statuses) > errors[0] + 1 and statuses[-1].message.startswith("no input in")
        assert spin_until(ex, error_then_quiet), [(s.level, s.message) for s in statuses]
        first = next(s for s in statuses if s.values and raised_in(s))
        assert first.name == "vg_ros: /toy_node" and first.hardware_id == "cpu"
        assert first.level == bytes([DIAG_ERROR]) and "callback_error:RuntimeError 1" in first.message
        assert statuses[-1].level == bytes([DIAG_WARN]) and statuses[-1].message.startswith("no input in")
    finally:
        ex.shutdown()
        node.destroy_node()


NODE_SCRIPT = textwrap.dedent("""
    import sys
    from vg_ros.nodes.base import PerceptionNode
    from vg_ros.nodes.process import run_node

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

    from vg_ros.nodes.process import limit_blas_threads

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



def test_rig_and_base_frame_set_while_unconfigured_are_read_at_the_next_configure(ros_context):
    from rclpy.parameter import Parameter

    from vg_ros.nodes.base import TransitionFailed
    node = toy_node_class()(context=ros_context)
    try:
        node.configure()
        first = node.extrinsics
        assert first.base_frame == "base_link"
        # no configure edge from inactive: a clear refusal, the node stays as it was
        with pytest.raises(TransitionFailed, match="configure not possible in state inactive"):
            node.configure()
        assert node.lifecycle_state() == "inactive"
        node.cleanup()
        [result] = node.set_parameters([Parameter("base_frame", value="chassis")])
        assert result.successful, result.reason
        node.configure()
        second = node.extrinsics
        assert second is not first and second.base_frame == "chassis"
        node.cleanup()
        node.configure()   # unchanged parameters: the same extrinsics (and their TF listener) are kept
        assert node.extrinsics is second
    finally:
        node.destroy_node()


def test_an_infinite_or_nan_time_parameter_is_refused_not_fatal(ros_context):
    """`ros2 param set /node max_stamp_age inf` used to pass the `>= 0` check and then end the process
    (OverflowError converting it to ns, outside any handler): now refused with the range."""
    from rclpy.parameter import Parameter
    node = toy_node_class()(context=ros_context)
    try:
        node.configure()
        for key in ("max_stamp_age", "time_jump_reset", "input_silence_warn"):
            for value in (float("inf"), float("nan"), 1e300):
                [result] = node.set_parameters([Parameter(key, value=value)])
                assert not result.successful and "must be a number in [0, 1e9]" in result.reason, (key, value)
        [ok] = node.set_parameters([Parameter("max_stamp_age", value=2.5)])
        assert ok.successful and node.stamps.max_age_ns == 2_500_000_000
    finally:
        node.destroy_node()


@pytest.mark.parametrize("module", ["registration_node", "occupancy_node", "grounding_node"])
def test_each_node_module_runs_with_python_dash_m(module):
    """`python -m vg_ros.nodes.X` is the node (as `ros2 run` and `vg-ros up` start it): a missing checkpoint
    is its one ERROR line and exit code 2, not a silent exit 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", f"vg_ros.nodes.{module}", "--ros-args",
                           "-p", "weights:=/nope/model.safetensors", "-p", "diagnostics_period:=0.0"],
                          capture_output=True, text=True, timeout=120, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"{module}: configure failed:" in output and "/nope/model.safetensors" in output
    assert "Traceback" not in output


def test_use_sim_time_set_while_active_survives_a_deactivate_and_activate(ros_context):
    """rclpy makes its /clock subscription when use_sim_time is set; one set while the node is active must
    not be taken for one `start` made and destroyed on deactivate (the node clock would stop for good)."""
    import rclpy
    from builtin_interfaces.msg import Time
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock

    node = toy_node_class()(context=ros_context)
    clock_node = rclpy.create_node("clock_pub", context=ros_context)
    ex = SingleThreadedExecutor(context=ros_context)
    ex.add_node(node)
    ex.add_node(clock_node)
    try:
        node.configure()
        node.activate()
        [ok] = node.set_parameters([Parameter("use_sim_time", value=True)])
        assert ok.successful
        pub = clock_node.create_publisher(Clock, "/clock", 10)

        def clock_reads(sec: int) -> bool:
            pub.publish(Clock(clock=Time(sec=sec)))
            return spin_until(ex, lambda: node.now_ns() == sec * 10**9, timeout_s=0.3)
        assert any(clock_reads(100) for _ in range(20))
        node.deactivate()
        node.activate()
        assert any(clock_reads(200) for _ in range(20)), f"node clock stuck at {node.now_ns()}"
    finally:
        ex.shutdown()
        clock_node.destroy_node()
        node.destroy_node()


def test_rclpy_starts_where_home_is_not_writable(tmp_path):
    """rclpy.init fails ("failed to initialize logging") with $HOME unset or read-only (a CI container under
    an arbitrary uid) unless ROS_LOG_DIR / ROS_HOME say where: every vg_ros process sets ROS_LOG_DIR to a
    temp folder then (ros_compat.ensure_ros_log_dir, run with use_dds_profiles before each rclpy.init)."""
    from vg_ros.ros_compat import ensure_ros_log_dir
    assert ensure_ros_log_dir({"ROS_LOG_DIR": "/x"}) is None and ensure_ros_log_dir({"ROS_HOME": "/x"}) is None
    env = {"HOME": str(tmp_path)}
    assert ensure_ros_log_dir(env) is None and (tmp_path / ".ros" / "log").is_dir() and "ROS_LOG_DIR" not in env
    for env in ({"HOME": "/proc"}, {}):
        folder = ensure_ros_log_dir(env)
        assert folder is not None and env["ROS_LOG_DIR"] == folder and os.access(folder, os.W_OK)
    clean = {k: v for k, v in os.environ.items() if k not in ("ROS_LOG_DIR", "ROS_HOME")}
    code = ("from vg_ros.ros_compat import use_dds_profiles; use_dds_profiles(); import rclpy; "
            "rclpy.init(); print('up'); rclpy.shutdown()")
    run = subprocess.run([sys.executable, "-c", code], env={**clean, "HOME": "/proc"}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and "up" in run.stdout, run.stderr[-2000:]


def test_twin_subscriptions_count_each_sample_once_and_a_lost_one_once():
    """A transient-local and a volatile /command subscription both get a latched publisher's samples, in
    either order (multi-threaded executor): each sample is handled and counted in `received` once, a sample
    the twin took first is not counted as lost, and a lost one is counted once (a review: alternating
    winners gave missed=2 with nothing lost)."""
    import collections
    import threading
    from types import SimpleNamespace

    from vg_ros.nodes.base import PerceptionNode
    from vg_ros.nodes.qos import command_qos

    class FakeSub:
        def __init__(self, callback):
            self.callback = callback

        def get_publisher_count(self):
            return 1   # the one transient-local publisher, matched by both subscriptions

    stub = SimpleNamespace(received=collections.Counter(), missed=collections.Counter(), _watched={},
                           _received_lock=threading.Lock(), resolve_topic_name=lambda topic: "/command",
                           get_logger=lambda: SimpleNamespace(info=lambda *a: None, error=lambda *a: None),
                           create_subscription=lambda t, topic, cb, qos, **kw: FakeSub(cb),
                           call_safely=lambda cb, *a, where=None: cb(*a))
    stub._count_missed = lambda *a: PerceptionNode._count_missed(stub, *a)
    handled, seen = [], collections.deque(maxlen=32)
    String = type("String", (), {"__module__": "std_msgs.msg"})
    latched = PerceptionNode.subscribe(stub, String, "/command", handled.append, command_qos(), seen_samples=seen,
                                       count_missed=False, watch=False)
    volatile = PerceptionNode.subscribe(stub, String, "/command", handled.append, command_qos(), seen_samples=seen,
                                        watch=False)
    for number, first in zip((1, 2, 3, 4, 6), (latched, volatile, latched, volatile, latched)):   # 5 is lost
        info = {"source_timestamp": 1000 + number, "publication_sequence_number": number}
        for sub in (first, volatile if first is latched else latched):
            sub.callback(object(), info)
    assert len(handled) == 5 and stub.received["/command"] == 5 and stub.missed["/command"] == 1
