"""grounding_node over real DDS: late-joining command, mask/box/position outputs with the image's header,
"not found" as an empty polygon and an all-zero mask, and bad input counted without stopping the node."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ros_helpers import ros_session

pytest.importorskip("rclpy", reason="rclpy (ros-jazzy wheels) not installed")

DOMAIN = 53


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """An untrained tiny VG-LAW checkpoint: the node's plumbing does not depend on trained values."""
    from vg_ros.grounding.model import VGLAW, spec_by_name
    from vg_ros.grounding.pipeline import save_weights
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(VGLAW(spec_by_name("tiny")), path)
    return path


def _node(ros, weights, tmp_path, **overrides):
    from rclpy.parameter import Parameter
    from vg_ros.nodes.grounding_node import GroundingNode
    cfg = tmp_path / "perception.yaml"
    cfg.write_text("grounding_node:\n  ros__parameters: {diagnostics_period: 0.0, device: cpu}\n")
    params = [Parameter("weights", value=str(weights))] + [Parameter(k, value=v) for k, v in overrides.items()]
    node = GroundingNode(config_path=cfg, context=ros.context, parameter_overrides=params)
    node.configure()
    node.activate()
    return ros.add(node)


def _image(stamp_ns, encoding="rgb8"):
    from vg_ros.convert import array_to_image
    rng = np.random.default_rng(stamp_ns % 1000)
    if encoding == "32FC1":
        return array_to_image(rng.random((270, 480), dtype=np.float32), "32FC1", stamp_ns=stamp_ns,
                              frame_id="cam_front_optical")
    return array_to_image(rng.integers(0, 255, (270, 480, 3), dtype=np.uint8), encoding, stamp_ns=stamp_ns,
                          frame_id="cam_front_optical")


def _cloud(stamp_ns, centre_lidar):
    from vg_ros.convert import xyz_fields_to_pointcloud2
    rng = np.random.default_rng(0)
    pts = np.asarray(centre_lidar) + rng.normal(0, 0.05, (200, 3))
    return xyz_fields_to_pointcloud2(pts.astype(np.float32), stamp_ns=stamp_ns, frame_id="lidar_top")


def _position_after(ros, node, pts_pub, img_pub, positions, cloud_ns, image_ns, centre_lidar):
    """Publish a cloud around `centre_lidar`, then an image; the next /grounding/position's point."""
    count = len(positions)
    pts_pub.publish(_cloud(cloud_ns, centre_lidar))
    assert ros.spin_until(lambda: node.clouds.nearest(cloud_ns, 0.0)[0] is not None, timeout=10), \
        node.drops.summary()   # a loaded machine may take a while to deliver a sweep
    img_pub.publish(_image(image_ns))
    assert ros.spin_until(lambda: len(positions) > count, timeout=20), node.drops.summary()
    return positions[count].point


def _distance(point, xyz) -> float:
    return float(np.linalg.norm([point.x - xyz[0], point.y - xyz[1], point.z - xyz[2]]))


