"""`vg-ros play` and `vg-ros record`: bags onto DDS and back, where `ros2 bag` is not installed.

`Player` publishes a bag's messages on their topics at their recorded pace (times `rate`), with
`/clock` (rosgraph_msgs/Clock) so nodes under `use_sim_time` follow the bag's time, and the QoS a real
system would offer: sensor data best effort (or reliable with `reliable_sensors`), `/command`,
`/tf_static` and every topic the bag recorded from transient-local publishers (an occupancy grid: RViz's
Map display and Nav2 subscribe so) reliable + transient-local (late joiners get them), everything else
reliable. Messages go
out as the bag's own CDR bytes, so nothing is converted. Types with no rclpy class here (this
package's `/gt/*` types, `tf2_msgs` without a ROS install) are skipped with a note.

`Recorder` discovers the types of the topics it is asked for on the graph, subscribes with a QoS
compatible with every publisher it sees, and writes what arrives into an mcap rosbag2 (log time =
receive time on the node clock). Both also keep, per (topic, header stamp), the wall time a message
was published / received, which the demo uses for end-to-end latency.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from vg_ros import stop_signals
from vg_ros.ros_compat import use_dds_profiles

SENSOR_TYPES = frozenset({
    "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/CameraInfo",
    "sensor_msgs/msg/PointCloud2", "sensor_msgs/msg/Imu", "sensor_msgs/msg/LaserScan", "sensor_msgs/msg/NavSatFix",
})
LATCHED_TOPICS = frozenset({"/tf_static", "/command"})


def rclpy_class(msgtype: str) -> type | None:
    """The rclpy message class of "pkg/msg/Name", or None when its Python package is not installed."""
    parts = msgtype.split("/")
    if len(parts) != 3:
        return None
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError):
        return None


def playback_qos(topic: str, msgtype: str, *, reliable_sensors: bool = False, latched_depth: int = 1,
                 latched: bool = False):
    """The QoS a publisher of `topic` offers (see the module docstring); `latched`: the bag recorded it
    from transient-local publishers."""
    from vg_ros.nodes.qos import latched_qos, output_qos, sensor_qos
    if latched or topic in LATCHED_TOPICS:
        return latched_qos(max(1, latched_depth))
    if msgtype in SENSOR_TYPES:
        return sensor_qos(10, "reliable" if reliable_sensors else "best_effort")
    return output_qos(10)


def _stamp_of(msg: Any) -> int | None:
    header = getattr(msg, "header", None)
    if header is None:
        return None
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class Player:
    """Publishes a bag on a node (see the module docstring). `run()` blocks until the bag (or `stop`) ends.

    `skipped` {topic: why}; `published` {topic: count}; `publish_wall_ns` {(topic, stamp_ns): wall ns}
    for messages with a header (filled when `track_stamps`)."""

    def __init__(self, node: Any, bag_path: str | Path, *, rate: float = 1.0, topics: Iterable[str] | None = None,
                 loop: bool = False, clock_hz: float = 50.0, reliable_sensors: bool = False,
                 track_stamps: bool = False, remap: dict[str, str] | None = None, namespace: str = "/") -> None:
        from rosgraph_msgs.msg import Clock
        from vg_ros.bag import BagReader
        from vg_ros.nodes.topics import GLOBAL_TOPICS, global_topic, normalize_namespace

        if not 0 < rate < math.inf:
            raise ValueError(f"rate = {rate}: must be a finite number > 0")
        if not 0 < clock_hz < math.inf:
            raise ValueError(f"clock_hz = {clock_hz}: must be a finite number > 0")
        self.node = node
        self.bag_path = Path(bag_path)
        self.rate = float(rate)
        self.loop = loop
        self.clock_period_s = 1.0 / clock_hz
        self.track_stamps = track_stamps
        self.skipped: dict[str, str] = {}
        self.published: collections.Counter[str] = collections.Counter()
        self.publish_wall_ns: dict[tuple[str, int], int] = {}
        self._publishers: dict[str, Any] = {}
        with BagReader(self.bag_path) as bag:
            bag_topics = bag.topics
            recorded_latched = bag.latched_topics
            self.start_ns, self.end_ns = bag.start_ns, bag.end_ns
        wanted = set(bag_topics) if topics is None else set(topics)
        if unknown := sorted(wanted - set(bag_topics)):
            raise ValueError(f"topics: {unknown} not in bag {str(self.bag_path)!r} (has {sorted(bag_topics)})")
        self.remap = dict(remap or {})   # bag topic -> the name it is published under
        if unknown := sorted(set(self.remap) - set(bag_topics)):
            raise ValueError(f"--remap: {unknown} not in bag {str(self.bag_path)!r} (has {sorted(bag_topics)})")
        if "/clock" in wanted and self.remap.get("/clock", "/clock") == "/clock":
            # a bag recorded with its /clock (`vg-ros record /clock ...`, `ros2 bag record -a`): the player
            # publishes its own from the bag's time, and a second publisher would send it back and forth
            # (before: refused as "--remap /clock:=/clock: already published", with no --remap given)
            wanted.discard("/clock")
            self.skipped["/clock"] = "the player publishes /clock itself, from the bag's time"
        namespace = normalize_namespace(namespace)
        if namespace != "/":   # every data topic under it, as nodes started in that namespace read them
            for topic in wanted - GLOBAL_TOPICS:
                self.remap[topic] = global_topic(self.remap.get(topic, topic).lstrip("/"), namespace)
        from rclpy.validate_full_topic_name import validate_full_topic_name
        names = {topic: self.remap.get(topic, topic) for topic in wanted}
        for topic, name in sorted(names.items(), key=lambda item: (item[0] == item[1], item)):   # remapped first
            try:
                validate_full_topic_name(name)
            except Exception as exc:  # noqa: BLE001 - rclpy's InvalidTopicNameException and kin
                raise ValueError(f"--remap {topic}:={name}: not a valid topic name ({exc})".splitlines()[0]) from None
            if name == "/clock" or list(names.values()).count(name) > 1:
                raise ValueError(f"--remap {topic}:={name}: {name} is already published by this player "
                                 "(/clock, or another topic of the bag)")
        for topic in sorted(wanted):
            msgtype, count = bag_topics[topic]
            cls = rclpy_class(msgtype)
            if cls is None:
                self.skipped[topic] = f"{msgtype} has no rclpy message class here (custom or not installed)"
                continue
            name = names[topic]
            # a command (or static TF) stays latched under its new name: /command published as /robot1/command
            # every static TF message and command is kept for a late joiner; of a latched stream (a grid)
            # only the latest, as its publisher keeps
            qos = playback_qos(topic if topic in LATCHED_TOPICS else name, msgtype,
                               reliable_sensors=reliable_sensors,
                               latched_depth=count if LATCHED_TOPICS & {topic, name} else 1,
                               latched=topic in recorded_latched)
            self._publishers[topic] = node.create_publisher(cls, name, qos)
        self.topics = sorted(self._publishers)
        if not self.topics:   # nothing to publish: `messages([])` would read every topic (and loop for ever)
            raise ValueError(f"none of the topics to play has a message class here: "
                             f"{'; '.join(f'{t}: {why}' for t, why in sorted(self.skipped.items()))}")
        self._clock_pub = node.create_publisher(Clock, "/clock", 10)
        self._clock_cls = Clock
        self.last_clock_ns = 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def subscription_counts(self) -> dict[str, int]:
        return {topic: pub.get_subscription_count() for topic, pub in self._publishers.items()}

    def wait_for_subscribers(self, topics: Iterable[str], timeout_s: float,
                             stop: threading.Event | None = None) -> list[str]:
        """Wait until every topic in `topics` has a subscriber (or `stop` is set); returns those still without
        one."""
        deadline = time.monotonic() + timeout_s
        topics = [t for t in topics if t in self._publishers]
        while True:
            missing = [t for t in topics if self._publishers[t].get_subscription_count() == 0]
            if not missing or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return missing
            time.sleep(0.05)

    def publish_clock(self, clock_ns: int) -> None:
        from builtin_interfaces.msg import Time
        clock_ns = max(int(clock_ns), 0)
        self._clock_pub.publish(self._clock_cls(clock=Time(sec=clock_ns // 1_000_000_000,
                                                           nanosec=clock_ns % 1_000_000_000)))
        self.last_clock_ns = clock_ns

    def run(self, stop: threading.Event | None = None, progress: Callable[[int], None] | None = None) -> dict:
        """Publish the bag (again and again with `loop`) until it ends or `stop` is set; a summary dict."""
        from vg_ros.bag import BagReader, typestore
        store = typestore()
        stop = stop or threading.Event()
        wall_start = time.monotonic()
        passes = 0
        while not stop.is_set():
            passes += 1
            pass_wall0 = time.monotonic()
            with BagReader(self.bag_path) as bag:
                t0 = bag.start_ns
                for topic, msgtype, log_ns, msg in bag.messages(self.topics or None):
                    if topic not in self._publishers:
                        continue
                    target = pass_wall0 + (log_ns - t0) / 1e9 / self.rate
                    while not stop.is_set():
                        now = time.monotonic()
                        self.publish_clock(t0 + int((now - pass_wall0) * self.rate * 1e9))
                        if now >= target:
                            break
                        time.sleep(min(target - now, self.clock_period_s))
                    if stop.is_set():
                        break
                    self.publish_clock(max(self.last_clock_ns, log_ns))
                    raw = bytes(store.serialize_cdr(msg, msgtype))
                    self._publishers[topic].publish(raw)
                    self.published[topic] += 1
                    if self.track_stamps:
                        stamp = _stamp_of(msg)
                        if stamp is not None:
                            self.publish_wall_ns[(topic, stamp)] = time.monotonic_ns()
                    if progress is not None:
                        progress(1)
                if self.loop:   # a pass spans the whole bag, whichever topics were chosen, its /clock running on
                    # and at least one /clock period: a bag of one message (or of one instant) otherwise looped
                    # without ever sleeping, publishing it thousands of times a second on a full core
                    end = pass_wall0 + max((bag.end_ns - t0) / 1e9 / self.rate, self.clock_period_s)
                    while not stop.is_set() and (now := time.monotonic()) < end:
                        self.publish_clock(t0 + int((now - pass_wall0) * self.rate * 1e9))
                        time.sleep(min(end - now, self.clock_period_s))
            if not self.loop:
                break
        wall = time.monotonic() - wall_start
        return {"bag": str(self.bag_path), "passes": passes, "wall_s": wall, "rate": self.rate,
                "published": dict(self.published), "skipped": dict(self.skipped)}


class Recorder:
    """Records `topics` from the graph into an mcap rosbag2 at `out` (see the module docstring).

    Call `poll()` now and then (it subscribes topics whose publishers appeared since); `close()` ends
    the bag. `counts` {topic: n}; `receive_wall_ns` {(topic, stamp_ns): wall ns of the first receipt};
    `skipped` {topic: why}."""

    def __init__(self, node: Any, out: str | Path, topics: Iterable[str], *, overwrite: bool = False,
                 track_stamps: bool = False) -> None:
        from vg_ros.bag import BagWriter
        self.node = node
        self.out = Path(out)
        from rclpy.validate_full_topic_name import validate_full_topic_name
        # as the graph names them: `lidar/points` is /lidar/points for a recorder in the root namespace
        self.topics = list(dict.fromkeys("/" + t.lstrip("/") if t.strip() else t for t in topics))
        if not self.topics:
            raise ValueError("topics: name at least one topic to record")
        for topic in self.topics:
            try:
                validate_full_topic_name(topic)
            except Exception as exc:  # noqa: BLE001 - rclpy's InvalidTopicNameException and kin
                raise ValueError(f"topic {topic!r}: not a valid topic name ({str(exc).splitlines()[0]})") from None
        self.writer = BagWriter(self.out, overwrite=overwrite)
        self.track_stamps = track_stamps
        self.counts: collections.Counter[str] = collections.Counter()
        self.receive_wall_ns: dict[tuple[str, int], int] = {}
        self.skipped: dict[str, str] = {}
        self.subscribed: dict[str, str] = {}
        self.last_receive_wall = 0.0
        self._subs: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        # under use_sim_time, what arrived before the node's clock had its first /clock (its time is still 0):
        # written with the first real time once there is one (a log time of 0 made a bag 54 years long)
        self._early: list[tuple[str, Any]] = []

    def _qos_for(self, topic: str):
        """Reliable/transient-local only where every publisher offers it: then nothing is refused."""
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        infos = self.node.get_publishers_info_by_topic(topic)
        reliable = bool(infos) and all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
        latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                          reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)

    def poll(self) -> list[str]:
        """Subscribe every wanted topic that now has a typed publisher; returns the topics still waiting."""
        types = dict(self.node.get_topic_names_and_types())
        waiting = []
        for topic in self.topics:
            if topic in self.subscribed or topic in self.skipped:
                continue
            names = types.get(topic)
            if not names or not self.node.get_publishers_info_by_topic(topic):
                waiting.append(topic)
                continue
            msgtype = names[0]
            cls = rclpy_class(msgtype)
            if cls is None:
                self.skipped[topic] = f"{msgtype} has no rclpy message class here"
                continue
            qos = self._qos_for(topic)
            with self._lock:
                self.writer.add_topic(topic, msgtype, latched=qos.durability.name == "TRANSIENT_LOCAL")
            self._subs.append(self.node.create_subscription(cls, topic, lambda m, t=topic: self._on_msg(t, m), qos))
            self.subscribed[topic] = msgtype
        return waiting

    def _on_msg(self, topic: str, msg: Any) -> None:
        wall = time.monotonic_ns()
        log_ns = self.node.get_clock().now().nanoseconds
        with self._lock:
            if self._closed:
                return
            if log_ns <= 0:   # sim time, no /clock yet
                self._early.append((topic, msg))
            else:
                self._write_early(log_ns)
                self.writer.write(topic, log_ns, msg)
            self.counts[topic] += 1
            self.last_receive_wall = time.monotonic()
            if self.track_stamps:
                stamp = _stamp_of(msg)
                if stamp is not None:
                    self.receive_wall_ns.setdefault((topic, stamp), wall)

    def _write_early(self, log_ns: int) -> None:
        for topic, msg in self._early:
            self.writer.write(topic, log_ns, msg)
        self._early.clear()

    def close(self) -> dict:
        with self._lock:
            if not self._closed:
                self._closed = True
                for sub in self._subs:
                    self.node.destroy_subscription(sub)
                self._write_early(time.time_ns())   # /clock never came: wall time rather than 0
                self.writer.close()
        return {"out": str(self.out), "counts": dict(self.counts), "skipped": dict(self.skipped),
                "never_seen": [t for t in self.topics if t not in self.subscribed and t not in self.skipped]}


# ------------------------------------------------------------------------------------------------- CLI


class _RosProcess:
    """rclpy context + one node + an executor thread for a CLI command; SIGINT/SIGTERM set `stop`."""

    def __init__(self, name: str, use_sim_time: bool = False) -> None:
        import signal

        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.signals import SignalHandlerOptions

        # Fast DDS reads its profiles once per process, at the first participant: without ours a reliable
        # sample lost on the way (the bag's one /command, in the burst of the first camera set) waited for
        # the default 3 s heartbeat, twice seen back to back: a command 6 s late (docs/bringup.md)
        use_dds_profiles()
        self.stop = threading.Event()
        self._previous = stop_signals.catch_into((signal.SIGINT, signal.SIGTERM), self.stop)
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(name, context=self.context,
                                      parameter_overrides=[Parameter("use_sim_time", value=use_sim_time)])
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinning = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self._spinning and self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shutting down under our feet
                if not self._spinning:
                    return
                raise

    def close(self) -> None:
        import rclpy
        self._spinning = False
        self._thread.join(timeout=2.0)
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        stop_signals.restore(self._previous)


def play_main(argv: list[str]) -> int:
    """`vg-ros play BAG [--rate R] [--loop] [--topics ...] [--remap FROM:=TO ...] [--namespace NS]`."""
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros play", description=(
        "Publish a rosbag2's messages over DDS at their recorded pace with /clock (for nodes with "
        "use_sim_time:=true). Sensor topics best effort, /command and /tf_static transient-local. "
        "Topics whose type has no rclpy class here (e.g. vg_ros/msg ground truth) are skipped with a note."))
    parser.add_argument("bag", help="rosbag2 directory, or a .mcap / .db3 file")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    parser.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    parser.add_argument("--topics", nargs="+", help="only these topics (default: all)")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds to wait for discovery first (default 1; "
                        "after --wait-for, to let the matched readers settle)")
    parser.add_argument("--wait-for", nargs="+", default=[], metavar="TOPIC",
                        help="start only once each of these topics (as published, after --remap/--namespace) has "
                             "a subscriber (at most --wait-timeout s): a node started with the player, or slowly, "
                             "otherwise misses the first messages of a best-effort stream")
    parser.add_argument("--wait-timeout", type=float, default=60.0, help="seconds --wait-for waits (default 60)")
    parser.add_argument("--reliable", action="store_true", help="offer sensor topics reliable instead of best effort")
    parser.add_argument("--clock-hz", type=float, default=50.0, help="/clock publish rate (default 50)")
    parser.add_argument("--remap", nargs="+", metavar="FROM:=TO", default=[],
                        help="publish the bag's topic FROM as TO, e.g. /velodyne_points:=/lidar/points")
    parser.add_argument("--namespace", default="/", metavar="NS",
                        help="publish the data topics under /NS (as `vg-ros up --namespace NS` or the launch file's "
                             "namespace:= reads them; after --remap); /clock, /tf, /tf_static stay global")
    args = parser.parse_args(argv)
    if not 0 < args.rate < math.inf:
        raise UserError(f"--rate {args.rate}: must be a finite number > 0")
    if not 0 <= args.delay < math.inf:
        raise UserError(f"--delay {args.delay}: must be a finite number >= 0")
    if not 0 <= args.wait_timeout < math.inf:
        raise UserError(f"--wait-timeout {args.wait_timeout}: must be a finite number >= 0")
    ros = _RosProcess("vg_ros_player")
    try:
        try:
            from vg_ros.replay import parse_remaps
            player = Player(ros.node, args.bag, rate=args.rate, topics=args.topics, loop=args.loop,
                            clock_hz=args.clock_hz, reliable_sensors=args.reliable, remap=parse_remaps(args.remap),
                            namespace=args.namespace)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        for topic, why in player.skipped.items():
            print(f"[play] skipping {topic}: {why}")
        for src, dst in player.remap.items():
            if src in player.topics:
                print(f"[play] {src} published as {dst}")
        print(f"[play] {len(player.topics)} topics, {player.duration_s:.2f} s of data at {args.rate}x"
              + (" (looping)" if args.loop else ""), flush=True)
        if args.wait_for:
            published = {player.remap.get(t, t): t for t in player.topics}   # as published -> bag topic
            if unknown := sorted(set(args.wait_for) - set(published)):
                raise UserError(f"--wait-for {unknown}: not among the published topics {sorted(published)}")
            print(f"[play] waiting for subscribers of {' '.join(args.wait_for)} (up to {args.wait_timeout:g} s)",
                  flush=True)
            missing = player.wait_for_subscribers([published[t] for t in args.wait_for], args.wait_timeout, ros.stop)
            if missing and not ros.stop.is_set():
                raise UserError(f"--wait-for: no subscriber on {[player.remap.get(t, t) for t in missing]} "
                                f"within {args.wait_timeout:g} s (is the node running, on "
                                f"ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}?)")
        ros.stop.wait(args.delay)
        summary = player.run(ros.stop)
    finally:
        ros.close()
    total = sum(summary["published"].values())
    print(f"[play] published {total} messages in {summary['wall_s']:.2f} s ({summary['passes']} pass(es))"
          + (" - interrupted" if ros.stop.is_set() else ""))
    for topic, count in sorted(summary["published"].items()):
        print(f"  {topic:<40} {count:>7}")
    return 0


def record_main(argv: list[str]) -> int:
    """`vg-ros record TOPICS... --out OUT.mcap [--duration S]`."""
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros record", description=(
        "Record DDS topics into an mcap rosbag2. Types are discovered from the graph; each topic is "
        "subscribed with a QoS every publisher on it accepts. Stops at --duration or Ctrl-C."))
    parser.add_argument("topics", nargs="+", help="topics to record")
    parser.add_argument("--out", required=True, help="output rosbag2 (directory; e.g. out.mcap)")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: Ctrl-C)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--use-sim-time", action="store_true", help="log times from /clock instead of wall time")
    args = parser.parse_args(argv)
    if not 0 <= args.duration < math.inf:
        raise UserError(f"--duration {args.duration}: must be a finite number >= 0 (0: until Ctrl-C)")
    ros = _RosProcess("vg_ros_recorder", use_sim_time=args.use_sim_time)
    recorder = None
    try:
        try:
            recorder = Recorder(ros.node, args.out, args.topics, overwrite=args.force)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        print(f"[record] waiting for {len(args.topics)} topic(s); Ctrl-C to stop", flush=True)
        end = time.monotonic() + args.duration if args.duration else float("inf")
        announced: set[str] = set()
        while not ros.stop.is_set() and time.monotonic() < end:
            recorder.poll()
            for topic in set(recorder.subscribed) - announced:
                print(f"[record] {topic} [{recorder.subscribed[topic]}]", flush=True)
                announced.add(topic)
            ros.stop.wait(0.05)   # a publisher's first messages go out as soon as it matches: subscribe quickly
    finally:
        summary = recorder.close() if recorder is not None else None
        ros.close()
    if summary:
        for topic, why in summary["skipped"].items():
            print(f"[record] skipped {topic}: {why}")
        if summary["never_seen"]:
            print(f"[record] never published: {summary['never_seen']}")
        print(f"[record] wrote {sum(summary['counts'].values())} messages to {summary['out']}")
        for topic, count in sorted(summary["counts"].items()):
            print(f"  {topic:<40} {count:>7}")
    return 0
