"""The QoS conventions of the perception nodes: sensors best effort, commands and latched results
reliable and transient-local, and a description of each profile for the logs."""
from __future__ import annotations

from vg_ros import ros_compat

if ros_compat.HAVE_RCLPY:
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

RELIABILITIES = ("best_effort", "reliable")


def sensor_qos(depth: int = 5, reliability: str = "best_effort") -> "QoSProfile":
    """Sensor inputs: keep-last `depth`, best effort by default (as qos_profile_sensor_data), volatile.

    A best-effort subscription receives from reliable and best-effort publishers alike; a reliable one
    receives nothing from a best-effort publisher (the classic "node publishes nothing").
    """
    if reliability not in RELIABILITIES:
        raise ValueError(f"sensor_reliability = {reliability!r}: must be one of {list(RELIABILITIES)}")
    if depth < 1:
        raise ValueError(f"qos_depth = {depth}: must be >= 1")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth),
                      reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort"
                      else ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def command_qos(depth: int = 1) -> "QoSProfile":
    """Commands (/command): reliable and transient-local, so a late-joining node gets the last one."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


def volatile_command_qos(depth: int = 10) -> "QoSProfile":
    """The second command subscription: reliable and volatile, the only durability a volatile publisher
    (`ros2 topic pub` without `--qos-durability transient_local`) can reach; it receives a transient-local
    publisher's live commands too, so a node with both subscriptions drops the second copy."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def latched_qos(depth: int = 1) -> "QoSProfile":
    """Latched outputs and /tf_static: reliable, transient-local (late subscribers get the last value)."""
    return command_qos(depth)


def output_qos(depth: int = 5) -> "QoSProfile":
    """Ordinary outputs: reliable, volatile — received by reliable and best-effort subscribers alike."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=int(depth), reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


def describe_qos(qos: "QoSProfile") -> str:
    rel = "reliable" if qos.reliability == ReliabilityPolicy.RELIABLE else "best_effort"
    dur = "transient_local" if qos.durability == DurabilityPolicy.TRANSIENT_LOCAL else "volatile"
    needs = []
    if rel == "reliable":
        needs.append("publishers must be reliable")
    if dur == "transient_local":
        needs.append("publishers must be transient_local")
    return f"{rel}/{dur} depth {qos.depth}" + (f" ({', '.join(needs)})" if needs else " (accepts any publisher)")