def test_node_outputs_late_command_and_position(weights_file, tmp_path):
    from geometry_msgs.msg import PointStamped, PolygonStamped
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2
    from std_msgs.msg import String
    from vg_ros.convert import camera_model_to_info, image_to_array
    from vg_ros.nodes.qos import command_qos
    from vg_ros.types import Rig

    with ros_session(DOMAIN) as ros:
        io = ros.node("io")
        cmd_pub = io.create_publisher(String, "/command", command_qos())
        cmd_pub.publish(String(data="the red car left of the bus"))  # before the node exists: transient-local
        # score_threshold 0 -> always found; mask_threshold 0.01 -> (untrained) mask covers the view
        node = _node(ros, weights_file, tmp_path, score_threshold=0.0, mask_threshold=0.01)
        # a command must not queue behind images in the default (mutually exclusive) callback group
        assert node.command_sub.callback_group is not node.default_callback_group
        masks, boxes, positions, overlays = [], [], [], []
        io.create_subscription(Image, "/grounding/mask", masks.append, 10)
        io.create_subscription(PolygonStamped, "/grounding/box", boxes.append, 10)
        io.create_subscription(PointStamped, "/grounding/position", positions.append, 10)
        io.create_subscription(Image, "/grounding/overlay", overlays.append, 10)
        img_pub = io.create_publisher(Image, "/cameras/CAM_FRONT/image_raw", 10)
        info_pub = io.create_publisher(CameraInfo, "/cameras/CAM_FRONT/camera_info", 10)
        pts_pub = io.create_publisher(PointCloud2, "/lidar/points", 10)
        assert ros.spin_until(lambda: node.pipeline.command == "the red car left of the bus", timeout=10)
        assert ros.wait_for_match(img_pub) and ros.wait_for_match(pts_pub) and ros.wait_for_match(info_pub)
        assert ros.spin_until(lambda: io.count_publishers("/grounding/mask") and
                              io.get_subscriptions_info_by_topic("/grounding/mask"), timeout=5)
        rig = Rig.load("default")
        cam = rig.camera("CAM_FRONT")
        # a target 10 m ahead of the camera, expressed in the LiDAR frame
        p_base = cam.T_base_cam @ np.array([0.3, 0.2, 10.0, 1.0])
        p_lidar = (np.linalg.inv(rig.lidar.T_base_lidar) @ p_base)[:3]
        stamp = 1_000_000_000
        info_pub.publish(camera_model_to_info(cam, stamp_ns=stamp))
        pts_pub.publish(_cloud(stamp, p_lidar))
        # both taken before the image: the image subscription comes first in the executor's order, so an image
        # sent while the cloud still waits (a loaded machine) is grounded without it and has no position
        assert ros.spin_until(lambda: node.camera_infos[0] is not None and
                              node.clouds.nearest(stamp, 0.0)[0] is not None, timeout=10), node.drops.summary()
        assert ros.spin_until(node.overlay_pub.get_subscription_count, timeout=5)   # drawn only while subscribed
        image = _image(stamp)
        img_pub.publish(image)
        assert ros.spin_until(lambda: masks and boxes and positions and overlays, timeout=20)
        mask, box, pos = masks[0], boxes[0], positions[0]
        assert mask.encoding == "mono8" and (mask.height, mask.width) == (270, 480)
        assert mask.header.frame_id == "cam_front_optical" and mask.header.stamp.sec == 1
        assert set(np.unique(image_to_array(mask))) <= {0, 255} and image_to_array(mask).max() == 255
        assert box.header == mask.header and len(box.polygon.points) == 4
        p = box.polygon.points
        assert p[0].x == p[3].x and p[1].x == p[2].x and p[0].y == p[1].y and p[2].y == p[3].y
        assert p[0].z == pytest.approx(node.last_result.score, abs=1e-6)
        assert pos.header.frame_id == "lidar_top" and pos.header.stamp == mask.header.stamp
        assert np.linalg.norm([pos.point.x - p_lidar[0], pos.point.y - p_lidar[1], pos.point.z - p_lidar[2]]) < 0.1
        # the debug overlay: the camera's size and header, the verdict band on top, the image below it
        shown = image_to_array(overlays[0])
        assert overlays[0].encoding == "rgb8" and overlays[0].header == mask.header and shown.shape == (270, 480, 3)
        band = shown[:20]
        assert (band <= 20).mean() > 0.8 and band.max() == 255            # dark band, white letters
        from scipy import ndimage
        published = image_to_array(mask) == 255
        inside = ndimage.binary_erosion(published, iterations=2)[60:]   # away from the outline and the box
        original = image_to_array(image)
        assert inside.mean() > 0.3 and np.array_equal(shown[60:][inside], original[60:][inside])  # the target as is
        # not found: the whole image dimmed, nothing outlined
        import dataclasses
        node.publish_overlay(mask.header, original, dataclasses.replace(node.last_result, found=False))
        assert ros.spin_until(lambda: len(overlays) == 2, timeout=5)
        assert np.array_equal(image_to_array(overlays[1])[60:], (original[60:] * 0.5).astype(np.uint8))
        # a node lagging behind: a newer cloud (0.5 s on, the target moved 3 m) arrived before the next image;
        # the image is paired with the cloud nearest its own stamp, not the newest
        paired = _position_after(ros, node, pts_pub, img_pub, positions, stamp + 500_000_000, stamp + 20_000_000,
                                 p_lidar + [3.0, 0, 0])
        assert _distance(paired, p_lidar) < 0.1
        assert node.drops.drops["no_matching_cloud"] == 0


