"""vg_ros.nodes.inputs (nothing from ROS): counted drops, stamp checks (stale, duplicate, out of order, a
source that starts again), the nearest-stamp and pose buffers, and the approximate-time policy, by hand-built
cases and a hypothesis property."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vg_ros.nodes.inputs import ApproxTimeSync, DropCounter, StampGuard

MS = 1_000_000


class ListLogger:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, text):
        self.lines.append(text)

    info = error = warning


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


def test_stamp_guard_drops_a_stamp_far_ahead_but_follows_a_real_gap():
    """One message stamped far in the future must not become the topic's last stamp (every good one after it
    would be dropped, and then the state reset as if the source had restarted); a source that really goes on
    after a gap loses only its first message, without a reset; a slow sensor's period is never a jump."""
    jumps = []
    drops = DropCounter(ListLogger())
    guard = StampGuard(drops, jump_back_s=1.0, on_jump=lambda *a: jumps.append(a))
    for t in (10_000, 10_100, 10_200):
        assert guard.accept("/lidar", t * MS)
    year = 365 * 86_400_000
    assert not guard.accept("/lidar", (10_300 + year) * MS)   # a clock glitch: dropped
    assert guard.accept("/lidar", 10_300 * MS)                 # the next good scan goes through
    assert guard.accept("/lidar", 10_400 * MS) and guard.last_ns["/lidar"] == 10_400 * MS
    assert not guard.accept("/lidar", 13_400 * MS)             # a 3 s dropout: its first scan dropped ...
    assert guard.accept("/lidar", 13_500 * MS)                 # ... the source goes on: accepted, no reset
    assert guard.accept("/lidar", 13_600 * MS)
    assert jumps == [] and guard.jumps == 0
    assert dict(drops.drops) == {"time_jump_forward": 2}
    # a camera at 0.5 Hz: 2 s apart is its period, not a jump (after its first interval)
    slow = StampGuard(DropCounter(ListLogger()), jump_back_s=1.0)
    assert all(slow.accept("/cam", t * MS) for t in range(1_000, 21_000, 2_000))
    # off with time_jump_reset 0, as the back-jump check
    off = StampGuard(DropCounter(ListLogger()))
    assert off.accept("/a", 1_000 * MS) and off.accept("/a", 1_100 * MS) and off.accept("/a", (1_200 + year) * MS)


def test_a_new_topics_far_future_stamp_does_not_split_every_later_set():
    """A camera that has not started sends one image stamped a day ahead (found by fuzzing occupancy_node): its
    first stamp is judged against the other topics' stamps and dropped, so the synchroniser's partial-set clock
    (the newest stamp of any topic) is not pushed a day ahead, which made every later set go out at once with
    whichever camera came first and dropped the others as `sync_late` for as long as that camera stayed silent.
    When the camera really starts (in order, from its first stamp) it is accepted."""
    drops = DropCounter(ListLogger())
    sets = []
    sync = ApproxTimeSync(3, lambda *m: sets.append(tuple(x is not None for x in m)), slop_s=0.05,
                          partial_timeout_s=0.5, drops=drops, names=["/a", "/b", "/c"])
    guard = StampGuard(drops, jump_back_s=1.0, on_jump=lambda *a: sync.reset())

    def deliver(i, t_ms):
        if guard.accept(["/a", "/b", "/c"][i], t_ms * MS):
            sync.add(i, object(), t_ms * MS)

    for t in range(10_000, 11_000, 100):            # /a and /b at 10 Hz; /c not started
        deliver(0, t), deliver(1, t)
    day = 86_400_000
    deliver(2, 10_950 + day)                         # /c's first message: a day ahead
    assert "/c" not in guard.last_ns and drops.drops["time_jump_forward"] == 1
    sets.clear()
    for t in range(11_000, 13_000, 100):
        deliver(0, t), deliver(1, t)
    assert sets and all(s == (True, True, False) for s in sets), sets
    assert drops.drops["sync_late"] == 0
    deliver(2, 13_000), deliver(0, 13_000), deliver(1, 13_000)     # /c starts: accepted, full sets
    assert guard.last_ns["/c"] == 13_000 * MS and sets[-1] == (True, True, True)
    # a pause after a topic's first message is no jump: its second stamp has nothing to be judged against
    assert guard.accept("/d", 13_000 * MS) and guard.accept("/d", 43_000 * MS)
    # a first stamp a few seconds ahead is another input's lag (odometry behind a slow re-localisation): kept
    assert guard.accept("/f", 48_000 * MS)
    # a source that really starts far ahead (the others stale) goes on: only its first message is lost
    assert not guard.accept("/e", 60_000 * MS) and guard.accept("/e", 60_100 * MS)
    assert guard.jumps == 0


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


def test_sync_flush_ignores_a_clock_of_another_time_base_and_a_running_backlog(monkeypatch):
    import types

    import vg_ros.nodes.inputs as inputs
    # the sync's wall clock, stepped by hand: "input arrived just now" must not depend on this machine's load
    # (a real 0.1 s pause between the add and the first flush, on a busy CI machine, flushed early)
    wall = [1000.0]
    monkeypatch.setattr(inputs, "time", types.SimpleNamespace(monotonic=lambda: wall[0]))
    sync, out, drops = make_sync(2, slop_s=0.02, partial_timeout_s=0.1)
    sync.add(0, "a0", 100 * MS)
    wall[0] += 0.05
    sync.flush(400 * MS)            # input arrived just now: a backlog may still be coming, no flush
    assert out == []
    wall[0] += 0.15
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
