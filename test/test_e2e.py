"""End to end: a short simulated drive played over real DDS into the live nodes (one process each, as
`vg-ros up` and the demo run them), their outputs recorded and checked — types, frames, stamps, sane
values, scores in the documented ranges, and the same scores as `vg-ros replay` on the same bag. Midway
the grounding node is killed: the supervisor reports it, nobody restarts it, the other nodes keep
publishing."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from sim_bags import sim_bag
from vg_ros.bag import BagReader
from vg_ros.convert import image_to_array, occupancy_grid_to_array, odometry_to_matrix, pointcloud2_to_structured
from vg_ros.convert import stamp_of
from vg_ros.replay import PIPELINES, SECTIONS, output_topics, replay, score_bags
from vg_ros.up import NODES

SEED, SECONDS, RATE = 3, 2.0, 0.3
DOMAIN = 66
KILL_AT = 0.6  # fraction of the played messages after which grounding_node is killed (after its first answer)
KILL_LATEST = 0.75  # from here on the player waits for that answer
T = output_topics()  # the nodes' topics as configured

# Documented ranges for this drive (docs/bringup.md): wide enough for CPU noise and the shipped tiny models.
RANGES = {
    ("occupancy", "iou"): (60.0, 100.0),
    ("occupancy", "miou"): (15.0, 100.0),
    ("odometry", "ate_m"): (0.0, 0.5),
    ("odometry", "drift_pct"): (0.0, 15.0),
}


def runnable_nodes() -> list[str]:
    return [c for c in PIPELINES if importlib.util.find_spec(NODES[c][1]) is not None]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from vg_ros.demo import LiveRun
    caps = runnable_nodes()
    if not caps:
        pytest.skip("no node module in this checkout (vg_ros/nodes/*_node.py)")
    previous_domain = os.environ.get("ROS_DOMAIN_ID")
    os.environ["ROS_DOMAIN_ID"] = str(DOMAIN)  # the node processes inherit it
    bag = sim_bag(SEED, SECONDS)
    out = tmp_path_factory.mktemp("e2e")
    with BagReader(bag) as reader:
        total = sum(c for t, (_, c) in reader.topics.items() if not t.startswith("/gt/") and t != "/tf_static")
    killed: dict = {}

    def during_play(sup, published):
        if "grounding_node" not in sup.procs or killed or published < KILL_AT * total:
            return
        box = T["grounding"]["box"]
        # Not before the node's first answer. Until KILL_LATEST the player is not held for it: a held player
        # sends no images, and after a late /command the answer needs new ones (a 6 s late command once
        # made that a 60 s stall). From KILL_LATEST on the player waits (at most 60 s): on a loaded 2-core
        # machine the node's first frame can take that long, and its queued images are lossless.
        if not run.recorder.counts[box]:
            if published < KILL_LATEST * total:
                return
            deadline = time.monotonic() + 60.0
            while not run.recorder.counts[box] and time.monotonic() < deadline:
                time.sleep(0.1)
        # every thread's stack into its log (SIGUSR1; the node runs on): shows where it is if it is stuck
        sup.procs["grounding_node"].send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        killed["wall_ns"] = time.monotonic_ns()
        sup.procs["grounding_node"].send_signal(signal.SIGKILL)

    run = LiveRun(bag, out, rate=RATE, device="cpu", nodes=caps, config=None, startup_timeout_s=150.0,
                  log_dir=out / "logs", during_play=during_play)
    try:
        info = run.run()
    finally:
        if previous_domain is None:
            os.environ.pop("ROS_DOMAIN_ID", None)
        else:
            os.environ["ROS_DOMAIN_ID"] = previous_domain
    yield {"bag": bag, "out": out, "info": info, "run": run, "killed": killed, "caps": caps,
            "lines": {n: "\n".join(run.supervisor.lines[n]) for n in run.supervisor.specs}}


def messages(bag, topic):
    with BagReader(bag) as reader:
        if topic not in reader.topics:
            return []
        return [m for _, _, _, m in reader.messages([topic])]


def input_stamps(bag, topic):
    return {stamp_of(m) for m in messages(bag, topic)}


def test_every_node_started_and_published(live):
    info = live["info"]
    for cap in live["caps"]:
        name = NODES[cap][0]
        assert "active on" in live["lines"][name], f"{name} never became active:\n{live['lines'][name][-2000:]}"
    expected = {cap: T[SECTIONS[cap]]["primary"] for cap in PIPELINES}
    for cap in live["caps"]:
        assert info["received"].get(expected[cap], 0) > 0, f"{cap}: nothing on {expected[cap]}; {info}"


def test_outputs_are_sane_and_carry_input_stamps(live):
    bag, out = live["bag"], live["out"] / "live.mcap"
    lidar = input_stamps(bag, T["odometry"]["inputs"][0])
    images = input_stamps(bag, T["grounding"]["image"])
    if "occupancy" in live["caps"]:
        grids = messages(out, T["occupancy"]["grid"])
        assert grids and {stamp_of(m) for m in grids} <= images
        for msg in grids:  # (whether obstacles show up in the band is the model's business, not checked here)
            grid, origin, res = occupancy_grid_to_array(msg)
            assert msg.header.frame_id == "base_link" and grid.shape == (200, 200) and res == pytest.approx(0.4)
            assert set(np.unique(grid).tolist()) <= {-1, 0, 100} and (grid == 0).any() and (grid == -1).any()
            assert origin[:3, 3] == pytest.approx([-40.0, -40.0, 0.0])
        for msg in messages(out, T["occupancy"]["voxels"]):
            cloud = pointcloud2_to_structured(msg)
            assert msg.header.frame_id == "base_link" and cloud.size > 100
            assert cloud["label"].max() < 17 and 0 <= cloud["confidence"].min() <= cloud["confidence"].max() <= 1
            assert np.all(np.abs(cloud["x"]) < 40) and np.all(np.abs(cloud["y"]) < 40)
    if "registration" in live["caps"]:
        odo = messages(out, T["odometry"]["odometry"])
        assert odo and {stamp_of(m) for m in odo} <= lidar
        stamps = [stamp_of(m) for m in odo]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # never twice, in order
        for msg in odo:
            pose, cov = odometry_to_matrix(msg)
            assert msg.header.frame_id == "odom" and msg.child_frame_id == "base_link"
            assert np.all(np.isfinite(pose)) and np.allclose(cov, cov.T) and np.linalg.eigvalsh(cov).min() >= -1e-9
        assert {stamp_of(m) for m in messages(out, T["odometry"]["pose"])} <= lidar
    if "grounding" in live["caps"]:
        boxes, masks = messages(out, T["grounding"]["box"]), messages(out, T["grounding"]["mask"])
        assert boxes and {stamp_of(m) for m in boxes} <= images and {stamp_of(m) for m in masks} <= images
        for msg in boxes:
            assert msg.header.frame_id == "cam_front_optical" and len(msg.polygon.points) in (0, 4)
            assert all(0.0 <= p.z <= 1.0 for p in msg.polygon.points)
        for msg in masks:
            mask = image_to_array(msg)
            assert msg.encoding == "mono8" and mask.shape == (270, 480) and set(np.unique(mask)) <= {0, 255}


def test_scores_in_documented_ranges(live):
    scores = score_bags(live["bag"], live["out"] / "live.mcap")
    for (section, key), (low, high) in RANGES.items():
        cap = next(c for c, s in SECTIONS.items() if s == section)
        if cap in live["caps"]:
            assert scores[section].get(key) is not None, (section, scores[section])
            assert low <= scores[section][key] <= high, (section, key, scores[section])


def test_live_outputs_equal_offline_pipelines_frame_by_frame(live, tmp_path):
    """What the nodes published over DDS is what the pipelines compute offline on the same input:
    odometry and grounding through `replay`, occupancy directly on two frames (it is the slow one)."""
    bag, out = live["bag"], live["out"] / "live.mcap"
    cheap = tuple(c for c in ("registration", "grounding") if c in live["caps"])
    if cheap:
        offline = tmp_path / "replay.mcap"
        replay(bag, offline, pipelines=cheap, score=False)
    if "registration" in live["caps"]:
        topic = T["odometry"]["odometry"]
        a = {stamp_of(m): odometry_to_matrix(m)[0] for m in messages(out, topic)}
        b = {stamp_of(m): odometry_to_matrix(m)[0] for m in messages(offline, topic)}
        common = sorted(set(a) & set(b))
        assert len(common) >= len(a) - 1 >= 3
        # live may have lost a scan replay had, which changes the motion prior: compare up to the first gap
        gap = next((k for k, s in enumerate(sorted(b)) if s not in a), len(b))
        same = sorted(b)[:gap]
        assert same and all(np.abs(a[s][:3, 3] - b[s][:3, 3]).max() < 0.02 for s in same)
    if "grounding" in live["caps"]:
        topic = T["grounding"]["box"]
        a = {stamp_of(m): [(p.x, p.y) for p in m.polygon.points] for m in messages(out, topic)}
        b = {stamp_of(m): [(p.x, p.y) for p in m.polygon.points] for m in messages(offline, topic)}
        common = sorted(set(a) & set(b))
        assert common, "no grounding frame in both"
        for s in common:
            assert len(a[s]) == len(b[s]) and np.allclose(a[s], b[s], atol=1.0), (s, a[s], b[s])
    if "occupancy" in live["caps"]:
        check_occupancy_frames(bag, out, count=2)


def check_occupancy_frames(bag, out, count):
    from vg_ros.convert import camera_info_to_model, image_to_rgb
    from vg_ros.geometry import voxel_centers
    from vg_ros.occupancy.pipeline import OccupancyPipeline
    from vg_ros.replay import node_settings
    from vg_ros.types import CameraFrame, FREE_CLASS, Rig
    cfg, params = node_settings("occupancy")
    rig = Rig.load(str(params["rig"]))
    live_msgs = messages(out, T["occupancy"]["voxels"])
    assert live_msgs
    picks = {stamp_of(live_msgs[k]): live_msgs[k] for k in np.linspace(0, len(live_msgs) - 1, count).astype(int)}
    pipeline = OccupancyPipeline(cfg, weights=params["weights"], device="cpu")
    names = list(params["cameras"])
    images = {n: {} for n in names}
    infos = {}
    with BagReader(bag) as reader:
        for topic, _, _, msg in reader.messages(T["occupancy"]["inputs"]
                                                + [f"/cameras/{n}/camera_info" for n in names]):
            name = topic.split("/")[2]
            if topic.endswith("camera_info"):
                infos.setdefault(name, msg)
            elif stamp_of(msg) in picks:
                images[name][stamp_of(msg)] = msg
    for stamp, msg in picks.items():
        frames = [CameraFrame(camera_info_to_model(infos[n], name=n, T_base_cam=rig.camera(n).T_base_cam),
                              image_to_rgb(images[n][stamp]), stamp) for n in names]
        result = pipeline.infer(frames, stamp)
        occupied = (result.semantics != FREE_CLASS) & result.observed
        want = {tuple(np.round(c, 2)) for c in voxel_centers(result.grid)[occupied]}
        cloud = pointcloud2_to_structured(msg)
        got = {tuple(np.round(c, 2)) for c in np.stack([cloud["x"], cloud["y"], cloud["z"]], 1)}
        assert len(want & got) / max(len(want | got), 1) > 0.99, f"set {stamp}: live voxels differ from the pipeline's"


def lost_in_transport(live, cap: str) -> dict[str, tuple[int, int]]:
    """{topic: (arrived, sent)} for what went missing between the processes around `cap`'s node, by the
    node's own counts at exit (its "stopping: <processed>; drops: ...; received: topic=n ..." line): inputs
    it received fewer of than the player sent, and its primary output when the recorder got fewer than it
    published. Empty when nothing was lost, or when the node never said (one that hung is not excused)."""
    name = NODES[cap][0]
    said = re.findall(r"stopping: (.*?); drops: .*; received: ([^;]*)", live["lines"][name])
    if not said:
        return {}
    processed, received_text = said[-1]
    received = dict((t, int(n)) for t, n in (item.rsplit("=", 1) for item in received_text.split()))
    sent = live["info"]["published"]
    lost = {t: (received.get(t, 0), sent[t]) for t in T[SECTIONS[cap]]["inputs"]
            if t in sent and received.get(t, 0) < sent[t]}
    published = sum(int(item.rsplit("=", 1)[1]) for item in processed.split() if "=" in item)
    primary = T[SECTIONS[cap]]["primary"]
    recorded = live["info"]["received"].get(primary, 0)
    if recorded < published:
        lost[primary] = (recorded, published)
    return lost


def test_killed_node_is_reported_and_the_others_keep_publishing(live):
    if "grounding" not in live["caps"]:
        pytest.skip("grounding_node not part of this run")
    assert live["killed"], "grounding_node was never killed: no answer from it during the play"
    run, kill_ns = live["run"], live["killed"]["wall_ns"]
    info = live["info"]
    assert info["died"].get("grounding_node") == -signal.SIGKILL, f"died: {info['died']}"
    # before the kill it was asked for its stacks (SIGUSR1) and wrote them without stopping
    assert "most recent call first" in live["lines"]["grounding_node"] and "run_node" in live["lines"]["grounding_node"]
    primary = {cap: T[SECTIONS[cap]]["primary"] for cap in PIPELINES}
    after = {cap: [w for (t, _), w in run.recorder.receive_wall_ns.items() if t == topic and w > kill_ns + 1e9]
             for cap, topic in primary.items()}
    assert not after["grounding"], "grounding_node published after it was killed (restarted?)"
    # every stream's count before the kill and its last message, so that a failure says whether one node
    # stalled or all of them (the player)
    stopped, stopped_caps, summary = [], [], []
    for cap in ("registration", "occupancy"):
        if cap in live["caps"]:
            before = sum(1 for (t, _), w in run.recorder.receive_wall_ns.items() if t == primary[cap] and w <= kill_ns)
            last = max((w for (t, _), w in run.recorder.receive_wall_ns.items() if t == primary[cap]), default=0)
            summary.append(f"{primary[cap]}: {before} messages before the kill, the last {(last - kill_ns) / 1e9:+.2f} s "
                           "after it")
            if not after[cap]:
                stopped.append(primary[cap])
                stopped_caps.append(cap)
    # whether the player still sent the stopped nodes' inputs after the kill, and what the nodes last said
    # they received (their diagnostics): a stalled player, a stalled DDS delivery and a stuck node differ here
    inputs = {t for cap in ("registration", "occupancy") if cap in live["caps"] for t in T[SECTIONS[cap]]["inputs"]}
    sent = {t: sum(1 for (topic, _), w in run.player.publish_wall_ns.items() if topic == t and w > kill_ns)
            for t in sorted(inputs)}
    lost = {cap: losses for cap in stopped_caps if (losses := lost_in_transport(live, cap))}
    if stopped and len(lost) == len(stopped_caps):
        # Each stopped node's own counts at exit show messages lost between the processes (inputs it got
        # fewer of than the player sent, or outputs the recorder got fewer of than it published), not by the
        # node. Fast DDS's shared-memory transport (which the rmw uses under LOCALHOST discovery, with its
        # 512 KB segment) can stop delivering large messages to the live readers once one reader process
        # is SIGKILLed (eProsima/Fast-DDS#5469; here 2 runs in 25: LiDAR and images stop, camera_info goes
        # on). Known upstream, not ours to fix here; a node that stops while its inputs arrive still fails.
        pytest.xfail(f"Fast DDS shared memory stopped delivering after the SIGKILL (eProsima/Fast-DDS#5469): "
                     f"received / sent {lost}")
    assert not stopped, (f"{', '.join(stopped)} stopped when grounding_node was killed; " + "; ".join(summary)
                         + f"; the player sent after the kill {sent} (playback {info.get('play_wall_s', 0):.1f} s); "
                         f"diagnostics {json.dumps(info.get('diagnostics', {}))[:1500]}")


def test_lost_in_transport_reads_the_nodes_exit_counts():
    """What the kill test excuses as lost between the processes, from a node's exit line as PerceptionNode
    writes it: inputs received < sent, or the primary output recorded < published; nothing without the
    line."""
    from vg_ros.nodes.inputs import DropCounter
    lidar, odom = T["odometry"]["inputs"][0], T["odometry"]["primary"]
    drops = DropCounter()
    for _ in range(16):
        drops.ok("registered")
    drops.drop("stale_stamp")
    line = (f"[INFO] [1.0] [registration_node]: stopping: {drops.summary()}; received: {lidar}=16; "
            f"missed (never reached the callback): {lidar}=4")
    live = {"lines": {"registration_node": line}, "info": {"published": {lidar: 20}, "received": {odom: 12}}}
    assert lost_in_transport(live, "registration") == {lidar: (16, 20), odom: (12, 16)}
    live["info"] = {"published": {lidar: 16}, "received": {odom: 16}}
    assert lost_in_transport(live, "registration") == {}
    live["lines"]["registration_node"] = "[INFO] [1.0] [registration_node]: active on cpu"
    assert lost_in_transport(live, "registration") == {}


def test_demo_tables_and_argument_errors(tmp_path):
    from vg_ros.cli import UserError
    from vg_ros.demo import comparison_table, main
    live = {"occupancy": {"miou": 20.0, "iou": 70.0, "obstacle_iou": 25.0},
            "odometry": {"ate_m": 0.02, "drift_pct": 0.1}, "grounding": {"prec_at_05": 0.5, "miou": 0.4}}
    offline = {"occupancy": {"miou": 20.5, "iou": 70.0, "obstacle_iou": 24.0},
               "odometry": {"ate_m": 0.02, "drift_pct": 0.1}, "grounding": {"prec_at_05": None, "miou": 0.4}}
    table = comparison_table(live, offline)
    assert "occupancy mIoU %          20.000      20.500  -0.500" in table
    assert "occupancy obstacle IoU %  25.000      24.000  +1.000" in table
    assert "grounding Prec@0.5 %      50.000      -       -" in table
    from vg_ros.demo import drops_table
    info = {"received": {"/registration/odometry": 58}, "diagnostics": {
        "registration_node": {"drops": {}, "missed": {"/lidar/points": 2}},
        "grounding_node": {"drops": {"no_command": 1}, "missed": {"/cameras/CAM_FRONT/image_raw": 0}}}}
    drops = drops_table(info, {"odometry": 60}, {"odometry": {"primary": "/registration/odometry"}})
    assert "odometry     58 / 60   (/registration/odometry)" in drops
    assert "registration_node: drops none; missed (never reached the callback" in drops
    assert "/lidar/points=2" in drops and "grounding_node: drops no_command=1\n" in drops + "\n"
    with pytest.raises(UserError, match="--seconds"):
        main(["--seconds", "0"])
    with pytest.raises(UserError, match="--rate"):
        main(["--rate", "0"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not writable"):
        main(["--out", str(blocker / "sub")])
    with pytest.raises(UserError, match="does not exist"):
        main(["--bag", str(tmp_path / "none.mcap"), "--out", str(tmp_path / "o")])