def test_node_bad_input_is_counted_and_node_stays_up(weights_file, tmp_path):
    from geometry_msgs.msg import PolygonStamped
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from vg_ros.convert import image_to_array
    from vg_ros.nodes.qos import command_qos

    with ros_session(DOMAIN + 1) as ros:
        node = _node(ros, weights_file, tmp_path, score_threshold=1.0, points_topic="")  # nothing is ever "found"
        io = ros.node("io")
        masks, boxes = [], []
        io.create_subscription(Image, "/grounding/mask", masks.append, 10)
        io.create_subscription(PolygonStamped, "/grounding/box", boxes.append, 10)
        img_pub = io.create_publisher(Image, "/cameras/CAM_FRONT/image_raw", 10)
        cmd_pub = io.create_publisher(String, "/command", command_qos(depth=10))
        assert ros.wait_for_match(img_pub) and ros.wait_for_match(cmd_pub)
        img_pub.publish(_image(1_000_000_000))                      # before any command
        assert ros.spin_until(lambda: node.drops.drops["no_command"] == 1, timeout=5)
        for count, text in enumerate(("", "go " * 3400, "   "), 1):  # empty, 10 kB, blank
            cmd_pub.publish(String(data=text))  # one at a time: the command subscription keeps the last only
            assert ros.spin_until(lambda: node.drops.drops["bad_command"] == count, timeout=5)
        assert node.pipeline.command is None
        cmd_pub.publish(String(data="das rote Auto links vom Bus — 赤い車"))  # non-ASCII is a valid command
        assert ros.spin_until(lambda: node.pipeline.command is not None, timeout=5)
        img_pub.publish(_image(2_000_000_000, encoding="32FC1"))   # foreign encoding
        assert ros.spin_until(lambda: node.drops.drops["bad_image"] == 1, timeout=5)
        img_pub.publish(_image(3_000_000_000, encoding="bgr8"))    # and the node still works
        assert ros.spin_until(lambda: masks and boxes, timeout=20)
        assert len(boxes[0].polygon.points) == 0                   # empty polygon = not found
        assert image_to_array(masks[0]).max() == 0                 # all-zero mask when not found
        assert node.drops.processed["not_found"] == 1 and node.drops.processed["commands"] == 1


def test_parameters_change_while_running_or_are_refused_with_a_reason(weights_file, tmp_path):
    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path)
        [ok] = ros.set_parameters("grounding_node", score_threshold=0.5)
        assert ok.successful and node.pipeline.config.score_threshold == 0.5 == node.cfg.score_threshold
        assert node.get_parameter("score_threshold").value == 0.5
        [ok, ok2] = ros.set_parameters("grounding_node", max_stamp_age=0.25, max_cloud_age=0.3)
        assert ok.successful and ok2.successful
        assert node.stamps.max_age_ns == 250_000_000 and node.params["max_cloud_age"] == 0.3
        # read at start: refused with the reason, the value stays (never accepted and silently ignored)
        [refused] = ros.set_parameters("grounding_node", weights="/tmp/other.safetensors")
        assert not refused.successful and "cleanup" in refused.reason and "restart it" in refused.reason and "score_threshold" in refused.reason
        assert node.get_parameter("weights").value == str(weights_file)
        [bad] = ros.set_parameters("grounding_node", box_source="middle")
        assert not bad.successful and "box_source" in bad.reason and node.pipeline.config.box_source == "mask"
        [negative] = ros.set_parameters("grounding_node", max_cloud_age=-1.0)
        assert not negative.successful and node.params["max_cloud_age"] == 0.3
        [per_set] = ros.set_parameters("grounding_node", camera_evidence_half_life=0.0)
        assert per_set.successful and node.camera_choice.half_life == 0.0
        [too_big] = ros.set_parameters("grounding_node", camera_evidence_half_life=-1.0)
        assert (not too_big.successful and "camera_evidence_half_life" in too_big.reason
                and node.camera_choice.half_life == 0.0)


