"""A node's process: `run_node` (init, lifecycle, spin, a clean stop) and the console-script `main`,
with what a node process needs around it (BLAS threads, the supervisor's death)."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from vg_ros import ros_compat, stop_signals
from vg_ros.nodes.base import PerceptionNode


def limit_blas_threads(environ: dict[str, str] | None = None) -> Any:
    """numpy's BLAS (OpenBLAS) at one thread in this process, unless OPENBLAS_NUM_THREADS is set; the
    `threadpoolctl` limiter (its `restore_original_limits()` undoes it), or None when left alone.

    Why: torch runs the networks on its own pool. A numpy product large enough for OpenBLAS to use its pool
    (grounding's LiDAR projection into the mask, 60k points) leaves those threads spinning after it, and they
    took the cores from the next frame's network: grounding's cached frame 11-13 ms, 27-29 ms right after such a
    projection; 13.1-13.3 ms with one BLAS thread (2-core machine, torch on 2 threads). The registration
    pipeline's numpy work is too thin to gain from BLAS threads (odometry 46-56 Hz either way)."""
    environ = os.environ if environ is None else environ
    if environ.get("OPENBLAS_NUM_THREADS"):
        return None
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


SHUTDOWN_WAIT_S = 5.0   # for running callbacks at a stop; `vg-ros up` sends SIGKILL 20 s after SIGINT


def wait_for_callbacks(executor: Any, timeout_s: float) -> bool:
    """True once no callback the executor handed to its worker threads is running (at once for a
    single-threaded executor: its callbacks ran inside `spin_once`); False after `timeout_s`. rclpy's own
    `Executor.shutdown(timeout_sec)` returns without waiting for them (rclpy 7.x)."""
    deadline = time.monotonic() + timeout_s
    while any(not task.done() for task in list(getattr(executor, "_futures", ()))):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def die_with_parent(parent_pid: str | None) -> None:
    """Under `vg-ros up` (which passes its pid): SIGTERM this process when the supervisor dies, however it
    dies (SIGKILL included), so no node runs on orphaned; at once if it is already gone. Linux only."""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent_pid):   # the supervisor died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def parent_gone(parent_pid: str | None) -> bool:
    """Under `vg-ros up`: the supervisor has died (this process was re-parented). The spin loop asks too, in
    case the kernel's parent-death signal never arrives (a sandbox without PR_SET_PDEATHSIG, the signal
    blocked by a thread we did not start)."""
    return bool(parent_pid) and os.getppid() != int(parent_pid)


def run_node(node_cls: type[PerceptionNode], args: list[str] | None = None, *, multithreaded: bool = True,
             **node_kwargs: Any) -> int:
    """Init rclpy, build the node, configure and activate it (`autostart`; else a lifecycle manager does),
    spin until SIGINT/SIGTERM or the shutdown transition, shut down.

    A setup failure (bad parameter, missing or corrupt checkpoint, CUDA asked for but absent) is one
    ERROR log line and exit code 2, never a traceback; under a lifecycle manager the failed transition is
    that line and the node stays up in its previous state. SIGINT/SIGTERM only set a flag (our handlers,
    not rclpy's), so the node deactivates and logs its drop summary while its context is still valid,
    whenever the signal arrives. `args` are ROS arguments (None: sys.argv).
    """
    import signal

    rclpy_mod = ros_compat.require_rclpy(node_cls.__name__)
    ros_compat.use_dds_profiles()
    limit_blas_threads()
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    stop = threading.Event()
    previous = stop_signals.catch_into((signal.SIGINT, signal.SIGTERM), stop)
    parent_pid = os.environ.get("VG_ROS_PARENT_PID")   # set by `vg-ros up`
    die_with_parent(parent_pid)
    if hasattr(signal, "SIGUSR1"):   # `kill -USR1 <pid>`: every thread's stack to stderr, the node runs on
        import faulthandler
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    rclpy_mod.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        try:
            node = node_cls(**node_kwargs)
            if node.params["autostart"]:
                node.configure()
                node.activate()
            else:
                node.get_logger().info(
                    "autostart false: unconfigured, waiting for a lifecycle manager or `ros2 lifecycle set "
                    f"{node.get_fully_qualified_name()} configure` (then activate)")
        except Exception as exc:  # noqa: BLE001 - setup failures end the process with one clear line
            if node is not None and node.transition_error:   # a failed transition: the node logged its line
                return 2
            name = node.get_name() if node is not None else node_cls.default_node_name
            msg = f"{name}: construct failed: {type(exc).__name__}: {exc}"
            if node is not None:
                node.get_logger().error(msg)
            else:
                print(f"[ERROR] {msg}", file=sys.stderr, flush=True)
            return 2
        executor = MultiThreadedExecutor(num_threads=4) if multithreaded else SingleThreadedExecutor()
        executor.add_node(node)
        try:
            # a `shutdown` transition (lifecycle manager) ends the process as SIGINT does
            while not stop.is_set() and rclpy_mod.ok() and node.lifecycle_state() != "finalized":
                executor.spin_once(timeout_sec=0.1)
                if parent_gone(parent_pid):
                    node.get_logger().warning(f"the supervisor (pid {parent_pid}) is gone: stopping")
                    break
        finally:
            # no new callback starts now; the running ones (an inference, a transition a lifecycle manager
            # asked for) finish before the shutdown transition frees what they use
            if not wait_for_callbacks(executor, SHUTDOWN_WAIT_S):
                # say where, so a hang is never silent (the supervisor's SIGKILL follows if it never returns)
                import faulthandler
                node.get_logger().error(f"callbacks still running {SHUTDOWN_WAIT_S:g} s after the stop; "
                                        "every thread's stack follows")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            node.finish()
            executor.shutdown(timeout_sec=0)
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy_mod.try_shutdown()
        stop_signals.restore(previous)


def node_main(node_cls: type[PerceptionNode]) -> Callable[[list[str] | None], int]:
    """A console-script `main(args=None)` for `node_cls` that exits with run_node's code."""
    def main(args: list[str] | None = None) -> int:
        code = run_node(node_cls, args)
        if args is None:
            sys.exit(code)
        return code
    return main
