"""vg_ros.replay + vg_ros.report: scoring of an output bag against the simulator's ground truth (exact on
perfect and on known-degraded outputs), the pipelines over a real simulated bag, the JSON contract, the
report folder, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sim_bags import sim_bag
from vg_ros.bag import BagReader, BagWriter, typestore
from vg_ros.convert import (
    array_to_image, make_header, matrix_to_odometry, msg_to_expression, msg_to_voxel_grid, pose_stamped_to_matrix,
    stamp_of, xyz_fields_to_pointcloud2,
)
from vg_ros.geometry import make_T, voxel_centers
from vg_ros.replay import format_summary, main, output_topics, public, replay, score_bags
from vg_ros.types import FREE_CLASS

SEED, SECONDS = 5, 2.0
FRAMES = 20
TOPICS = output_topics()  # the nodes' output topics, as configured
TOPICS_CONFIG = Path(__file__).resolve().parent.parent / "config" / "perception.yaml"


@pytest.fixture(scope="module")
def bag():
    return sim_bag(SEED, SECONDS)


def write_outputs(bag, out, *, pose_error=None, box_shift=0.0, drop_every=0, lose_class=None, frame_id=None,
                  other_views=False, empty_masks=False):
    """An output bag built from the ground truth: perfect unless told how to degrade it (`frame_id`: the
    grounding outputs' camera frame instead of the command's; `other_views`: where another camera sees the
    target (/gt/grounding_views), the target as that camera sees it, in its frame; `empty_masks`: boxes as
    found, masks empty, as the box head's fallback publishes)."""
    store = typestore()
    views = {}
    if other_views:
        with BagReader(bag) as src:
            views = {stamp_of(m): m for _, _, _, m in src.messages(["/gt/grounding_views"])}
    Point32, Polygon = store.types["geometry_msgs/msg/Point32"], store.types["geometry_msgs/msg/Polygon"]
    PolygonStamped = store.types["geometry_msgs/msg/PolygonStamped"]
    with BagReader(bag) as src, BagWriter(out, overwrite=True) as dst:
        for topic, _, _, msg in src.messages(["/gt/occupancy", "/gt/ego_pose", "/gt/grounding"]):
            stamp = stamp_of(msg)
            if topic == "/gt/occupancy":
                sem, grid, _, _ = msg_to_voxel_grid(msg)
                if lose_class is not None:
                    sem = np.where(sem == lose_class, FREE_CLASS, sem).astype(np.uint8)
                occ = sem != FREE_CLASS
                dst.write(TOPICS["occupancy"]["voxels"], stamp, xyz_fields_to_pointcloud2(
                    voxel_centers(grid)[occ], {"label": sem[occ], "confidence": np.ones(occ.sum(), np.float32)},
                    stamp_ns=stamp, frame_id="base_link", flavor="rosbags"))
            elif topic == "/gt/ego_pose":
                T = pose_stamped_to_matrix(msg)
                if pose_error is not None:
                    T = T @ make_T(None, pose_error(stamp))
                dst.write(TOPICS["odometry"]["odometry"], stamp, matrix_to_odometry(T, np.eye(6), stamp_ns=stamp, flavor="rosbags"))
            else:
                msg = views.get(stamp, msg)
                expr = msg_to_expression(msg)
                k = (stamp - src.start_ns) // 100_000_000
                if (drop_every and k % drop_every == 0) or not expr.mask.any():
                    points, mask = [], np.zeros_like(expr.mask)
                else:
                    x0, y0, x1, y1 = expr.box
                    w = (x1 - x0) * box_shift
                    points = [Point32(x0 + w, y0, 0.9), Point32(x1 + w, y0, 0.9), Point32(x1 + w, y1, 0.9),
                              Point32(x0 + w, y1, 0.9)]
                    mask = np.zeros_like(expr.mask) if empty_masks else expr.mask
                dst.write(TOPICS["grounding"]["box"], stamp, PolygonStamped(header=make_header(
                    stamp, frame_id or msg.header.frame_id, "rosbags"),
                                                                  polygon=Polygon(points=points)))
                dst.write(TOPICS["grounding"]["mask"], stamp, array_to_image(mask.astype(np.uint8) * 255, "mono8",
                                                                   stamp_ns=stamp, flavor="rosbags"))
    return out


def test_scores_of_perfect_outputs(bag, tmp_path):
    scores = score_bags(bag, write_outputs(bag, tmp_path / "perfect.mcap"), grounding_image_topic=
                        "/cameras/CAM_FRONT/image_raw")
    occ, odo, gro = scores["occupancy"], scores["odometry"], scores["grounding"]
    assert occ["frames"] == occ["gt_frames"] == FRAMES and occ["coverage"] == 1.0
    assert occ["miou"] == occ["iou"] == occ["obstacle_iou"] == pytest.approx(100.0)
    assert odo["frames"] == FRAMES and odo["ate_m"] < 1e-6 and odo["drift_pct"] < 1e-6 and odo["path_m"] > 1.0
    assert gro["frames"] == gro["gt_frames"] == FRAMES - gro["gt_target_not_visible"] and gro["camera"] == "CAM_FRONT"
    assert gro["gt_frames"] >= 5 and gro["found_when_not_visible"] == 0
    assert gro["prec_at_05"] == 1.0 and gro["miou"] == pytest.approx(1.0) and gro["found_rate"] == 1.0
    # this drive's command ("the gray lorry to the right of the cyclist") stops describing its target when the
    # cyclist moves: those frames keep their label and are also scored apart (/gt/grounding_undescribed)
    still = gro["words_still_describe"]
    assert still["of"] == gro["frames"] and 0 < still["frames"] < still["of"] and still["prec_at_05"] == 1.0


def test_scores_of_degraded_outputs_are_the_expected_numbers(bag, tmp_path):
    with BagReader(bag) as src:
        sem, _, mask, _ = msg_to_voxel_grid(next(m for _, _, _, m in src.messages(["/gt/occupancy"])))
    classes = [c for c in np.unique(sem[mask]) if c != FREE_CLASS]
    lost = int(classes[0])
    out = write_outputs(bag, tmp_path / "bad.mcap", pose_error=lambda s: [0.3, 0.0, 0.0], box_shift=0.5,
                        drop_every=2, lose_class=lost)
    scores = score_bags(bag, out, grounding_image_topic="/cameras/CAM_FRONT/image_raw")
    occ, odo, gro = scores["occupancy"], scores["odometry"], scores["grounding"]
    # one class predicted free everywhere: its IoU is 0, every other class stays 100
    assert occ["per_class"][__import__("vg_ros.types").types.OCC_CLASSES[lost]] == 0.0
    present = [v for v in occ["per_class"].values() if v is not None]
    assert occ["miou"] == pytest.approx(100.0 * (len(present) - 1) / len(present))
    assert occ["iou"] < 100.0
    # a constant 0.3 m offset along the body x axis: after alignment at most 0.3 m, drift near 0.3 m / path
    assert 0.0 < odo["ate_m"] <= 0.3 + 1e-9
    # half the frames not found (IoU 0); the others shifted by half a box width: IoU = 1/3 < 0.5
    assert gro["found_rate"] == pytest.approx(0.5, abs=0.06)
    assert gro["prec_at_05"] == 0.0
    assert gro["miou"] == pytest.approx(gro["found_rate"], abs=1e-9)  # masks are exact where found


def test_a_target_published_in_another_camera_is_a_miss(bag, tmp_path):
    """Several cameras: the right box in the wrong camera's frame scores IoU 0 (found, but not the target)."""
    out = write_outputs(bag, tmp_path / "wrong.mcap", frame_id="cam_back_optical")
    gro = score_bags(bag, out, topics={**TOPICS, "grounding": {
        **TOPICS["grounding"], "images": ["/cameras/CAM_FRONT/image_raw", "/cameras/CAM_BACK/image_raw"]}})["grounding"]
    assert gro["cameras"] == ["CAM_FRONT", "CAM_BACK"] and gro["frames"] >= 5
    assert gro["found_rate"] == 1.0 and gro["found_in_wrong_camera"] == gro["frames"]
    assert gro["prec_at_05"] == 0.0 and gro["miou"] == 0.0


def test_a_target_published_in_a_camera_that_shows_it_is_scored_against_that_view(bag, tmp_path):
    """Several cameras: where the simulator saw the command's target in another camera too
    (/gt/grounding_views), a result there is scored against that camera's view of it (found_in_other_view),
    not as a miss; a camera the node does not ground is no excuse (found_in_wrong_camera)."""
    with BagReader(bag) as src:
        gt = {stamp_of(m): msg_to_expression(m) for _, _, _, m in src.messages(["/gt/grounding"])}
        views = [msg_to_expression(m) for _, _, _, m in src.messages(["/gt/grounding_views"])]
    assert views, "the drive should show its target in a second camera at least once"
    for view in views:   # the same target, another camera, seen
        assert view.camera != gt[view.stamp_ns].camera and view.mask.any() and view.text == gt[view.stamp_ns].text
        assert view.instance_id == gt[view.stamp_ns].instance_id
    shown = {v.camera for v in views}
    cams = ["CAM_FRONT", *sorted(shown)]
    out = write_outputs(bag, tmp_path / "views.mcap", other_views=True)
    grounded = {**TOPICS["grounding"], "images": [f"/cameras/{c}/image_raw" for c in cams]}
    gro = score_bags(bag, out, topics={**TOPICS, "grounding": grounded})["grounding"]
    visible = {s for s, e in gt.items() if e.mask.any()} | {v.stamp_ns for v in views}
    assert gro["frames"] == len(visible) and gro["gt_target_not_visible"] == len(gt) - len(visible)
    assert gro["found_in_other_view"] == len({v.stamp_ns for v in views}) and gro["found_in_wrong_camera"] == 0
    assert gro["prec_at_05"] == 1.0 and gro["miou"] == 1.0
    # a node that never finds the target scores 0, also where the command's camera does not show it (its label
    # there is an empty mask, and an empty mask against it used to count as a perfect mask IoU): the ground
    # truth again with the target gone from the command's camera wherever another camera sees it
    import dataclasses

    from vg_ros.convert import expression_to_msg
    left = tmp_path / "left_view.mcap"
    with BagReader(bag) as src, BagWriter(left, overwrite=True) as dst:
        for topic, _, log_ns, msg in src.messages(["/gt/grounding", "/gt/grounding_views"]):
            expr = msg_to_expression(msg)
            if topic == "/gt/grounding" and expr.stamp_ns in {v.stamp_ns for v in views}:
                msg = expression_to_msg(dataclasses.replace(expr, mask=np.zeros_like(expr.mask),
                                                            box=np.zeros(4)), frame_id=msg.header.frame_id)
            dst.write(topic, log_ns, msg)
    none = score_bags(left, write_outputs(bag, tmp_path / "none.mcap", drop_every=1),
                      topics={**TOPICS, "grounding": grounded})["grounding"]
    assert none["frames"] == len(visible) and none["found_rate"] == 0.0
    assert none["prec_at_05"] == 0.0 and none["miou"] == 0.0
    # found in the command's camera with an empty mask while only another camera shows the target: a miss
    # in the wrong camera, not an empty mask matching an empty label (IoU 1)
    empty = score_bags(left, write_outputs(bag, tmp_path / "empty.mcap", empty_masks=True),
                       topics={**TOPICS, "grounding": grounded})["grounding"]
    assert empty["found_in_wrong_camera"] == len({v.stamp_ns for v in views}) and empty["miou"] == 0.0
    # the same outputs for a node grounding in CAM_FRONT and CAM_BACK only: those results are in a camera it
    # does not ground, so misses; one camera alone scores as before (the views do not count)
    grounded["images"] = ["/cameras/CAM_FRONT/image_raw", "/cameras/CAM_BACK/image_raw"]
    two = score_bags(bag, out, topics={**TOPICS, "grounding": grounded})["grounding"]
    assert two["found_in_other_view"] == 0 and two["found_in_wrong_camera"] == gro["found_in_other_view"]
    assert two["prec_at_05"] < 1.0
    one = score_bags(bag, write_outputs(bag, tmp_path / "front.mcap"),
                     grounding_image_topic="/cameras/CAM_FRONT/image_raw")["grounding"]
    assert one["frames"] == sum(e.mask.any() for e in gt.values()) and one["found_in_other_view"] == 0


def test_replay_over_a_simulated_drive(bag, tmp_path):
    out = tmp_path / "replay.mcap"
    result = replay(bag, out)
    clean = json.loads(json.dumps(public(result)))
    for key in ("occupancy", "odometry", "grounding", "realtime_factor", "sensor_seconds", "wall_seconds"):
        assert key in clean
    assert clean["sensor_seconds"] == pytest.approx(1.9, abs=0.05) and clean["wall_seconds"] > 0
    with BagReader(bag) as src:
        lidar_stamps = sorted(stamp_of(m) for _, _, _, m in src.messages(["/lidar/points"]))
    with BagReader(out) as rec:
        outputs = rec.topics
        # offered transient-local as the node offers it: `ros2 bag play` / `vg-ros play` reach RViz's map
        assert rec.latched_topics == {TOPICS["occupancy"]["grid"]}
        written = {t: sorted(stamp_of(m) for _, _, _, m in rec.messages([t])) for t in outputs}
    t = TOPICS
    expectations = {
        "occupancy": ((t["occupancy"]["grid"], "nav_msgs/msg/OccupancyGrid"),
                      (t["occupancy"]["voxels"], "sensor_msgs/msg/PointCloud2")),
        "odometry": ((t["odometry"]["odometry"], "nav_msgs/msg/Odometry"),
                     (t["odometry"]["pose"], "geometry_msgs/msg/PoseStamped")),
        "grounding": ((t["grounding"]["mask"], "sensor_msgs/msg/Image"),
                      (t["grounding"]["box"], "geometry_msgs/msg/PolygonStamped")),
    }
    available = 0
    for section, topics in expectations.items():
        sec = clean[section]
        if sec.get("available") is False:
            assert sec["reason"], section  # says why, and the others still ran
            continue
        available += 1
        for topic, msgtype in topics:
            assert outputs[topic][0] == msgtype
            assert set(written[topic]) <= set(lidar_stamps), f"{topic} carries stamps no input had"
        assert sec["latency_ms"]["p50"] > 0 and sec["latency_ms"]["p50"] <= sec["latency_ms"]["p99"]
        assert sec["frames"] >= 1 and 0 < sec["coverage"] <= 1.0
    if clean["occupancy"].get("available") is not False:
        assert written[t["occupancy"]["voxels"]] == lidar_stamps       # every camera set, its own stamp
        assert 0.0 <= clean["occupancy"]["miou"] <= 100.0
    if clean["odometry"].get("available") is not False:
        assert clean["odometry"]["frames"] >= FRAMES - 1
        assert clean["odometry"]["ate_m"] < 0.5                    # 2 s of driving
    if clean["grounding"].get("available") is not False:
        assert written[t["grounding"]["box"]] == lidar_stamps           # one answer per command-camera image
    assert "real-time factor" in format_summary(result)
    print(f"replay over {SECONDS} s: {available} pipeline(s) available; {format_summary(result)}")


def test_cli_json_report_and_errors(bag, tmp_path, capsys):
    from vg_ros.cli import UserError
    out = write_outputs(bag, tmp_path / "perfect.mcap")
    from vg_ros.report import write_report
    result = {"occupancy": {"latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0}}, "sensor_seconds": 1.9,
              "wall_seconds": 1.0, "realtime_factor": 1.9}
    from vg_ros.replay import merge_scores
    merge_scores(result, score_bags(bag, out))
    index = write_report(tmp_path / "report", bag, out, result, title="test report")
    page = index.read_text()
    for png in ("bev.png", "trajectory.png", "grounding.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000 and png in page
    assert "mIoU 100.00 %" in page
    assert json.loads((tmp_path / "report" / "result.json").read_text())["occupancy"]["miou"] == pytest.approx(100)

    assert main([str(bag), "--out", str(tmp_path / "r.mcap"), "--json", "--pipelines", "grounding"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["occupancy"]["available"] is False and "not requested" in printed["occupancy"]["reason"]
    with pytest.raises(UserError, match="does not exist"):
        main([str(tmp_path / "missing.mcap"), "--out", str(tmp_path / "x.mcap")])
    with pytest.raises(UserError, match="must differ"):
        main([str(bag), "--out", str(bag)])
    with pytest.raises(UserError, match="exists already"):
        main([str(bag), "--out", str(out)])


def test_remap_reads_a_robot_topic_as_the_pipeline_input(bag, tmp_path):
    """A robot's bag names its LiDAR /velodyne_points: `--remap /velodyne_points:=/lidar/points` runs the
    odometry on it exactly as on the original name; without it the stage says why it did not run."""
    from vg_ros.replay import parse_remaps
    robot = tmp_path / "robot.mcap"
    with BagReader(bag) as src, BagWriter(robot) as dst:
        for topic, msgtype, log_ns, msg in src.messages(["/lidar/points", "/gt/ego_pose", "/tf_static"]):
            name = "/velodyne_points" if topic == "/lidar/points" else topic
            dst.add_topic(name, msgtype, latched=topic == "/tf_static")   # once per topic; a repeat is a no-op
            dst.write(name, log_ns, msg)
    remapped = replay(robot, tmp_path / "a.mcap", pipelines=("registration",),
                      remap=parse_remaps(["/velodyne_points:=/lidar/points"]))
    original = replay(bag, tmp_path / "b.mcap", pipelines=("registration",))
    assert remapped["odometry"]["ate_m"] == pytest.approx(original["odometry"]["ate_m"], abs=1e-9)
    with BagReader(tmp_path / "a.mcap") as out:
        assert out.topics[TOPICS["odometry"]["odometry"]][1] == FRAMES
    plain = replay(robot, tmp_path / "c.mcap", pipelines=("registration",))
    assert plain["odometry"]["available"] is False and "--remap" in plain["odometry"]["reason"]
    from vg_ros.cli import UserError
    with pytest.raises(UserError, match=r"nothing replayed .*registration: the bag has none of its input topics"):
        main([str(robot), "--out", str(tmp_path / "e.mcap"), "--pipelines", "registration"])   # not exit 0
    with pytest.raises(ValueError, match=r"--remap: \['/nope'\] not in the bag"):
        replay(robot, tmp_path / "d.mcap", remap={"/nope": "/lidar/points"})
    assert not (tmp_path / "d.mcap").exists()
    for bad, message in ((["/a=/b"], "FROM:=TO"), (["/a:=/b", "/a:=/c"], "remapped twice"),
                         (["/a:=/c", "/b:=/c"], "two topics onto one")):
        with pytest.raises(ValueError, match=message):
            parse_remaps(bad)


def test_compressed_cameras_replay_as_the_raw_ones(bag, tmp_path):
    """A bag whose camera is recorded compressed (PNG on <topic>/compressed) with `image_transport:
    compressed` in the YAML: grounding reads it where its node would and scores as on the raw images."""
    import yaml

    from vg_ros.convert import image_to_rgb, rgb_to_compressed
    raw_topic = "/cameras/CAM_FRONT/image_raw"
    packed = tmp_path / "compressed.mcap"
    with BagReader(bag) as src, BagWriter(packed) as dst:
        for topic, msgtype, log_ns, msg in src.messages():
            if topic == raw_topic:
                dst.write(raw_topic + "/compressed", log_ns, rgb_to_compressed(
                    image_to_rgb(msg), "png", stamp_ns=stamp_of(msg), frame_id=msg.header.frame_id, flavor="rosbags"))
            elif not topic.startswith("/cameras/") or topic.endswith("camera_info"):
                dst.add_topic(topic, msgtype, latched=topic in ("/tf_static", "/command"))
                dst.write(topic, log_ns, msg)
    config = tmp_path / "compressed.yaml"
    section = yaml.safe_load((TOPICS_CONFIG).read_text())["grounding_node"]
    section["ros__parameters"]["image_transport"] = "compressed"
    config.write_text(yaml.safe_dump({"grounding_node": section}))
    packed_run = replay(packed, tmp_path / "a.mcap", pipelines=("grounding",), config=config)
    raw_run = replay(bag, tmp_path / "b.mcap", pipelines=("grounding",))
    assert packed_run["grounding"]["frames"] == raw_run["grounding"]["frames"] == FRAMES
    for key in ("prec_at_05", "miou", "found_rate"):
        assert packed_run["grounding"][key] == pytest.approx(raw_run["grounding"][key], abs=1e-9), key


def test_replay_of_a_real_bag_whose_every_frame_fails_exits_2_with_the_reason(shared_data, tmp_path, capsys):
    """The real S3E bag's LiDAR frame (`velodyne`) is in neither its bag (no /tf_static) nor the default
    rig: every scan is dropped. That is exit 2 naming the drops and the fix, not a report of nothing, exit 0."""
    bag = shared_data / "bags" / "s3e_lidar_imu_camera"
    argv = [str(bag), "--out", str(tmp_path / "out.mcap"), "--remap", "/Alpha/velodyne_points:=/lidar/points",
            "--json"]   # every pipeline: grounding reads the clouds too, and answers nothing without images
    from vg_ros.cli import main as vg_main
    assert vg_main(["replay", *argv]) == 2
    err = capsys.readouterr().err
    assert "nothing replayed" in err and "registration: every input dropped (pipeline_error:KeyError=2)" in err
    assert "--rig" in err


def _hostile_copy(bag, out, change):
    """A copy of `bag` with `change(topic, index, msg)` applied: it returns the message to write (None: leave it
    out), or (msgtype, message) to record the topic with another type."""
    with BagReader(bag) as src, BagWriter(out) as dst:
        seen: dict[str, int] = {}
        for topic, msgtype, log_ns, msg in src.messages():
            k = seen[topic] = seen.get(topic, -1) + 1
            new = change(topic, k, msg)
            if new is None:
                continue
            if isinstance(new, tuple):
                msgtype, new = new
            dst.add_topic(topic, msgtype, latched=topic in ("/tf_static", "/command"))
            dst.write(topic, log_ns, new)
    return out


def test_malformed_ground_truth_is_counted_and_left_out_not_the_end_of_every_score(bag, tmp_path):
    """One NaN ego pose, one NaN grounding box, one occupancy label whose camera mask has the wrong size: each
    is counted (`gt_malformed`) and left out, the rest scored (before: one ValueError ended score_bags, and
    `vg-ros replay` exited 2 with no score at all after running every pipeline)."""
    import dataclasses as dc

    def change(topic, k, msg):
        if topic == "/gt/ego_pose" and k == 3:
            return dc.replace(msg, pose=dc.replace(msg.pose, position=dc.replace(msg.pose.position, x=float("nan"))))
        if topic == "/gt/grounding" and k == 4:
            return dc.replace(msg, box=np.array([np.nan, 0, 1, 1], np.float32))
        if topic == "/gt/occupancy" and k == 5:
            return dc.replace(msg, mask_camera=msg.mask_camera[:1000].copy())
        return msg
    hostile = _hostile_copy(bag, tmp_path / "hostile.mcap", change)
    scores = score_bags(hostile, write_outputs(bag, tmp_path / "perfect.mcap"),
                        grounding_image_topic="/cameras/CAM_FRONT/image_raw")
    occ, odo, gro = scores["occupancy"], scores["odometry"], scores["grounding"]
    assert occ["gt_malformed"] == odo["gt_malformed"] == gro["gt_malformed"] == 1
    assert occ["frames"] == occ["gt_frames"] == FRAMES - 1 and occ["miou"] == pytest.approx(100.0)
    assert odo["frames"] == odo["gt_frames"] == FRAMES - 1 and odo["ate_m"] < 1e-6
    assert gro["prec_at_05"] == 1.0 and gro["miou"] == pytest.approx(1.0)   # a NaN box was a silent miss


def test_a_grounding_label_of_another_size_than_the_output_is_counted_not_scored_zero(bag, tmp_path):
    """A /gt/grounding mask of another size than the answer (or a camera whose images changed size): the box and
    mask are in other pixels. Counted (`mask_size_mismatch`) and not scored, instead of a silent mask IoU of 0."""
    import dataclasses as dc

    def change(topic, k, msg):
        if topic == "/gt/grounding" and k % 2 == 0:
            small = np.ascontiguousarray(np.asarray(msg.mask.data).reshape(msg.mask.height, msg.mask.width)[::2, ::2])
            return dc.replace(msg, mask=dc.replace(msg.mask, height=small.shape[0], width=small.shape[1],
                                                   step=small.shape[1], data=small.reshape(-1)))
        return msg
    hostile = _hostile_copy(bag, tmp_path / "hostile.mcap", change)
    gro = score_bags(hostile, write_outputs(bag, tmp_path / "perfect.mcap"),
                     grounding_image_topic="/cameras/CAM_FRONT/image_raw")["grounding"]
    assert gro["mask_size_mismatch"] >= 5
    assert gro["frames"] == gro["gt_frames"] - gro["mask_size_mismatch"] and gro["coverage"] < 1.0
    assert gro["miou"] == pytest.approx(1.0) and gro["prec_at_05"] == 1.0


def test_ground_truth_of_another_type(bag, tmp_path):
    """/gt/ego_pose recorded as nav_msgs/Odometry is scored as `vg-ros odometry` scores it; /gt/occupancy as an
    Image says so in its section (before: an AttributeError traceback after the whole replay)."""
    def change(topic, k, msg):
        if topic == "/gt/ego_pose":
            return "nav_msgs/msg/Odometry", matrix_to_odometry(pose_stamped_to_matrix(msg), stamp_ns=stamp_of(msg),
                                                               flavor="rosbags")
        if topic == "/gt/occupancy":
            return "sensor_msgs/msg/Image", array_to_image(np.zeros((2, 2), np.uint8), "mono8",
                                                           stamp_ns=stamp_of(msg), flavor="rosbags")
        return msg
    hostile = _hostile_copy(bag, tmp_path / "hostile.mcap", change)
    scores = score_bags(hostile, write_outputs(bag, tmp_path / "perfect.mcap"))
    assert scores["odometry"]["frames"] == FRAMES and scores["odometry"]["ate_m"] < 1e-6
    occ = scores["occupancy"]
    assert occ["miou"] is None and occ["frames"] == 0 and "sensor_msgs/msg/Image" in occ["gt_error"]
    assert "/gt/occupancy is sensor_msgs/msg/Image" in format_summary(scores)


def test_one_camera_with_a_bad_calibration_is_left_out_of_its_sets_as_occupancy_node_does(bag, tmp_path):
    """CAM_FRONT's CameraInfo with a NaN focal length: occupancy_node drops that camera (`bad_camera:CAM_FRONT`)
    and answers from the other five; replay dropped every whole set (coverage 0)."""
    import dataclasses as dc

    def change(topic, k, msg):
        if topic == "/cameras/CAM_FRONT/camera_info":
            return dc.replace(msg, k=np.array([np.nan, *msg.k[1:]]))
        return msg
    hostile = _hostile_copy(bag, tmp_path / "hostile.mcap", change)
    result = replay(hostile, tmp_path / "out.mcap", pipelines=("occupancy",))
    occ = result["occupancy"]
    if occ.get("available") is False:
        pytest.skip(occ["reason"])
    assert occ["frames_out"] == occ["frames"] == FRAMES and occ["miou"] > 0
    assert occ["drops"]["bad_camera:CAM_FRONT"] == FRAMES and set(occ["drops"]) == {"bad_camera:CAM_FRONT"}


def test_a_concatenated_bag_scores_no_output_against_the_other_drives_ground_truth(bag, tmp_path):
    """Two drives over the same stamps in one bag (a concatenated or looped recording): an output stamp matches
    the ground truth of either drive. Such stamps are counted (`gt_ambiguous_stamps`) and not scored (before:
    coverage 1.0 over twice the ground-truth frames, and an ATE against the second drive's poses)."""
    other = sim_bag(SEED + 1, SECONDS)
    cat = tmp_path / "cat.mcap"
    with BagWriter(cat) as dst:
        for k, path in enumerate((bag, other)):
            with BagReader(path) as src:
                shift = k * (src.end_ns - src.start_ns + 100_000_000)
                for topic, msgtype, log_ns, msg in src.messages(["/gt/occupancy", "/gt/ego_pose", "/gt/grounding"]):
                    dst.add_topic(topic, msgtype)
                    dst.write(topic, log_ns + shift, msg)
    scores = score_bags(cat, write_outputs(bag, tmp_path / "perfect.mcap"),
                        grounding_image_topic="/cameras/CAM_FRONT/image_raw")
    for section in ("occupancy", "odometry", "grounding"):
        sec = scores[section]
        assert sec["gt_ambiguous_stamps"] == FRAMES and sec["frames"] == 0, section