def test_a_time_jump_starts_the_camera_evidence_again(weights_file, tmp_path):
    """A looped bag (stamps back, twice in order: the node's state reset) also restarts the camera choice: its
    stamp was the old time base's newest, so no set of the new one decayed the sums, and the camera that led
    the last loop stayed published for up to a loop's length (299 sets of 10 Hz after a 60 s loop, not 1)."""
    from vg_ros.types import GroundingResult
    topics = ["/cameras/CAM_FRONT/image_raw", "/cameras/CAM_BACK/image_raw"]

    def res(*scores):
        return [GroundingResult(0, "c", found=True, score=s, box=np.zeros(4), mask=np.zeros((1, 1), bool))
                for s in scores]

    with ros_session(DOMAIN + 7) as ros:
        node = _node(ros, weights_file, tmp_path, extra_image_topics=topics[1:])
        S = 10**9   # noqa: N806
        for k in range(600):                                  # the bag's first pass: stamps 1000 .. 1060 s
            node.camera_choice.choose("cmd", ["F", "B"], res(0.9, 0.1), 1000 * S + k * S // 10)
        topic = node.image_inputs[0]
        assert node.stamps.accept(topic, 1060 * S) and not node.stamps.accept(topic, 1000 * S)
        assert node.stamps.accept(topic, 1000 * S + S // 10) and node.stamps.jumps == 1   # the loop: reset
        choice = node.camera_choice
        assert choice.stamp_ns is None and choice.sums == {} and choice.half_life == 0.1
        for k in range(2):                                    # the second pass, target now in B
            chosen = choice.choose("cmd", ["F", "B"], res(0.1, 0.9), 1000 * S + (k + 2) * S // 10)
        assert chosen == 1


def test_commands_from_volatile_and_transient_local_publishers_each_apply_once(weights_file, tmp_path):
    """A plain `ros2 topic pub` offers volatile durability, which the transient-local subscription never
    matches: the node's volatile subscription takes it. A transient-local publisher's live command reaches
    both subscriptions and is applied once."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String
    from vg_ros.nodes.qos import command_qos

    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path)
        io = ros.node("io")
        plain = io.create_publisher(String, "/command", QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                                                                   durability=DurabilityPolicy.VOLATILE))
        latched = io.create_publisher(String, "/command", command_qos())
        assert ros.wait_for_match(plain, count=1) and ros.wait_for_match(latched, count=2)
        plain.publish(String(data="the bus"))
        assert ros.spin_until(lambda: node.pipeline.command == "the bus", timeout=10)
        latched.publish(String(data="the red car"))
        assert ros.spin_until(lambda: node.pipeline.command == "the red car", timeout=10)
        ros.spin_for(0.5)   # the second copy of the latched command, had it been applied, is counted by now
        assert node.drops.processed["commands"] == 2 and node.drops.total == 0
        assert node.received["/command"] == 2   # each sample counted once too, not once per subscription


def test_compressed_camera_grounds_as_the_raw_one(weights_file, tmp_path):
    """image_transport compressed: sensor_msgs/CompressedImage on image_topic/compressed; a PNG frame gives
    the mask the raw frame gives."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from vg_ros.convert import image_to_array, rgb_to_compressed
    from vg_ros.grounding.messages import image_camera
    from vg_ros.nodes.qos import command_qos
    from vg_ros.types import CameraFrame

    with ros_session(DOMAIN) as ros:
        node = _node(ros, weights_file, tmp_path, image_transport="compressed", score_threshold=0.0,
                     mask_threshold=0.01)   # untrained weights: a mask over much of the view
        assert node.image_inputs == ["/cameras/CAM_FRONT/image_raw/compressed"]
        io = ros.node("io")
        masks = []
        io.create_subscription(Image, "/grounding/mask", masks.append, 10)
        io.create_publisher(String, "/command", command_qos()).publish(String(data="the red car"))
        from sensor_msgs.msg import CompressedImage
        pub = io.create_publisher(CompressedImage, "/cameras/CAM_FRONT/image_raw/compressed", 10)
        assert ros.wait_for_match(pub) and ros.spin_until(lambda: node.pipeline.command == "the red car", timeout=10)
        rgb = image_to_array(_image(2_000_000_000))
        pub.publish(rgb_to_compressed(rgb, "png", stamp_ns=2_000_000_000, frame_id="cam_front_optical"))
        assert ros.spin_until(lambda: masks, timeout=20), node.drops.summary()
        assert masks[0].header.stamp.sec == 2 and masks[0].header.frame_id == "cam_front_optical"
        camera = image_camera(masks[0], rgb.shape[1], rgb.shape[0], node.camera_infos[0], node.extrinsics.rig,
                              node.drops)
        expected = node.pipeline.infer(CameraFrame(camera, rgb, 2_000_000_000), 2_000_000_000)
        assert expected.found and expected.mask.any()
        assert np.array_equal(image_to_array(masks[0]) == 255, expected.mask)
    with pytest.raises(ValueError, match="image_transport"):
        with ros_session(DOMAIN) as ros:
            _node(ros, weights_file, tmp_path, image_transport="theora")


def test_several_cameras_publish_the_one_where_the_target_scores_highest(weights_file, tmp_path):
    """extra_image_topics: each synchronised set is grounded in every camera and the mask and box of the camera
    with the most evidence over the command's sets (CameraChoice) go out with its header; each extra camera's
    CameraInfo comes from its sibling topic; a camera missing from a set does not hold the others back past
    missing_camera_timeout."""
    from geometry_msgs.msg import PolygonStamped
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import String
    from vg_ros.convert import array_to_image, camera_model_to_info, image_to_array
    from vg_ros.grounding.messages import CameraChoice
    from vg_ros.nodes.qos import command_qos
    from vg_ros.types import CameraFrame, Rig

    cams = [Rig.load("default").camera(n) for n in ("CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT")]
    topics = [f"/cameras/{c.name}/image_raw" for c in cams]
    with ros_session(DOMAIN + 4) as ros:
        node = _node(ros, weights_file, tmp_path, extra_image_topics=topics[1:], score_threshold=0.0,
                     mask_threshold=0.3, missing_camera_timeout=0.3)
        assert node.image_inputs == topics
        assert node.info_topics == [f"/cameras/{c.name}/camera_info" for c in cams]
        io = ros.node("io")
        masks, boxes, overlays = [], [], []
        io.create_subscription(Image, "/grounding/mask", masks.append, 10)
        io.create_subscription(PolygonStamped, "/grounding/box", boxes.append, 10)
        io.create_subscription(Image, "/grounding/overlay", overlays.append, 10)
        io.create_publisher(String, "/command", command_qos()).publish(String(data="the red car"))
        pubs = [io.create_publisher(Image, t, 10) for t in topics]
        info_pub = io.create_publisher(CameraInfo, "/cameras/CAM_BACK/camera_info", 10)
        assert all(ros.wait_for_match(p) for p in pubs + [info_pub])
        assert ros.spin_until(lambda: node.pipeline.command == "the red car", timeout=10)
        info_pub.publish(camera_model_to_info(cams[1].scaled(480, 270), stamp_ns=1))
        assert ros.spin_until(lambda: node.camera_infos[1] is not None, timeout=5)
        rng = np.random.default_rng(7)
        images = [rng.integers(0, 255, (270, 480, 3), dtype=np.uint8) for _ in cams]
        chosen, choice = [], CameraChoice(0.1)
        assert ros.spin_until(node.overlay_pub.get_subscription_count, timeout=5)
        sets = [(1_000_000_000, (0, 1, 2)), (1_100_000_000, (0, 2)), (1_500_000_000, (0, 1, 2))]
        sent = [0] * len(topics)
        for stamp, present in sets:   # the second set misses CAM_BACK: it goes on once the third is 0.4 s on
            for i in present:
                pubs[i].publish(array_to_image(images[i], "rgb8", stamp_ns=stamp + i * 1_000_000,
                                               frame_id=cams[i].frame_id))
                sent[i] += 1
            # each set in the node before the next is sent: taken interleaved (set 3's CAM_BACK before set 2's
            # CAM_FRONT_LEFT) stamp time would time set 2 out before it is complete
            assert ros.spin_until(lambda: all(node.received[t] >= n for t, n in zip(topics, sent)), timeout=20), \
                (dict(node.received), sent, node.drops.summary())
        assert ros.spin_until(lambda: len(masks) == len(boxes) == len(overlays) == 3, timeout=30), node.drops.summary()
        assert [o.header.frame_id for o in overlays] == [m.header.frame_id for m in masks]   # the chosen camera
        for k, (stamp, present) in enumerate(sets):
            frames = [CameraFrame(cams[i].scaled(480, 270), images[i], stamp + i * 1_000_000) for i in present]
            results = node.pipeline.infer_many(frames)
            best = present[choice.choose("the red car", [topics[i] for i in present], results, stamp)]
            assert masks[k].header.frame_id == boxes[k].header.frame_id == cams[best].frame_id
            assert masks[k].header.stamp.nanosec == (stamp + best * 1_000_000) % 1_000_000_000
            assert np.array_equal(image_to_array(masks[k]) == 255, results[present.index(best)].mask)
            chosen.append(best)
        assert set(chosen) != {0}, chosen   # (seed 7's images) the choice is not simply the first camera
        assert node.drops.drops["sync_partial"] == 1 and node.drops.processed["found"] == 3
    with pytest.raises(ValueError, match="extra_image_topics"):
        with ros_session(DOMAIN + 4) as ros:
            _node(ros, weights_file, tmp_path, extra_image_topics=["/cameras/CAM_FRONT/image_raw"])


def test_deactivated_node_takes_and_sends_nothing_and_activates_again_with_its_command(weights_file, tmp_path):
    """The lifecycle with two synchronised cameras (subscriptions, the sync's flush timer, the command's own
    callback group): deactivate removes every one of them and publishes nothing; activated again, the node
    has each once and grounds with the command it kept (the latched command arrives once more)."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from vg_ros.nodes.qos import command_qos

    topics = ["/cameras/CAM_FRONT/image_raw", "/cameras/CAM_BACK/image_raw"]
    with ros_session(DOMAIN + 6) as ros:
        node = _node(ros, weights_file, tmp_path, extra_image_topics=topics[1:], score_threshold=0.0,
                     missing_camera_timeout=0.3)
        counts = (len(list(node.subscriptions)), len(list(node.publishers)), len(list(node.timers)))
        io = ros.node("io")
        masks: list = []
        io.create_subscription(Image, "/grounding/mask", masks.append, 10)
        io.create_publisher(String, "/command", command_qos()).publish(String(data="the blue truck"))
        pubs = [io.create_publisher(Image, t, 10) for t in topics]

        def ground(stamp: int) -> None:
            for k, pub in enumerate(pubs):
                pub.publish(_image(stamp + k * 1_000_000))

        assert all(ros.wait_for_match(p) for p in pubs)
        assert ros.spin_until(lambda: node.pipeline.command == "the blue truck", timeout=10)
        ground(1_000_000_000)
        assert ros.spin_until(lambda: len(masks) == 1, timeout=20), node.drops.summary()

        node.deactivate()
        assert node.lifecycle_state() == "inactive" and node.pipeline is not None   # the model stays loaded
        assert ros.spin_until(lambda: io.count_subscribers(topics[0]) == 0 and io.count_subscribers("/command") == 0
                              and io.count_publishers("/grounding/mask") == 0, timeout=5)
        assert node._syncs == [] and node.silent_inputs() == {}
        ground(1_200_000_000)
        ros.spin_for(1.0)
        assert len(masks) == 1

        node.activate()
        assert (len(list(node.subscriptions)), len(list(node.publishers)), len(list(node.timers))) == counts
        assert all(ros.wait_for_match(p) for p in pubs)
        assert ros.spin_until(lambda: io.count_publishers("/grounding/mask") == 1, timeout=5)
        ground(1_400_000_000)
        assert ros.spin_until(lambda: len(masks) == 2, timeout=20), node.drops.summary()
        # the latched command, delivered again on activation (its own subscription: it may come after the mask)
        assert ros.spin_until(lambda: node.drops.processed["commands"] >= 2, timeout=10), node.drops.summary()
        ros.spin_for(0.5)
        assert len(masks) == 2 and node.pipeline.command == "the blue truck"
        assert node.drops.processed["commands"] == 2   # once, not once per subscription
        assert not any(k.startswith("callback_error") for k in node.drops.drops), node.drops.summary()

        node.deactivate()
        node.cleanup()
        assert node.lifecycle_state() == "unconfigured" and node.pipeline is None


def test_best_camera_prefers_found_then_score():
    import dataclasses
    from vg_ros.grounding.pipeline import best_camera
    from vg_ros.types import GroundingResult
    base = GroundingResult(stamp_ns=0, command="x", found=False, score=0.0, box=np.zeros(4),
                           mask=np.zeros((2, 2), bool), seconds=0.0)
    r = [dataclasses.replace(base, score=s, found=f) for s, f in ((0.99, False), (0.91, True), (0.95, True))]
    assert best_camera(r) == 2 and best_camera(r[:2]) == 1 and best_camera(r[:1]) == 0
    assert best_camera([r[1], dataclasses.replace(r[1])]) == 0   # a tie: the earlier camera
    # with a presence head: score x presence (the probability that the referent is in that image)
    p = [dataclasses.replace(r[2], presence=0.5), dataclasses.replace(r[1], presence=0.9)]
    assert best_camera(p) == 1 and best_camera([dataclasses.replace(p[1], found=False), p[0]]) == 1
    with pytest.raises(ValueError):
        best_camera([])


def test_the_position_follows_the_vehicle_between_the_sweep_and_the_image(weights_file, tmp_path):
    """A cloud swept 0.1 s before the image, the vehicle 1 m further on by then (odometry): the target's
    position is where the camera saw it, 1 m closer, not where the LiDAR did."""
    from geometry_msgs.msg import PointStamped
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import Image, PointCloud2
    from std_msgs.msg import String
    from vg_ros.convert import matrix_to_odometry
    from vg_ros.geometry import make_T
    from vg_ros.nodes.qos import command_qos
    from vg_ros.types import Rig

    rig = Rig.load("default")
    T_base_lidar = rig.lidar.T_base_lidar
    p_base = rig.camera("CAM_FRONT").T_base_cam @ np.array([0.3, 0.2, 10.0, 1.0])
    p_lidar = (np.linalg.inv(T_base_lidar) @ p_base)[:3]
    expected = (np.linalg.inv(T_base_lidar) @ (p_base - [1.0, 0, 0, 0]))[:3]   # static target, 1 m closer
    with ros_session(DOMAIN + 5) as ros:
        node = _node(ros, weights_file, tmp_path, score_threshold=0.0, mask_threshold=0.01)
        io = ros.node("io")
        positions = []
        io.create_subscription(PointStamped, "/grounding/position", positions.append, 10)
        io.create_publisher(String, "/command", command_qos()).publish(String(data="the red car"))
        img_pub = io.create_publisher(Image, "/cameras/CAM_FRONT/image_raw", 10)
        pts_pub = io.create_publisher(PointCloud2, "/lidar/points", 10)
        odom_pub = io.create_publisher(Odometry, "/registration/odometry", 10)
        assert all(ros.wait_for_match(p) for p in (img_pub, pts_pub, odom_pub))
        assert ros.spin_until(lambda: node.pipeline.command == "the red car", timeout=10)
        t0, t1 = 1_000_000_000, 1_100_000_000

        def both_poses_arrived() -> bool:   # best-effort: a pose sent before the node's reader matched is lost
            for k, stamp in enumerate((t0, t1)):   # in order (an older pose after a newer one is ignored)
                if node.motion.at(stamp) is None:   # 10 m/s along the base x axis
                    odom_pub.publish(matrix_to_odometry(make_T(None, [1.0 * k, 0, 0]), np.eye(6), stamp_ns=stamp))
                    return False
            return True

        assert ros.spin_until(both_poses_arrived, timeout=10)
        got = _position_after(ros, node, pts_pub, img_pub, positions, t0, t1, p_lidar)
        assert positions[0].header.stamp.nanosec == 100_000_000 and positions[0].header.frame_id == "lidar_top"
        assert _distance(got, expected) < 0.1
        assert node.drops.processed["position_motion_compensated"] == 1
        # odometry that stops before the image (beyond the 0.2 s extrapolation): the sweep as it is, counted
        got = _position_after(ros, node, pts_pub, img_pub, positions, t1 + 400_000_000, t1 + 500_000_000, p_lidar)
        assert _distance(got, p_lidar) < 0.1
        assert node.drops.processed["position_not_compensated"] == 1
