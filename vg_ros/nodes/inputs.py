"""What the nodes do with their inputs before a pipeline sees them, with nothing from ROS (replay and the
tools use them too): `DropCounter` (counted, logged drops), `StampGuard` (stale, duplicate and out-of-order
stamps; a source that starts again), `StampedBuffer` / `PoseBuffer` (the nearest message, the motion between
two stamps) and `ApproxTimeSync` (approximate-time sets of several topics, partial sets after a timeout).
Times are integer nanoseconds throughout.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from vg_ros.convert import stamp_of
from vg_ros.geometry import invert_T

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

    A stamp far ahead (more than `jump_back_s`, and more than ten of the topic's last interval between
    accepted stamps, so a slow sensor's normal period never counts) is dropped as `time_jump_forward`: one
    message stamped a year ahead must not become the topic's last stamp, which would then drop every good
    one. When the next stamp is also that far ahead and after it (the source really went on after a gap),
    it is accepted without a reset: a gap costs its first message. A topic's first stamp (a camera that
    starts late, or any topic after a reset) is judged the same way against the newest stamp accepted on the
    other topics (more than `jump_back_s`, and at least 10 s, ahead of all of them):
    its one far-future stamp would otherwise reach the node's synchroniser, whose partial-set clock is the
    newest stamp of any topic, and split or drop every later set for as long as that topic stays silent.
    Off with `jump_back_s` 0.
    """

    # An age this large is a clock mismatch (bag stamps against wall time), not a slow pipeline.
    CLOCK_MISMATCH_S = 1e5
    # A topic's first stamp this far ahead of every other topic's newest is another clock's, not a late start.
    FIRST_AHEAD_NS = 10_000_000_000

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
        self._ahead_seen: dict[str, int] = {}  # topic -> a stamp far ahead of the last accepted one
        self._period_ns: dict[str, int] = {}   # topic -> the last interval between two accepted stamps
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
            period = self._period_ns.get(topic)
            if period:
                ahead_of, ahead_limit = last, max(self.jump_back_ns, 10 * period)
            elif last is None and self.last_ns:
                # its first stamp: judged against the newest stamp accepted on the other topics (one clock), with
                # room for another input's lag (odometry behind a slow re-localisation, a topic silent a while)
                ahead_of, ahead_limit = max(self.last_ns.values()), max(self.jump_back_ns, self.FIRST_AHEAD_NS)
            else:   # its second stamp: no interval yet, and a pause after a first message is no jump
                ahead_of = ahead_limit = None
            ahead_ns = 0 if ahead_of is None else stamp_ns - ahead_of
            stale = bool(self.max_age_ns and now_ns and now_ns - stamp_ns > self.max_age_ns)
            if self.jump_back_ns and back_ns > self.jump_back_ns and not stale:
                seen = self._jump_seen.get(topic)
                if seen is not None and seen < stamp_ns:
                    jumped_s = back_ns / 1e9
                    for memory in (self.last_ns, self._jump_seen, self._ahead_seen, self._period_ns):
                        memory.clear()
                    self.last_ns[topic] = stamp_ns
                    self.jumps += 1
                else:
                    self._jump_seen[topic] = stamp_ns
                    verdict = ("time_jump_back", f"on {topic}: stamp {back_ns / 1e9:.3f} s before the last accepted "
                                                 f"one; the next such stamp resets (a looped or restarted source)")
            elif self.jump_back_ns and ahead_limit and ahead_ns > ahead_limit:
                seen = self._ahead_seen.get(topic)
                if seen is not None and seen < stamp_ns:   # the source goes on after a gap: its new interval
                    self.last_ns[topic] = stamp_ns
                    self._period_ns[topic] = stamp_ns - seen
                    self._ahead_seen.pop(topic, None)
                    return True
                self._ahead_seen[topic] = stamp_ns
                whose = "the last accepted one" if ahead_of == last else "the newest accepted on any topic"
                verdict = ("time_jump_forward", f"on {topic}: stamp {ahead_ns / 1e9:.3f} s after {whose}; "
                                                f"accepted only if the next stamp goes on from it (a gap)")
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
                if last is not None:
                    self._period_ns[topic] = stamp_ns - last
                self.last_ns[topic] = stamp_ns
                self._jump_seen.pop(topic, None)
                self._ahead_seen.pop(topic, None)
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


def usable_frames(names: Sequence[str], messages: Sequence[Any], make_frame: Callable[[int, Any], Any],
                  drops: DropCounter, topics: Sequence[str],
                  reason: Callable[[str, Exception], str] = lambda name, exc: f"bad_camera:{name}"
                  ) -> tuple[int | None, list]:
    """One synchronised camera set (a message or None per camera, in `names` order) -> (its stamp: the
    earliest image's, the frames `make_frame(index, message)` could build). A camera missing from the set is
    counted (`camera_missing`: its sector is unknown); one whose image or calibration `make_frame` refuses
    (ValueError, KeyError) is left out of the set, not the set, counted as `reason(name, exc)`; none left is
    `no_usable_camera` and no frames. (None, []) for an empty set. occupancy_node and `vg-ros replay` both
    take their camera sets through it."""
    present = [(i, m) for i, m in enumerate(messages) if m is not None]
    if not present:
        return None, []
    stamp = min(stamp_of(m) for _, m in present)   # the set's earliest image, whatever the camera order
    if missing := [names[i] for i, m in enumerate(messages) if m is None]:
        drops.drop("camera_missing", f"set {stamp}: no image from {missing}; their sector is unknown")
    frames = []
    for i, m in present:
        try:
            frames.append(make_frame(i, m))
        except (ValueError, KeyError) as exc:
            drops.drop(reason(names[i], exc), f"{topics[i]} stamp {stamp_of(m)}: {exc}")
    if not frames:
        drops.drop("no_usable_camera", f"set {stamp}: every camera was rejected")
    return stamp, frames


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
