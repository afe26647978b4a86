"""What the three perception nodes share: parameters from one YAML, QoS conventions, counted drops,
stamp checks, approximate-time sync, extrinsics from TF or the rig, and a clean `main`.

A node subclasses `PerceptionNode`, names its pipeline config dataclass and its own parameters, and
overrides the hooks of the ROS 2 managed-node lifecycle it runs through (`check_parameters` and `load` on
configure, `start` on activate, `stop` on deactivate, `unload` on cleanup):

    class RegistrationNode(PerceptionNode):
        default_node_name = "registration_node"
        config_cls = OdometryConfig
        node_params = {"points_topic": ("lidar/points", "input PointCloud2")}

        def load(self):                  # load the model; raise to fail with a clear ERROR log
            self.odometry = LidarOdometry(self.cfg)

        def start(self):                 # what it creates here is destroyed again on deactivate
            self.subscribe(PointCloud2, self.params["points_topic"], self.on_points, self.sensor_qos())

    def main(args=None):
        return run_node(RegistrationNode, args)

`DropCounter`, `StampGuard` and `ApproxTimeSync` import nothing from ROS and are used by replay too.
Times are integer nanoseconds throughout.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vg_ros import ros_compat
from vg_ros.config import PipelineConfig, declare_ros_parameters, default_config_path, load_section, split_params
from vg_ros.convert import stamp_of
from vg_ros.geometry import invert_T, make_T, quat_to_R
from vg_ros.types import Rig

if ros_compat.HAVE_RCLPY:
    import rclpy
    from rclpy.lifecycle import LifecycleNode as _RosNode
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
else:  # replay and tests of the ROS-free helpers still import this module
    _RosNode = object  # type: ignore[assignment,misc]

DEVICES = ("cpu", "cuda", "auto")
RELIABILITIES = ("best_effort", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")


def camera_topic(topic: str, transport: str) -> str:
    """The topic a camera's images come on: `topic` for raw sensor_msgs/Image; for compressed
    (sensor_msgs/CompressedImage, jpeg or png) `topic/compressed`, as image_transport names it, unless
    `topic` already ends so. ValueError for another transport."""
    if transport not in IMAGE_TRANSPORTS:
        raise ValueError(f"image_transport = {transport!r}: must be one of {list(IMAGE_TRANSPORTS)}")
    if transport == "raw" or topic.rstrip("/").endswith("/compressed"):
        return topic
    return topic.rstrip("/") + "/compressed"


TOPIC_LIST_PARAMS = ("extra_image_topics",)
# topics that stay global whatever the namespace (the player, `vg-ros play --namespace`, leaves them alone)
GLOBAL_TOPICS = frozenset({"/clock", "/tf", "/tf_static", "/diagnostics", "/rosout", "/parameter_events"})


def normalize_namespace(namespace: str) -> str:
    """'robot1', '/robot1/' or '/fleet/robot1' -> '/robot1', '/fleet/robot1'; '' or '/' -> '/'. ValueError
    for a name ROS would refuse (tokens of letters, digits and '_', not starting with a digit)."""
    tokens = [t for t in str(namespace).strip().split("/") if t]
    for token in tokens:
        if not (token[0].isalpha() or token[0] == "_") or not all(c.isalnum() or c == "_" for c in token) \
                or not token.isascii():
            raise ValueError(f"namespace {namespace!r}: {token!r} is not a valid ROS name token "
                             "(letters, digits and '_', not starting with a digit)")
    return "/" + "/".join(tokens)


def global_topic(topic: str, namespace: str = "/") -> str:
    """The fully qualified name of a data topic as a node in `namespace` resolves it: an absolute name
    stays, a relative one (the defaults: `lidar/points`) goes under the namespace, so `namespace:=robot1`
    moves a node's inputs and outputs to /robot1/...; '' (an output turned off) stays ''. Replay and the
    recorder read bags with absolute names: they resolve the parameters with this, namespace "/"."""
    topic = str(topic)
    if not topic or topic.startswith("/"):
        return topic
    if topic.startswith("~"):
        raise ValueError(f"topic {topic!r}: a data topic cannot be private to a node (~); use a relative name")
    return namespace.rstrip("/") + "/" + topic


def global_topics(params: dict[str, Any], namespace: str = "/") -> dict[str, Any]:
    """`params` with every topic parameter (`*_topic`, `*_topic_pattern`, `extra_image_topics`) resolved by
    `global_topic`."""
    out = dict(params)
    for key, value in params.items():
        if key.endswith(("_topic", "_topic_pattern")) and isinstance(value, str):
            out[key] = global_topic(value, namespace)
        elif key in TOPIC_LIST_PARAMS and value:
            out[key] = [global_topic(str(t), namespace) for t in value]
    return out


def camera_info_sibling(image_topic: str) -> str:
    """The CameraInfo topic beside an image topic, as image_transport's camera subscriber pairs them:
    /cameras/X/image_raw (or its transport topic /cameras/X/image_raw/compressed) -> /cameras/X/camera_info."""
    topic = str(image_topic).rstrip("/")
    topic = topic[:-len("/compressed")] if topic.endswith("/compressed") else topic
    head, _, _ = topic.rpartition("/")
    return f"{head}/camera_info" if head or str(image_topic).startswith("/") else "camera_info"


class NodeSetupError(Exception):
    """A node cannot start (bad parameter, missing checkpoint): logged as one ERROR line, exit code 2."""


# ----------------------------------------------------------------------------------------- drops


class DropCounter:
    """Counts dropped inputs by reason and logs each reason at most once per `log_period_s`.

    `drops["stale_stamp"]` is the count for one reason; `processed` counts what went through. The
    logger is anything with `.warning(str)` (an rclpy logger or a `logging.Logger`).
    """

    def __init__(self, logger: Any = None, *, log_period_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if log_period_s < 0:
            raise ValueError(f"DropCounter.log_period_s = {log_period_s}: must be >= 0")
        self.logger = logger if logger is not None else logging.getLogger("vg_ros.drops")
        self.log_period_s = float(log_period_s)
        self.clock = clock
        self.drops: collections.Counter[str] = collections.Counter()
        self.processed: collections.Counter[str] = collections.Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def drop(self, reason: str, detail: str = "") -> None:
        """Count one dropped input under `reason`; log it unless this reason logged recently."""
        with self._lock:
            self.drops[reason] += 1
            now = self.clock()
            last = self._last_logged.get(reason)
            if last is not None and now - last < self.log_period_s:
                self._unlogged[reason] += 1
                return
            self._last_logged[reason] = now
            suppressed = self._unlogged.pop(reason, 0)
        more = f" (+{suppressed} more since last report)" if suppressed else ""
        self.logger.warning(f"dropped input [{reason}] {detail}{more}; total {reason}={self.drops[reason]}")

    def ok(self, what: str = "processed") -> None:
        with self._lock:
            self.processed[what] += 1

    @property
    def total(self) -> int:
        return sum(self.drops.values())

    def snapshot(self) -> dict:
        """{"drops": {reason: n}, "processed": {what: n}} — a copy, JSON-ready."""
        with self._lock:
            return {"drops": dict(self.drops), "processed": dict(self.processed)}

    def summary(self) -> str:
        snap = self.snapshot()
        done = " ".join(f"{k}={v}" for k, v in sorted(snap["processed"].items())) or "processed=0"
        dropped = " ".join(f"{k}={v}" for k, v in sorted(snap["drops"].items())) or "none"
        return f"{done}; drops: {dropped}"


# ----------------------------------------------------------------------------------------- stamps


class StampGuard:
    """Per-topic monotonic stamp check: every stamp is processed at most once, in order.

    `accept(topic, stamp_ns, now_ns)` is False (and the drop counted) when the stamp is zero, equal to
    (`duplicate_stamp`) or older than (`out_of_order`) the last accepted one on that topic, or older
    than `max_age_s` relative to `now_ns` (`stale_stamp`). `now_ns` comes from the node's clock, which
    follows /clock under `use_sim_time`; a zero `now_ns` (sim time not received yet) or `max_age_s`
    of 0 disables the age check.

    A source that starts again (a looped or restarted bag) sends stamps far behind the last accepted
    ones, and would otherwise be dropped as out of order for ever. With `jump_back_s` > 0, a stamp more
    than that far behind is dropped as `time_jump_back` and remembered; when the next stamp on that topic
    is also that far behind and after the remembered one (the new time base goes on in order), every
    topic is forgotten, that stamp is accepted and `on_jump(topic, seconds_back)` is called (outside the
    lock) so the owner can reset its state. A single straggler never resets: the next ordinary stamp
    clears what was remembered.
    """

    # An age this large is a clock mismatch (bag stamps against wall time), not a slow pipeline.
    CLOCK_MISMATCH_S = 1e5

    def __init__(self, drops: DropCounter, max_age_s: float = 0.0, *, jump_back_s: float = 0.0,
                 on_jump: Callable[[str, float], None] | None = None) -> None:
        if not max_age_s >= 0:
            raise ValueError(f"StampGuard.max_age_s = {max_age_s}: must be >= 0 (0 disables the age check)")
        if not jump_back_s >= 0:
            raise ValueError(f"StampGuard.jump_back_s = {jump_back_s}: must be >= 0 (0: never reset)")
        self.drops = drops
        self.max_age_ns = int(max_age_s * 1e9)
        self.jump_back_ns = int(jump_back_s * 1e9)
        self.on_jump = on_jump
        self.last_ns: dict[str, int] = {}
        self.jumps = 0
        self._jump_seen: dict[str, int] = {}   # topic -> the first stamp of a possible new time base
        self._lock = threading.Lock()
        self._mismatch_logged = False

    def accept(self, topic: str, stamp_ns: int, now_ns: int | None = None) -> bool:
        stamp_ns = int(stamp_ns)
        if stamp_ns <= 0:
            self.drops.drop("zero_stamp", f"on {topic}: header.stamp is zero or negative")
            return False
        jumped_s = None
        with self._lock:
            last = self.last_ns.get(topic)
            back_ns = 0 if last is None else last - stamp_ns
            stale = bool(self.max_age_ns and now_ns and now_ns - stamp_ns > self.max_age_ns)
            if self.jump_back_ns and back_ns > self.jump_back_ns and not stale:
                seen = self._jump_seen.get(topic)
                if seen is not None and seen < stamp_ns:
                    jumped_s = back_ns / 1e9
                    self.last_ns.clear()
                    self._jump_seen.clear()
                    self.last_ns[topic] = stamp_ns
                    self.jumps += 1
                else:
                    self._jump_seen[topic] = stamp_ns
                    verdict = ("time_jump_back", f"on {topic}: stamp {back_ns / 1e9:.3f} s before the last accepted "
                                                 f"one; the next such stamp resets (a looped or restarted source)")
            elif last is not None and stamp_ns <= last:
                reason = "duplicate_stamp" if stamp_ns == last else "out_of_order"
                verdict = (reason, f"on {topic}: stamp {stamp_ns} <= last accepted {last}")
            elif stale:
                age_s = (now_ns - stamp_ns) / 1e9
                hint = ""
                if age_s > self.CLOCK_MISMATCH_S and not self._mismatch_logged:
                    self._mismatch_logged = True
                    hint = " (clock mismatch? playing a bag needs use_sim_time:=true)"
                verdict = ("stale_stamp", f"on {topic}: {age_s:.3f} s old > max_stamp_age{hint}")
            else:
                self.last_ns[topic] = stamp_ns
                self._jump_seen.pop(topic, None)
                return True
        if jumped_s is not None:
            if self.on_jump is not None:
                self.on_jump(topic, jumped_s)
            return True
        self.drops.drop(*verdict)
        return False


class StampedBuffer:
    """The last `size` messages of one topic by stamp, for pairing with another topic's stamps: a node
    whose processing lags behind its inputs still finds the message nearest in time, not just the newest.

    `add(stamp_ns, msg)`; `nearest(stamp_ns, max_gap_s)` -> (msg or None, gap in s of the nearest or None
    when empty): the message with the closest stamp if within `max_gap_s`; `clear()`."""

    def __init__(self, size: int = 20) -> None:
        if size < 1:
            raise ValueError(f"StampedBuffer.size = {size}: must be >= 1")
        self._items: collections.deque[tuple[int, Any]] = collections.deque(maxlen=int(size))
        self._lock = threading.Lock()

    def add(self, stamp_ns: int, msg: Any) -> None:
        with self._lock:
            self._items.append((int(stamp_ns), msg))

    def nearest(self, stamp_ns: int, max_gap_s: float) -> tuple[Any, float | None]:
        with self._lock:
            if not self._items:
                return None, None
            best_ns, msg = min(self._items, key=lambda item: abs(item[0] - stamp_ns))
        gap_s = abs(best_ns - int(stamp_ns)) / 1e9
        return (msg if gap_s <= max_gap_s else None), gap_s

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class PoseBuffer:
    """The recent poses of an odometry source (T_odom_base by stamp), to move data from one stamp to another:
    `motion(from_ns, to_ns)` is T_base(to)<-base(from), the vehicle's own motion between the two stamps.

    A pose between two buffered ones is interpolated (`geometry.interpolate_T`); one after the newest is
    extrapolated at the last velocity for at most `max_extrapolation_s` (the odometry of a sweep often lands
    after the image it is paired with); before the oldest, or between poses more than `max_gap_s` apart
    (odometry lost), there is none (None)."""

    def __init__(self, size: int = 100, *, max_gap_s: float = 0.5, max_extrapolation_s: float = 0.2) -> None:
        if size < 2:
            raise ValueError(f"PoseBuffer.size = {size}: must be >= 2")
        self._poses: collections.deque[tuple[int, np.ndarray]] = collections.deque(maxlen=int(size))
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.max_extrapolation_ns = int(max_extrapolation_s * 1e9)
        self._lock = threading.Lock()

    def add(self, stamp_ns: int, T_odom_base: np.ndarray) -> None:
        T = np.asarray(T_odom_base, dtype=np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError(f"PoseBuffer.add: expected a finite (4, 4) pose, got shape {T.shape}")
        with self._lock:
            if self._poses and int(stamp_ns) <= self._poses[-1][0]:
                return   # not newer than the last: odometry is published in order; a repeat adds nothing
            self._poses.append((int(stamp_ns), T))

    def at(self, stamp_ns: int) -> np.ndarray | None:
        from vg_ros.geometry import interpolate_T

        with self._lock:
            poses = list(self._poses)
        if not poses or stamp_ns < poses[0][0]:
            return None
        stamps = [s for s, _ in poses]
        k = bisect.bisect_left(stamps, stamp_ns)
        if k < len(poses) and stamps[k] == stamp_ns:
            return poses[k][1]
        if k == len(poses):   # after the newest: the last velocity, briefly
            if len(poses) < 2 or stamp_ns - stamps[-1] > self.max_extrapolation_ns:
                return None
            k -= 1
        (s0, T0), (s1, T1) = poses[k - 1], poses[k]
        if s1 - s0 > self.max_gap_ns:
            return None
        return interpolate_T(T0, T1, (stamp_ns - s0) / (s1 - s0))

    def motion(self, from_ns: int, to_ns: int) -> np.ndarray | None:
        """T_base(to)<-base(from): a point fixed in the world, seen from the vehicle at `from_ns`, as seen
        from the vehicle at `to_ns`. None when either pose is unknown."""
        T_from, T_to = self.at(from_ns), self.at(to_ns)
        if T_from is None or T_to is None:
            return None
        return invert_T(T_to) @ T_from

    def clear(self) -> None:
        with self._lock:
            self._poses.clear()


# ------------------------------------------------------------------------------------------- sync


class ApproxTimeSync:
    """Approximate-time synchroniser for N topics, with the message_filters policy.

    `add(index, msg, stamp_ns)` queues a message of topic `index` (at most `queue_size` per topic,
    the oldest dropped first as `sync_queue_overflow`). The new message is the pivot: for every other
    topic the queued stamps within `slop_s` of it are tried nearest first, and the first combination
    whose spread (max - min stamp) is within `slop_s` is emitted as `callback(*msgs)` in topic order
    and removed from the queues. Queued messages older than an emitted set can never be matched any
    more and are dropped (`sync_stale`); a message older than the last emitted set on its own topic
    is dropped on arrival (`sync_late`).

    Degraded mode (`partial_timeout_s` set): when the newest stamp seen on any topic is more than
    `partial_timeout_s` past the oldest queued message, that message is emitted with whatever other
    topics have within `slop_s` and None for the rest, provided at least `min_topics` are present;
    otherwise it is dropped (`sync_timeout`); a late message of a topic missing from an emitted set is
    dropped (`sync_late`), so no stamp is emitted twice. Time is stamp time, so replay and sim time behave
    alike; `flush(now_ns)` applies the same rule against a clock (e.g. a node timer), but only once no
    input arrived for `partial_timeout_s` of wall time (a backlog behind the clock is not split).
    """

    def __init__(self, n_topics: int, callback: Callable[..., None], *, slop_s: float = 0.05,
                 queue_size: int = 10, partial_timeout_s: float | None = None, min_topics: int = 1,
                 drops: DropCounter | None = None, names: Sequence[str] | None = None) -> None:
        if n_topics < 1:
            raise ValueError(f"ApproxTimeSync.n_topics = {n_topics}: must be >= 1")
        if not slop_s > 0:
            raise ValueError(f"ApproxTimeSync.slop_s = {slop_s}: must be > 0")
        if queue_size < 1:
            raise ValueError(f"ApproxTimeSync.queue_size = {queue_size}: must be >= 1")
        if partial_timeout_s is not None and not partial_timeout_s > 0:
            raise ValueError(f"ApproxTimeSync.partial_timeout_s = {partial_timeout_s}: must be > 0 or None")
        if not 1 <= min_topics <= n_topics:
            raise ValueError(f"ApproxTimeSync.min_topics = {min_topics}: must be in [1, {n_topics}]")
        if names is not None and len(names) != n_topics:
            raise ValueError(f"ApproxTimeSync.names has {len(names)} entries for {n_topics} topics")
        self.n_topics = n_topics
        self.callback = callback
        self.slop_ns = int(round(slop_s * 1e9))
        self.queue_size = int(queue_size)
        self.partial_timeout_ns = None if partial_timeout_s is None else int(round(partial_timeout_s * 1e9))
        self.min_topics = int(min_topics)
        self.drops = drops if drops is not None else DropCounter()
        self.names = list(names) if names is not None else [f"topic{i}" for i in range(n_topics)]
        self.queues: list[dict[int, Any]] = [{} for _ in range(n_topics)]
        self.last_emitted_ns: list[int | None] = [None] * n_topics
        self.newest_ns: int | None = None
        self.emitted_full = 0
        self.emitted_partial = 0
        self._last_add = float("-inf")
        self._lock = threading.RLock()

    def add(self, index: int, msg: Any, stamp_ns: int | None = None) -> None:
        if not 0 <= index < self.n_topics:
            raise ValueError(f"ApproxTimeSync.add: topic index {index} not in [0, {self.n_topics})")
        stamp_ns = stamp_of(msg) if stamp_ns is None else int(stamp_ns)
        ready: list[tuple[Any, ...]] = []
        with self._lock:
            self._last_add = time.monotonic()
            name = self.names[index]
            queue = self.queues[index]
            last = self.last_emitted_ns[index]
            if last is not None and stamp_ns <= last:
                self.drops.drop("sync_late", f"on {name}: stamp {stamp_ns} <= last synchronised {last}")
                return
            if stamp_ns in queue:
                self.drops.drop("duplicate_stamp", f"on {name}: stamp {stamp_ns} already queued")
                return
            queue[stamp_ns] = msg
            while len(queue) > self.queue_size:
                oldest = min(queue)
                del queue[oldest]
                self.drops.drop("sync_queue_overflow", f"on {name}: no partner within slop for stamp {oldest}")
            self.newest_ns = stamp_ns if self.newest_ns is None else max(self.newest_ns, stamp_ns)
            if stamp_ns in queue:
                match = self._match(index, stamp_ns)
                if match is not None:
                    ready.append(self._take(match, full=True))
            ready.extend(self._expire(self.newest_ns))
        for msgs in ready:
            self.callback(*msgs)

    # A clock this far from the newest stamp is another time base (wall clock vs bag time): ignored.
    CLOCK_MISMATCH_NS = 60 * 1_000_000_000

    def flush(self, now_ns: int) -> None:
        """Apply the partial-set timeout against `now_ns` (no effect without `partial_timeout_s`).
        A `now_ns` more than a minute away from the newest stamp seen is another clock (a bag played
        without use_sim_time): then only stamp time counts, so nothing is flushed early."""
        with self._lock:
            # Only when input has stopped: while messages keep coming (e.g. a backlog worked off behind a
            # clock that is already ahead), stamp time in `add` decides, so sets are not split early.
            if self.partial_timeout_ns is None or \
                    time.monotonic() - self._last_add < self.partial_timeout_ns / 1e9:
                return
            now_ns = int(now_ns)
            if self.newest_ns is not None and abs(now_ns - self.newest_ns) > self.CLOCK_MISMATCH_NS:
                now_ns = self.newest_ns
            ready = self._expire(now_ns)
        for msgs in ready:
            self.callback(*msgs)

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self.queues)

    def reset(self) -> int:
        """Forget every queued message and every emitted stamp (the sources started again, e.g. a looped
        bag): the queued ones are dropped as `sync_reset`. Returns how many were queued."""
        with self._lock:
            queued = sum(len(q) for q in self.queues)
            for queue in self.queues:
                queue.clear()
            self.last_emitted_ns = [None] * self.n_topics
            self.newest_ns = None
        if queued:
            self.drops.drop("sync_reset", f"{queued} queued message(s) of the time base before the jump")
        return queued

    # -- policy

    def _candidates(self, j: int, pivot_ns: int) -> list[int]:
        near = [s for s in self.queues[j] if abs(s - pivot_ns) <= self.slop_ns]
        return sorted(near, key=lambda s: (abs(s - pivot_ns), s))

    def _match(self, index: int, pivot_ns: int) -> list[int | None] | None:
        options: list[list[int]] = []
        for j in range(self.n_topics):
            if j == index:
                options.append([pivot_ns])
                continue
            cands = self._candidates(j, pivot_ns)
            if not cands:
                return None
            options.append(cands)
        for combo in itertools.product(*options):
            if max(combo) - min(combo) <= self.slop_ns:
                return list(combo)
        return None

    def _take(self, stamps: list[int | None], *, full: bool) -> tuple[Any, ...]:
        msgs = tuple(None if s is None else self.queues[j].pop(s) for j, s in enumerate(stamps))
        present = [s for s in stamps if s is not None]
        set_min, set_max = min(present), max(present)
        for j, s in enumerate(stamps):
            # a topic missing from a partial set counts as emitted up to the set: its late message for
            # this stamp is dropped (`sync_late`) instead of making a second set with the same stamp
            stamp = s if s is not None else set_max
            last = self.last_emitted_ns[j]
            self.last_emitted_ns[j] = stamp if last is None else max(last, stamp)
        # Anything queued before this set would come out of order if emitted later: drop it now.
        for j, queue in enumerate(self.queues):
            for old in [s for s in queue if s < set_min]:
                del queue[old]
                self.drops.drop("sync_stale", f"on {self.names[j]}: stamp {old} older than a synchronised set")
        if full:
            self.emitted_full += 1
        else:
            self.emitted_partial += 1
        return msgs

    def _expire(self, now_ns: int) -> list[tuple[Any, ...]]:
        ready: list[tuple[Any, ...]] = []
        if self.partial_timeout_ns is None:
            return ready
        while True:
            oldest = min(((s, j) for j, q in enumerate(self.queues) for s in q), default=None)
            if oldest is None or now_ns - oldest[0] <= self.partial_timeout_ns:
                return ready
            pivot_ns, index = oldest
            stamps: list[int | None] = []
            for j in range(self.n_topics):
                if j == index:
                    stamps.append(pivot_ns)
                    continue
                cands = [s for s in self._candidates(j, pivot_ns) if abs(s - pivot_ns) <= self.slop_ns]
                stamps.append(cands[0] if cands else None)
            present = sum(s is not None for s in stamps)
            if present >= self.min_topics:
                missing = [self.names[j] for j, s in enumerate(stamps) if s is None]
                self.drops.drop("sync_partial", f"emitting a set without {missing} after the timeout")
                ready.append(self._take(stamps, full=present == self.n_topics))
            else:
                del self.queues[index][pivot_ns]
                self.drops.drop("sync_timeout", f"on {self.names[index]}: stamp {pivot_ns}, only {present} "
                                                f"of {self.min_topics} topics arrived")


# ------------------------------------------------------------------------------------- extrinsics


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
        self.base_frame = base_frame
        self.static: dict[str, tuple[str, np.ndarray]] = {}  # child -> (parent, T_parent_child)
        self.tf_buffer = None
        self._lock = threading.Lock()
        if node is not None and ros_compat.HAVE_TF2_ROS:
            tf2_ros = ros_compat.tf2_ros
            self.tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self.tf_buffer, node)
        elif node is not None and ros_compat.HAVE_TF2_MSGS:
            node.create_subscription(ros_compat.TFMessage, "/tf_static", lambda m: self.add_transforms(m.transforms),
                                     latched_qos())

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


# ------------------------------------------------------------------------------------------- QoS


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


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'auto' -> 'cpu' or 'cuda'. Asking for CUDA where there is none is a ValueError."""
    if device not in DEVICES:
        raise ValueError(f"device = {device!r}: must be one of {list(DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ValueError("device = 'cuda' but torch sees no CUDA device here; use device:=cpu or auto")
    return "cpu"


# ------------------------------------------------------------------------------------------- node

# Parameters every perception node has, beside its pipeline's config and its own topics.
COMMON_PARAMS: dict[str, tuple[Any, str]] = {
    "device": ("auto", "compute device: cpu | cuda | auto (cuda when available)"),
    "rig": ("default", "rig name (config/rig_<name>.yaml) or path: extrinsics when TF has none"),
    "weights": ("default", "checkpoint: 'default' (shipped in vg_ros/weights) or a .safetensors path"),
    "base_frame": ("base_link", "the vehicle frame outputs are expressed in"),
    "qos_depth": (5, "queue depth of sensor subscriptions"),
    "sensor_reliability": ("best_effort", "sensor subscriptions: best_effort (accepts any publisher) | reliable"),
    "max_stamp_age": (0.0, "drop inputs older than this many seconds by the node clock (sim time aware); 0 = off"),
    "time_jump_reset": (1.0, "stamps jumping back more than this many seconds, twice in order on a topic (a looped "
                             "or restarted bag), reset the node's state instead of being dropped for ever; 0 = off"),
    "diagnostics_period": (5.0, "seconds between drop/throughput reports on ~/diagnostics; 0 = off"),
    "autostart": (True, "configure and activate at start; false: stay unconfigured until a lifecycle manager "
                        "(or `ros2 lifecycle set`) drives the node through configure / activate"),
    "input_silence_warn": (10.0, "a sensor input with a matched publisher but no message for this many seconds "
                                 "(wall time) makes the diagnostics a WARN naming it; 0 = off"),
}


class TransitionFailed(RuntimeError):
    """A lifecycle transition failed; the message is the ERROR line the node already logged."""


class PerceptionNode(_RosNode):  # type: ignore[misc,valid-type]
    """Base of the perception nodes: parameters, QoS, drops, stamp checks, sync, extrinsics.

    Subclasses set `default_node_name`, `config_cls` (a PipelineConfig dataclass or None) and
    `node_params` ({name: (default, description)}), then override the hooks of the managed-node lifecycle
    (an rclpy LifecycleNode: `~/change_state`, `~/get_state`, ... as `ros2 lifecycle` and Nav2's
    lifecycle_manager use them): `check_parameters` (read parameters, no heavy work; also run on every
    `ros2 param set`) and `load` (the model) on configure, `start` (publishers, subscriptions, timers)
    on activate, `stop` on deactivate (what `start` created is destroyed by the base), `unload` on cleanup.
    With `autostart` (default) `run_node` configures and activates the node itself.

    Parameter values, lowest to highest priority: the dataclass / `node_params` defaults, this node's
    section of `config/perception.yaml` (`config_path`, else $VG_ROS_CONFIG), then ROS overrides (`--params-file`, `-p`,
    launch). After construction: `self.cfg` (the validated pipeline config), `self.params` (node and
    common parameters by name), `self.drops`, `self.stamps` (a StampGuard).
    """

    default_node_name: str = "perception_node"
    config_cls: type[PipelineConfig] | None = None
    node_params: dict[str, tuple[Any, str]] = {}
    # What `ros2 param set` may change while the node runs (pipeline fields and node parameters the node
    # reads per message); every other parameter is read at start, and a change is refused with a reason
    # instead of being accepted and silently ignored.
    live_params: frozenset[str] = frozenset()
    COMMON_LIVE = frozenset({"max_stamp_age", "time_jump_reset", "input_silence_warn"})
    # read while the node is built: not even an unconfigured node takes a new value
    CONSTRUCTION_PARAMS = frozenset({"diagnostics_period", "autostart"})

    def __init__(self, node_name: str | None = None, *, config_path: str | Path | None = None,
                 **node_kwargs: Any) -> None:
        ros_compat.require_rclpy(type(self).__name__)
        name = node_name or self.default_node_name
        super().__init__(name, **node_kwargs)
        self.drops = DropCounter(self.get_logger())
        # `vg-ros up --config X` hands its file to every node through VG_ROS_CONFIG.
        config_path = config_path or os.environ.get("VG_ROS_CONFIG") or None
        self.config_path = Path(config_path) if config_path else default_config_path()
        file_values: dict = {}
        if self.config_path.exists():
            file_values = load_section(self.config_path, name)
        elif config_path is not None:
            raise ValueError(f"config file {self.config_path} does not exist")
        self.cfg: PipelineConfig | None = None
        if self.config_cls is not None:
            cfg_values, rest = split_params(file_values, self.config_cls)
            self.cfg = declare_ros_parameters(self, self.config_cls.from_dict(cfg_values))
        else:
            rest = dict(file_values)
        specs = {**COMMON_PARAMS, **self.node_params}
        unknown = sorted(set(rest) - set(specs) - {"use_sim_time"})
        if unknown:
            self.get_logger().warning(f"{self.config_path}: ignoring unknown parameter(s) {unknown} for {name}")
        self.params: dict[str, Any] = {}
        from rcl_interfaces.msg import ParameterDescriptor
        cfg_fields = set(config_fields(self.config_cls)) if self.config_cls is not None else set()
        for key, (default, description) in specs.items():
            if key in cfg_fields:  # e.g. `device`, `weights` in the pipeline's own config: declared once, there
                self.params[key] = getattr(self.cfg, key)
                continue
            value = _as_declared(default, rest.get(key, default))
            if isinstance(value, list) and not value:
                # an empty list has no ROS type of its own (rclpy would make it a byte array, refusing the
                # strings a launch file or `-p` gives): a string array, unset until given
                from rcl_interfaces.msg import ParameterType
                from rclpy.parameter import Parameter
                declared = self.declare_parameter(key, Parameter.Type.STRING_ARRAY, ParameterDescriptor(
                    description=description, type=ParameterType.PARAMETER_STRING_ARRAY))
                self.params[key] = list(declared.value or [])
                continue
            self.params[key] = self.declare_parameter(key, value, ParameterDescriptor(description=description)).value
        self._validate_common()
        self.stamps = StampGuard(self.drops, float(self.params["max_stamp_age"]),
                                 jump_back_s=float(self.params["time_jump_reset"]), on_jump=self._on_time_jump)
        self._syncs: list[ApproxTimeSync] = []
        # messages that reached each subscription, before any check: an input that stops arriving (a
        # publisher gone, a DDS transport that stopped delivering) shows here, not as a drop
        self.received: collections.Counter[str] = collections.Counter()
        # messages a lone publisher sent that never reached the callback, from the gaps in its publication
        # sequence numbers: the subscription's queue overflowed while the node was busy (keep-last depth), or
        # the transport lost them; a count, not a drop of ours, and no fault when the node is slower than a
        # sensor (it then works on the newest message)
        self.missed: collections.Counter[str] = collections.Counter()
        self._received_lock = threading.Lock()
        # watched inputs: topic -> (subscriptions, wall time of the last message or of the subscribing)
        self._watched: dict[str, tuple[list, float]] = {}
        self.device = "cpu"
        self._extrinsics: TfOrRig | None = None
        self._diag_pub = self._status_pub = None
        self._diag_before: tuple[float, dict] = (time.monotonic(), self.drops.snapshot())
        period = float(self.params["diagnostics_period"])
        if period > 0:
            from diagnostic_msgs.msg import DiagnosticArray
            from std_msgs.msg import String
            self._diag_pub = self.create_publisher(String, "~/diagnostics", output_qos(1))
            # the standard aggregate topic: rqt_robot_monitor and diagnostic_aggregator read it
            self._status_pub = self.create_publisher(DiagnosticArray, "/diagnostics", output_qos(10))
            # wall time, not the node clock: under use_sim_time a stopped /clock must not silence the report
            from rclpy.clock import Clock, ClockType
            self._diag_timer = self.create_timer(period, self.publish_diagnostics,
                                                 clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.activated = False
        self.loaded = False
        self.transition_error: str | None = None   # the last failed transition's one-line reason
        self._transition_exc: Exception | None = None
        self._started: dict[str, list] = {}          # what `start` created: destroyed on deactivate
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _validate_common(self) -> None:
        p = self.params
        if p["device"] not in DEVICES:
            raise ValueError(f"{self.get_name()}.device = {p['device']!r}: must be one of {list(DEVICES)}")
        if p["sensor_reliability"] not in RELIABILITIES:
            raise ValueError(f"{self.get_name()}.sensor_reliability = {p['sensor_reliability']!r}: "
                             f"must be one of {list(RELIABILITIES)}")
        if not isinstance(p["qos_depth"], int) or not 1 <= p["qos_depth"] <= 1000:
            raise ValueError(f"{self.get_name()}.qos_depth = {p['qos_depth']!r}: must be an int in [1, 1000]")
        for key in ("max_stamp_age", "time_jump_reset", "diagnostics_period", "input_silence_warn"):
            if not isinstance(p[key], (int, float)) or not p[key] >= 0:
                raise ValueError(f"{self.get_name()}.{key} = {p[key]!r}: must be a number >= 0")

    # -- lifecycle: a ROS 2 managed node (unconfigured -configure-> inactive -activate-> active, and back
    # with deactivate / cleanup; shutdown from any of them to finalized)

    def lifecycle_state(self) -> str:
        """'unconfigured', 'inactive', 'active' or 'finalized' (or a transition's label while one runs)."""
        return str(self._state_machine.current_state[1])

    def configure(self) -> None:
        """The configure transition (as `ros2 lifecycle set <node> configure`); TransitionFailed if it fails."""
        self._trigger(self.trigger_configure)

    def activate(self) -> None:
        self._trigger(self.trigger_activate)

    def deactivate(self) -> None:
        self._trigger(self.trigger_deactivate)

    def cleanup(self) -> None:
        self._trigger(self.trigger_cleanup)

    def _trigger(self, transition: Callable[[], Any]) -> None:
        """Run a transition here; raise what failed it (already logged as `transition_error`)."""
        if transition() != TransitionCallbackReturn.SUCCESS:
            exc, self._transition_exc = self._transition_exc, None
            raise exc if exc is not None else TransitionFailed(
                self.transition_error or f"{self.get_name()}: transition refused in state {self.lifecycle_state()}")

    def finish(self) -> None:
        """End of the process: shut down from whatever state the node is in (deactivating and unloading
        on the way) and log the drop and receive summary."""
        if self.lifecycle_state() != "finalized":
            self.trigger_shutdown()
        with self._received_lock:
            received = " ".join(f"{t}={n}" for t, n in sorted(self.received.items())) or "nothing"
            missed = " ".join(f"{t}={n}" for t, n in sorted(self.missed.items()))
        self.get_logger().info(f"stopping: {self.drops.summary()}; received: {received}"
                               + (f"; missed (never reached the callback): {missed}" if missed else ""))

    def _transition(self, name: str, work: Callable[[], None]) -> "TransitionCallbackReturn":
        """Run one transition's work: SUCCESS, or FAILURE (the state machine goes back to where it was)
        with one ERROR line naming the reason, kept in `transition_error`."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a failed transition is reported, the node stays up
            self.transition_error = f"{self.get_name()}: {name} failed: {type(exc).__name__}: {exc}"
            self._transition_exc = exc
            self.get_logger().error(self.transition_error)
            return TransitionCallbackReturn.FAILURE
        self.transition_error = self._transition_exc = None
        return TransitionCallbackReturn.SUCCESS

    # rclpy's transition callbacks (LifecycleNode): each runs the hooks below through `_transition`

    def on_configure(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            self.device = resolve_device(self.params["device"])
            self.check_parameters()
            self.load()
            self.loaded = True
        return self._transition("configure", work)

    def on_activate(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            before = self._entities()
            had_extrinsics = self._extrinsics is not None
            try:
                self.start()
            except Exception:
                self._destroy_new(before, had_extrinsics)
                raise
            self._started = {"before": before, "had_extrinsics": had_extrinsics}
            self.activated = True
            self.get_logger().info(f"active on {self.device}; optional ROS pieces missing here: "
                                   f"{', '.join(ros_compat.missing()) or 'none'}")
        return self._transition("activate", work)

    def on_deactivate(self, state: Any) -> "TransitionCallbackReturn":
        return self._transition("deactivate", self._deactivate)

    def on_cleanup(self, state: Any) -> "TransitionCallbackReturn":
        return self._transition("cleanup", self._unload)

    def on_shutdown(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            if self.activated:
                self._deactivate()
            if self.loaded:
                self._unload()
        return self._transition("shutdown", work)

    def on_error(self, state: Any) -> "TransitionCallbackReturn":
        """Only reached if a transition raised past `_transition` (it does not): free everything, unconfigured."""
        return self.on_shutdown(state)

    def _deactivate(self) -> None:
        self.activated = False
        self._destroy_new(self._started.get("before", self._entities()), self._started.get("had_extrinsics", True))
        self._started = {}
        self.stop()
        self.get_logger().info(f"deactivated: {self.drops.summary()}")

    def _unload(self) -> None:
        self.loaded = False
        self.unload()

    def _entities(self) -> dict[str, list]:
        return {"subscriptions": list(self.subscriptions), "publishers": list(self.publishers),
                "timers": list(self.timers), "syncs": list(self._syncs), "watched": list(self._watched)}

    def _destroy_new(self, before: dict[str, list], had_extrinsics: bool) -> None:
        """Destroy the subscriptions, publishers and timers created since `before` (what `start` made),
        so a node activated again creates them once, and an inactive node neither takes nor sends anything."""
        def new(kind: str) -> list:
            old = {id(x) for x in before[kind]}
            return [x for x in getattr(self, kind) if id(x) not in old]
        for sub in new("subscriptions"):
            self.destroy_subscription(sub)
        for pub in new("publishers"):
            self.destroy_publisher(pub)
        for timer in new("timers"):
            self.destroy_timer(timer)
        self._syncs[:] = [s for s in self._syncs if any(s is o for o in before["syncs"])]
        with self._received_lock:
            for topic in set(self._watched) - set(before["watched"]):
                del self._watched[topic]
        if not had_extrinsics:   # its TF subscriptions went with the rest: built again on first use
            self._extrinsics = None

    # hooks for the nodes

    def check_parameters(self) -> None:
        """Read parameters into attributes; raise ValueError for a bad one. No model loading here (it also
        validates every `ros2 param set`)."""

    def load(self) -> None:
        """Load the model (configure). Raise to fail the transition with a clear ERROR line."""

    def start(self) -> None:
        """Create publishers, subscriptions and timers (activate). Raise to fail with a clear ERROR line."""

    def stop(self) -> None:
        """Deactivate: the subscriptions, publishers and timers `start` created are already destroyed."""

    def unload(self) -> None:
        """Free the model (cleanup, shutdown)."""

    def on_parameters_changed(self, names: set[str]) -> None:
        """`self.cfg` / `self.params` now hold new values for `names` (all in `live_params`): hand them to
        the pipeline where it keeps its own copy."""

    def _on_set_parameters(self, parameters: list) -> Any:
        """Validate and apply `ros2 param set` changes through the checks they met at start (the pipeline
        config's own, `_validate_common`, the node's `check_parameters`). An unconfigured node takes any
        parameter but those read while it is built (the next configure reads them); a configured one only
        its `live_params`, the rest refused with a reason (the value stays as it was). Declarations and
        use_sim_time pass through."""
        from rcl_interfaces.msg import SetParametersResult

        changes = {p.name: p.value for p in parameters if p.name != "use_sim_time" and self.has_parameter(p.name)}
        if not changes:
            return SetParametersResult(successful=True)
        live = self.live_params | self.COMMON_LIVE
        unconfigured = self.lifecycle_state() == "unconfigured"
        fixed = sorted(set(changes) & self.CONSTRUCTION_PARAMS) if unconfigured else sorted(set(changes) - live)
        if fixed:
            when = "the node is built; restart it" if unconfigured else \
                "the node is configured; clean it up (`ros2 lifecycle set <node> cleanup`) or restart it"
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(fixed)}: read when {when} to change {'it' if len(fixed) == 1 else 'them'} "
                f"(changeable while configured: {', '.join(sorted(live))})"))
        fields = set(config_fields(self.config_cls)) if self.config_cls is not None else set()
        specs = {**COMMON_PARAMS, **self.node_params}
        node_values = {k: _as_declared(specs[k][0], v) for k, v in changes.items() if k not in fields}
        # the node's values go through the checks they met at start (`_validate_common`, `check_parameters`)
        started_with = self.params
        self.params = {**started_with, **node_values}
        try:
            cfg = self.cfg.replace(**{k: v for k, v in changes.items() if k in fields}) if fields & set(changes) \
                else self.cfg
            self._validate_common()
            self.check_parameters()
        except (TypeError, ValueError) as exc:
            self.params = started_with
            return SetParametersResult(successful=False, reason=str(exc))
        self.cfg = cfg
        self.stamps.max_age_ns = int(float(self.params["max_stamp_age"]) * 1e9)
        self.stamps.jump_back_ns = int(float(self.params["time_jump_reset"]) * 1e9)
        if self.loaded:   # an unconfigured node reads them when it is configured
            self.on_parameters_changed(set(changes))
        self.get_logger().info("parameters changed: " + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items())))
        return SetParametersResult(successful=True)

    def on_time_jump(self) -> None:
        """The inputs' time went back (a looped or restarted bag): forget state built on the old time
        (the stamp checks and the synchronisers are already reset)."""

    def _on_time_jump(self, topic: str, seconds_back: float) -> None:
        for sync in self._syncs:
            sync.reset()
        self.on_time_jump()
        self.get_logger().warning(f"{topic}: stamps went back {seconds_back:.3f} s (a looped or restarted source): "
                                  f"state reset ({self.stamps.jumps} reset(s) so far)")

    # -- QoS and subscriptions

    def sensor_qos(self) -> "QoSProfile":
        return sensor_qos(int(self.params["qos_depth"]), str(self.params["sensor_reliability"]))

    def command_qos(self) -> "QoSProfile":
        return command_qos()

    def latched_qos(self) -> "QoSProfile":
        return latched_qos()

    def output_qos(self) -> "QoSProfile":
        return output_qos()

    def subscribe(self, msg_type: type, topic: str, callback: Callable[..., None], qos: "QoSProfile",
                  *, guard_stamps: bool = True, callback_group: Any = None, with_info: bool = False,
                  incompatible_note: str | None = None, watch: bool = True):
        """A subscription that logs what it expects, reports QoS mismatches, and (by default) passes
        only messages whose header stamp the StampGuard accepts. Exceptions in `callback` are caught,
        logged once per reason and counted as `callback_error`: the node keeps running. `callback_group`
        (None: the node's default, mutually exclusive with every other default callback) lets a cheap
        control input run beside a long sensor callback on the multi-threaded executor. `with_info`: the
        callback also gets rclpy's message info (source timestamp, publication sequence number).
        `incompatible_note`: an incompatible publisher is expected (another subscription serves it), so
        it is logged at INFO with this note instead of as an ERROR. Every message that arrives is counted
        (`received`); `watch` (sensor streams; not a command sent once) also reports the topic in the
        diagnostics when a publisher is matched but nothing came for `input_silence_warn` seconds."""
        from rclpy.event_handler import SubscriptionEventCallbacks

        type_name = f"{msg_type.__module__.split('.')[0]}/{msg_type.__name__}"
        # counted, watched and logged under the name it resolves to (namespace and remapping applied)
        topic = self.resolve_topic_name(topic)
        self.get_logger().info(f"subscribing {topic} [{type_name}] QoS {describe_qos(qos)}")

        def on_incompatible(event: Any) -> None:
            if incompatible_note is not None:
                self.get_logger().info(f"{topic}: a publisher's QoS does not match {describe_qos(qos)}; "
                                       f"{incompatible_note}")
                return
            self.get_logger().error(
                f"{topic}: a publisher's QoS is incompatible with this subscription ({describe_qos(qos)}); "
                f"policy {getattr(event, 'last_policy_kind', '?')}: nothing will be received from it")

        sequence = {"last": None}   # the lone publisher's last publication sequence number seen here
        created: list = []

        def guarded(msg: Any, info: Any) -> None:
            with self._received_lock:
                self.received[topic] += 1
                if topic in self._watched:
                    self._watched[topic] = (self._watched[topic][0], time.monotonic())
                self._count_missed(topic, info, sequence, created)
            if guard_stamps and hasattr(msg, "header"):
                if not self.stamps.accept(topic, stamp_of(msg), self.now_ns()):
                    return
            self.call_safely(callback, *((msg, info) if with_info else (msg,)), where=topic)

        # rclpy passes the message info (sequence numbers) to a callback that cannot take the message alone
        sub = self.create_subscription(msg_type, topic, lambda msg, info: guarded(msg, info), qos,
                                       callback_group=callback_group,
                                       event_callbacks=SubscriptionEventCallbacks(incompatible_qos=on_incompatible))
        created.append(sub)
        if watch:
            with self._received_lock:
                subs, since = self._watched.get(topic, ([], time.monotonic()))
                self._watched[topic] = (subs + [sub], since)
        return sub

    def _count_missed(self, topic: str, info: Any, sequence: dict, created: list) -> None:
        """Add the gap between this message's publication sequence number and the last one seen on the
        subscription to `missed[topic]`, while exactly one publisher is matched (rclpy's message info carries
        no publisher id, so two publishers' numbers would interleave). The first message after a change of
        publishers sets the baseline; a number that goes back (a publisher started again) too."""
        number = info.get("publication_sequence_number") if isinstance(info, dict) else None
        if number is None or not created or created[0].get_publisher_count() != 1:
            sequence["last"] = None
            return
        last = sequence["last"]
        if last is not None and number > last + 1:
            self.missed[topic] += number - last - 1
        sequence["last"] = number

    def silent_inputs(self, now: float | None = None) -> dict[str, dict]:
        """{topic: {"seconds", "publishers"}} of the watched inputs with at least one matched publisher and
        no message for `input_silence_warn` s of wall time (since the subscription when none came yet): a
        sensor that stopped, or a transport that stopped delivering (docs/bringup.md)."""
        limit = float(self.params["input_silence_warn"])
        if limit <= 0:
            return {}
        now = time.monotonic() if now is None else now
        with self._received_lock:
            watched = dict(self._watched)
        silent = {}
        for topic, (subs, last) in watched.items():
            publishers = max(sub.get_publisher_count() for sub in subs)
            if publishers and now - last >= limit:
                silent[topic] = {"seconds": round(now - last, 1), "publishers": publishers}
        return silent

    def synchronized(self, specs: Sequence[tuple[type, str]], callback: Callable[..., None], *,
                     slop_s: float = 0.05, queue_size: int = 10, qos: "QoSProfile | None" = None,
                     partial_timeout_s: float | None = None, min_topics: int | None = None):
        """Subscribe `specs` [(msg_type, topic)] and call `callback(*msgs)` with approximately
        synchronised sets. message_filters is used when it imports and no partial sets are asked for;
        otherwise ApproxTimeSync (same policy, plus partial sets with None after `partial_timeout_s`)."""
        qos = qos or self.sensor_qos()
        topics = [self.resolve_topic_name(topic) for _, topic in specs]   # as the drops and logs name them
        if ros_compat.HAVE_MESSAGE_FILTERS and partial_timeout_s is None:
            mf = ros_compat.message_filters
            subs = [mf.Subscriber(self, msg_type, topic, qos_profile=qos) for msg_type, topic in specs]
            sync = mf.ApproximateTimeSynchronizer(subs, queue_size, slop_s)
            sync.registerCallback(lambda *msgs: self.call_safely(callback, *msgs, where="synchronised set"))
            self.get_logger().info(f"synchronising {topics} with message_filters (slop {slop_s} s)")
            return sync
        sync = ApproxTimeSync(len(specs), lambda *msgs: self.call_safely(callback, *msgs, where="synchronised set"),
                              slop_s=slop_s, queue_size=queue_size, partial_timeout_s=partial_timeout_s,
                              min_topics=min_topics or len(specs), drops=self.drops, names=topics)
        self._syncs.append(sync)
        for index, (msg_type, topic) in enumerate(specs):
            self.subscribe(msg_type, topic, lambda msg, i=index: sync.add(i, msg), qos)
        if partial_timeout_s is not None:
            self.create_timer(max(partial_timeout_s / 2, 0.05), lambda: sync.flush(self.now_ns()))
        self.get_logger().info(f"synchronising {topics} (slop {slop_s} s, queue {queue_size}"
                               + (f", partial sets after {partial_timeout_s} s)" if partial_timeout_s else ")"))
        return sync

    def call_safely(self, callback: Callable[..., None], *args: Any, where: str = "") -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the callback boundary: log, count, keep running
            reason = f"{type(exc).__name__}"
            stamp = ""
            first = next((a for a in args if a is not None and hasattr(a, "header")), None)
            if first is not None:
                stamp = f" stamp {stamp_of(first)}"
            self.drops.drop(f"callback_error:{reason}", f"in {where}{stamp}: {exc}")

    # -- time, extrinsics, diagnostics

    def now_ns(self) -> int:
        """The node clock in ns (sim time under use_sim_time; 0 before the first /clock)."""
        return int(self.get_clock().now().nanoseconds)

    @property
    def extrinsics(self) -> TfOrRig:
        """TfOrRig for this node's `rig` and `base_frame` parameters (created on first use)."""
        if self._extrinsics is None:
            self._extrinsics = TfOrRig(str(self.params["rig"]), str(self.params["base_frame"]), node=self)
        return self._extrinsics

    def diagnostics(self) -> dict:
        with self._received_lock:
            received, missed = dict(self.received), dict(self.missed)
        return {"node": self.get_name(), "state": self.lifecycle_state(), "stamp_ns": self.now_ns(),
                "time_jump_resets": self.stamps.jumps, "received": received, "missed": missed,
                "silent": self.silent_inputs(), **self.drops.snapshot()}

    def publish_diagnostics(self) -> None:
        """~/diagnostics (the JSON counts) and one DiagnosticStatus on /diagnostics for the last period."""
        if self._diag_pub is None:
            return
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        from std_msgs.msg import String
        info = self.diagnostics()
        self._diag_pub.publish(String(data=json.dumps(info, sort_keys=True)))
        now = time.monotonic()
        then, before = self._diag_before
        self._diag_before = (now, {"drops": info["drops"], "processed": info["processed"]})
        level, message, values = diagnostic_status(info, before, now - then)
        if info["state"] != "active":   # a managed node held inactive or unconfigured: waiting, not failing
            level, message = DIAG_OK, f"{info['state']} (lifecycle): not processing inputs"
        status = DiagnosticStatus(level=bytes([level]), name=f"vg_ros: {self.get_fully_qualified_name()}",
                                  message=message, hardware_id=self.device,
                                  values=[KeyValue(key=k, value=v) for k, v in
                                          values + [("time_jump_resets", str(info["time_jump_resets"])),
                                                    ("lifecycle_state", info["state"])]])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(array)
        if info["drops"] != before["drops"]:   # a period with drops; an idle node stays quiet
            self.get_logger().info(f"diagnostics: {message}; since start: {self.drops.summary()}")


# ROS diagnostic levels (diagnostic_msgs/DiagnosticStatus)
DIAG_OK, DIAG_WARN, DIAG_ERROR = 0, 1, 2
# drops that mean waiting for something, not failing: never an ERROR on their own
WAITING_REASONS = frozenset({"no_command"})


def diagnostic_status(now: dict, before: dict | None, period_s: float) -> tuple[int, str, list[tuple[str, str]]]:
    """(level, message, [(key, value)]) of one node over a period, from two `DropCounter.snapshot()`s
    `period_s` apart (`before` None: since the start). OK: inputs processed, none dropped. WARN: some
    dropped, a waiting reason (`WAITING_REASONS`), no input at all, or a silent input (`now["silent"]`:
    matched publisher, no message; named in the message). ERROR: a callback raised, or inputs came and every
    one was dropped. The values are the totals since the start and the period's rate."""
    before = before or {"drops": {}, "processed": {}}
    done = sum(now["processed"].values()) - sum(before["processed"].values())
    dropped = {k: v - before["drops"].get(k, 0) for k, v in now["drops"].items() if v > before["drops"].get(k, 0)}
    period = f"{period_s:.1f} s"
    rate = done / period_s if period_s > 0 else 0.0
    why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    if not done and not dropped:
        level, message = DIAG_WARN, f"no input in {period}"
    elif not dropped:
        level, message = DIAG_OK, f"{done} processed in {period} ({rate:.1f} Hz)"
    else:
        failing = any(k.startswith("callback_error") for k in dropped) or \
            (not done and not set(dropped) <= WAITING_REASONS)
        level = DIAG_ERROR if failing else DIAG_WARN
        message = f"{done} processed, {sum(dropped.values())} dropped in {period}: {why}"
    silent = now.get("silent") or {}
    if silent:
        level = max(level, DIAG_WARN)
        message += "; silent: " + ", ".join(f"{t} (nothing for {v['seconds']:.0f} s, {v['publishers']} publisher"
                                           f"{'s' if v['publishers'] != 1 else ''})" for t, v in sorted(silent.items()))
    values = [("rate_hz", f"{rate:.2f}"), ("period_s", f"{period_s:.2f}")]
    values += [(f"processed/{k}", str(v)) for k, v in sorted(now["processed"].items())]
    values += [(f"dropped/{k}", str(v)) for k, v in sorted(now["drops"].items())]
    values += [(f"received/{k}", str(v)) for k, v in sorted(now.get("received", {}).items())]
    values += [(f"missed/{k}", str(v)) for k, v in sorted(now.get("missed", {}).items())]
    return level, message, values


def _as_declared(default: Any, value: Any) -> Any:
    """`value` as the type of its parameter's `default`: an int where a float is declared (YAML's `1`, `ros2
    param set ... 1`) becomes a float, so the parameter keeps its declared type."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_fields(cfg_cls: type[PipelineConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_cls)]


# -------------------------------------------------------------------------------------------- main


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
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
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
        finally:
            node.finish()
            if not executor.shutdown(timeout_sec=1.0):
                # a callback is still running: say where, so a hang is never silent (the supervisor's
                # SIGKILL follows if it never returns)
                import faulthandler
                node.get_logger().error("callbacks still running at shutdown; every thread's stack follows")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        return 0
    finally:
        if node is not None:
            node.destroy_node()
        rclpy_mod.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def node_main(node_cls: type[PerceptionNode]) -> Callable[[list[str] | None], int]:
    """A console-script `main(args=None)` for `node_cls` that exits with run_node's code."""
    def main(args: list[str] | None = None) -> int:
        code = run_node(node_cls, args)
        if args is None:
            sys.exit(code)
        return code
    return main
