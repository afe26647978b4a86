"""The perception nodes as ROS 2 managed (lifecycle) nodes, driven over DDS the way `ros2 lifecycle set` and
Nav2's lifecycle_manager drive them: a registration_node process started with autostart:=false waits
unconfigured, fails a configure with a bad checkpoint and stays up, takes a parameter while unconfigured,
configures, activates (odometry flows), deactivates (its topics are gone, nothing comes out), activates
again (one subscription, not two), cleans up, and exits on the shutdown transition."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="lifecycle nodes need rclpy (ros-jazzy wheels)")

from ros_helpers import ros_session  # noqa: E402

DOMAIN = 71
NODE = "/registration_node"


@pytest.fixture(scope="module")
def frames():
    from vg_ros.sim import simulate
    return list(simulate(4343, 0.8, cameras=False, occupancy=False, expressions=0))


@contextlib.contextmanager
def node_process(argv: list[str], domain: int, log_path):
    """A node process on `domain` with its output in `log_path`; yields (process, {"output": ...}), the
    output filled in once the process is gone (killed if still running)."""
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONUNBUFFERED": "1"}
    result: dict = {}
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc, result
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.seek(0)
            result["output"] = log.read()
            print(f"--- {' '.join(argv)} (exit {proc.returncode}):\n{result['output']}")   # shown on a failure


def lifecycle(ros, node_name: str):
    """`ros2 lifecycle get / set` for one node, through its services (vg-ros lifecycle's client)."""
    from vg_ros.lifecycle import LifecycleClient
    life = LifecycleClient(ros.node("lifecycle_client"), ros.executor, node_name, timeout_s=30.0)
    assert life.wait(), f"{node_name}: no lifecycle services"
    return life


def test_registration_node_through_the_managed_lifecycle_over_dds(tmp_path, frames):
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import String
    from vg_ros import convert

    argv = ["-m", "vg_ros.nodes.registration_node", "--ros-args", "-p", "autostart:=false",
            "-p", "weights:=/nope/vbreg.safetensors", "-p", "diagnostics_period:=0.2"]
    with node_process(argv, DOMAIN, tmp_path / "node.log") as (proc, result):
        with ros_session(DOMAIN) as ros:
            life = lifecycle(ros, NODE)
            client = ros.node("client")
            odoms: list = []
            client.create_subscription(Odometry, "/registration/odometry", odoms.append, 20)
            diag: list = []
            client.create_subscription(String, f"{NODE}/diagnostics", lambda m: diag.append(json.loads(m.data)), 10)
            pub = client.create_publisher(PointCloud2, "/lidar/points", 20)

            def scan(k: int):
                s = frames[k].lidar
                s.frame_id = frames[k].rig.lidar.frame_id
                return convert.scan_to_pointcloud2(s)

            def topics_present() -> tuple[int, int]:
                return (client.count_subscribers("/lidar/points"), client.count_publishers("/registration/odometry"))

            # unconfigured: no topics, and it says so in its diagnostics
            assert life.state() == "unconfigured"
            assert ros.spin_until(lambda: diag, timeout=10.0) and diag[-1]["state"] == "unconfigured"
            ros.spin_for(0.5)
            assert topics_present() == (0, 0)

            # a configure that fails (missing checkpoint) is refused; the node stays up, unconfigured
            assert not life.change("configure")
            assert life.state() == "unconfigured" and proc.poll() is None
            # unconfigured, it takes what a configured node refuses (read at configure)
            [ok] = ros.set_parameters("registration_node", weights="none")
            assert ok.successful, ok.reason
            [ok] = ros.set_parameters("registration_node", odom_frame="odom_a")
            assert ok.successful, ok.reason
            assert life.change("configure") and life.state() == "inactive"
            [refused] = ros.set_parameters("registration_node", odom_frame="odom_b")
            assert not refused.successful and "cleanup" in refused.reason
            [live] = ros.set_parameters("registration_node", max_range=90.0)
            assert live.successful
            ros.spin_for(0.5)
            assert topics_present() == (0, 0)   # inactive: the model is loaded, nothing subscribed yet

            # active: odometry flows, in the frame set while unconfigured
            assert life.change("activate") and life.state() == "active"
            assert ros.spin_until(lambda: topics_present() == (1, 1), timeout=10.0)
            assert ros.wait_for_match(pub, timeout=10.0)
            for k in range(3):
                pub.publish(scan(k))
                assert ros.spin_until(lambda: len(odoms) > k, timeout=20.0), f"no odometry for scan {k}"
            assert {m.header.frame_id for m in odoms} == {"odom_a"}

            # inactive again: its topics are gone and a scan produces nothing
            assert life.change("deactivate") and life.state() == "inactive"
            assert ros.spin_until(lambda: topics_present() == (0, 0), timeout=10.0)
            pub.publish(scan(3))
            ros.spin_for(1.0)
            assert len(odoms) == 3
            assert ros.spin_until(lambda: diag[-1]["state"] == "inactive", timeout=15.0)

            # activated once more: one subscription and one publisher, not two; odometry starts afresh
            assert life.change("activate")
            assert ros.spin_until(lambda: topics_present() == (1, 1), timeout=10.0)
            ros.spin_for(0.5)
            assert topics_present() == (1, 1)
            assert ros.wait_for_match(pub, timeout=10.0)
            pub.publish(scan(4))
            assert ros.spin_until(lambda: len(odoms) == 4, timeout=20.0)
            ros.spin_for(0.3)
            assert len(odoms) == 4   # once, not once per subscription
            T, _ = convert.odometry_to_matrix(odoms[-1])
            assert abs(T[0, 3]) < 1e-6   # the first scan after a gap is the new origin

            # a transition the state machine does not have from here is refused, the node stays
            assert not life.change("configure") and life.state() == "active"
            assert life.change("deactivate") and life.change("cleanup") and life.state() == "unconfigured"
            # shutdown ends the process cleanly, with its summary
            assert life.change("shutdown")
            assert proc.wait(timeout=30) == 0
    output = result["output"]
    assert "autostart false: unconfigured" in output
    assert "configure failed:" in output and "/nope/vbreg.safetensors" in output
    assert "Traceback" not in output
    assert "stopping:" in output and "received: /lidar/points=4" in output


SLOW_NODE = """
import sys, time
from vg_ros.nodes.base import PerceptionNode
from vg_ros.nodes.process import run_node

class Slow(PerceptionNode):
    default_node_name = "slow_node"
    def load(self):
        self.get_logger().info("LOADING")
        time.sleep(2.0)
        self.model = "loaded"
        self.get_logger().info("LOADED")
    def unload(self):
        assert self.model == "loaded"
        self.model = None
        self.get_logger().info("UNLOADED")

sys.exit(run_node(Slow, args=["--ros-args", "-p", "autostart:=false"]))
"""


def test_a_transition_by_id_the_state_lacks_is_refused_and_sigint_waits_for_a_running_configure(tmp_path):
    """Nav2's lifecycle_manager sends transition ids: one the current state has no edge for is answered
    success=False and the node stays up (rclpy alone raises in the service callback and the process dies).
    SIGINT while a configure asked over DDS is loading the model: the configure finishes, then the shutdown
    transition unloads it; exit 0, no traceback."""
    import signal

    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    script = tmp_path / "slow_node.py"
    script.write_text(SLOW_NODE)
    with node_process([str(script)], DOMAIN + 2, tmp_path / "node.log") as (proc, result):
        with ros_session(DOMAIN + 2) as ros:
            life = lifecycle(ros, "/slow_node")
            assert not life.change(Transition.TRANSITION_ACTIVATE)   # unconfigured has no activate edge
            assert life.state() == "unconfigured" and proc.poll() is None
            configure = life._change.call_async(ChangeState.Request(
                transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
            assert ros.spin_until(lambda: "LOADING" in (tmp_path / "node.log").read_text(), timeout=30.0)
            proc.send_signal(signal.SIGINT)
            assert ros.spin_until(configure.done, timeout=30.0) and configure.result().success
        assert proc.wait(timeout=30) == 0
    output = result["output"]
    assert "transition id 3 refused in state unconfigured" in output
    assert output.index("LOADED") < output.index("UNLOADED") < output.index("stopping:")
    assert "Traceback" not in output and "still running" not in output


def vg_ros(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vg_ros.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_vg_ros_up_no_autostart_then_vg_ros_lifecycle_starts_and_shuts_the_node_down(tmp_path):
    env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN + 1), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen([sys.executable, "-m", "vg_ros.cli", "up", "--nodes", "registration", "--no-autostart",
                           "--device", "cpu", "--namespace", "robot1", "--respawn"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        got = vg_ros("lifecycle", "get", "/robot1/registration_node", "--timeout", "60", env=env)
        assert (got.returncode, got.stdout) == (0, "/robot1/registration_node: unconfigured\n"), got.stderr
        # --timeout: each call is a fresh process discovering the node (the default 10 s is tight on a loaded machine)
        started = vg_ros("lifecycle", "startup", "/robot1/registration_node", "--timeout", "60", env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.splitlines() == ["/robot1/registration_node: configure: unconfigured -> inactive",
                                               "/robot1/registration_node: activate: inactive -> active"]
        again = vg_ros("lifecycle", "startup", "/robot1/registration_node", "--timeout", "60", env=env)
        assert (again.returncode, again.stdout) == (0, "/robot1/registration_node: already active\n")
        wrong = vg_ros("lifecycle", "cleanup", "/robot1/registration_node", "--timeout", "60", env=env)
        assert wrong.returncode == 1
        assert wrong.stdout.startswith("/robot1/registration_node: cleanup is not a transition from active "
                                       "(available: deactivate, shutdown")
        missing = vg_ros("lifecycle", "get", "registration_node", "--timeout", "1", env=env)
        assert missing.returncode == 2 and "no lifecycle node /registration_node answered within 1 s" in missing.stderr
        down = vg_ros("lifecycle", "shutdown", "/robot1/registration_node", "--timeout", "60", env=env)
        assert (down.returncode, down.stdout) == (0, "/robot1/registration_node: shutdown: active -> finalized\n")
        output, _ = up.communicate(timeout=60)   # the node exits, and with it `vg-ros up`
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0, output
    assert "autostart false: unconfigured" in output and "every node has exited" in output
    assert "registration_node=0" in output
    # a node that shut down is not a crash: not respawned, though --respawn is on
    assert "registration_node exited (exit code 0)" in output and "it shut down cleanly" in output
    assert "restarting" not in output


def _pid_gone(pid: int, timeout: float) -> bool:
    """The process has exited: no such pid, or a zombie (an orphan whose new parent, e.g. a container's
    PID 1, does not reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (OSError, IndexError):
            pass
        try:   # our child when the test started it; reaped by whoever is its parent otherwise
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def _process_state(pid: int) -> str:
    """What a process that should have gone is doing: its signal masks and each thread's state and wait."""
    lines = []
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        lines += [x for x in status if x.split(":")[0] in ("State", "PPid", "SigPnd", "ShdPnd", "SigBlk", "SigIgn",
                                                               "SigCgt", "Threads")]
        for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text() if (task / "wchan").exists() else "?"
            name = (task / "comm").read_text().strip()
            lines.append(f"task {task.name} {name} {stat} {wchan}")
    except OSError as exc:
        lines.append(f"({exc})")
    return "; ".join(lines)


@pytest.mark.parametrize("signal_name", ["SIGHUP", "SIGKILL"])
def test_vg_ros_up_never_leaves_a_node_running_when_it_goes_away(signal_name):
    """The nodes run in their own sessions (Ctrl-C reaches the supervisor only), so a closed terminal
    (SIGHUP to `vg-ros up`) or a killed supervisor (SIGKILL) used to leave them running orphaned. SIGHUP
    now stops them as Ctrl-C does; on SIGKILL each node gets SIGTERM from the kernel (PR_SET_PDEATHSIG).

    `vg-ros up` starts here with SIGHUP, SIGINT and SIGTERM blocked, as our CI runner starts its tests: the
    mask is inherited across exec, so the SIGKILL case failed there (the node's SIGTERM stayed pending)
    until the processes unblocked the signals they handle (vg_ros.stop_signals)."""
    import re
    import signal
    env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN + 3), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
           "PYTHONUNBUFFERED": "1"}
    blocked_exec = ("import os, signal, sys; "
                    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}); "
                    "os.execv(sys.executable, [sys.executable, '-m', 'vg_ros.cli', *sys.argv[1:]])")
    up = subprocess.Popen([sys.executable, "-c", blocked_exec, "up", "--nodes", "registration", "--device", "cpu"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node_pid, lines = None, []
    try:
        for line in up.stdout:
            lines.append(line)
            if match := re.search(r"started registration_node \(pid (\d+)", line):
                node_pid = int(match.group(1))
            if "active on" in line:
                break
        assert node_pid is not None, "".join(lines)
        up.send_signal(getattr(signal, signal_name))
        assert _pid_gone(node_pid, 30.0), \
            f"registration_node (pid {node_pid}) still runs after {signal_name} to up: {_process_state(node_pid)}"
        rest, _ = up.communicate(timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
        if node_pid is not None and not _pid_gone(node_pid, 0.1):
            os.kill(node_pid, signal.SIGKILL)
    if signal_name == "SIGHUP":   # stopped as by Ctrl-C: the node's clean summary, exit 0
        assert up.returncode == 0 and "stopping:" in rest and "registration_node=0" in rest, rest


def test_stop_signals_unblock_what_they_catch_and_a_node_notices_its_supervisor_gone():
    """stop_signals.catch installs the handler and unblocks the signal an exec'd process may inherit
    blocked; parent_gone is the spin loop's own check behind the kernel's parent-death signal."""
    import signal

    from vg_ros import stop_signals
    from vg_ros.nodes.process import parent_gone
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    seen = []
    previous = stop_signals.catch((signal.SIGUSR2,), lambda signum, _: seen.append(signum))
    try:
        assert signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        signal.raise_signal(signal.SIGUSR2)   # to this thread: were it still blocked, it would stay pending
        assert seen == [signal.SIGUSR2]
    finally:
        stop_signals.restore(previous)
    assert signal.getsignal(signal.SIGUSR2) == previous[signal.SIGUSR2]
    assert not parent_gone(None) and not parent_gone("") and not parent_gone(str(os.getppid()))
    assert parent_gone(str(os.getppid() + 1))


def test_a_stop_signal_sets_the_event_even_while_the_main_thread_holds_its_lock():
    """A handler runs in the main thread between two bytecodes, possibly while that thread holds the event's
    lock (inside `event.wait()`, or inside the handler of a first SIGTERM when a second arrives: a node gets
    the parent-death signal once per thread of its dying supervisor). A handler calling `event.set()` then
    waited for itself for ever: a node left running after `vg-ros up` was SIGKILLed, now and then
    (/proc showed SIGTERM caught, the main thread in a futex wait). `catch_into` only records the signal;
    its watcher thread sets the event."""
    import signal
    import threading

    from vg_ros import stop_signals
    event = threading.Event()
    previous = stop_signals.catch_into((signal.SIGUSR2,), event)
    try:
        with event._cond:   # as inside event.wait(): the handler runs here, and must not take this lock
            signal.raise_signal(signal.SIGUSR2)   # to this thread: the handler runs here, under the lock
            signal.raise_signal(signal.SIGUSR2)
        assert event.wait(10.0)
    finally:
        stop_signals.restore(previous)
    assert signal.getsignal(signal.SIGUSR2) == previous.handlers[signal.SIGUSR2]
