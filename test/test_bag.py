"""vg_ros.bag and the converters on real rosbag2 data (../shared/data/bags), the mcap writer, `vg-ros info`."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil

import numpy as np
import pytest

from vg_ros import bag as B
from vg_ros import cli
from vg_ros import convert as C
from vg_ros.types import GridSpec

S3E_CLOUD = "/Alpha/velodyne_points"


@pytest.fixture(scope="module")
def s3e(shared_data):
    return shared_data / "bags" / "s3e_lidar_imu_camera"


def _first(path, topic):
    with B.BagReader(path) as bag:
        for _, _, t, msg in bag.messages([topic]):
            return t, msg
    raise AssertionError(f"no message on {topic}")


def test_typestore_has_jazzy_and_our_messages():
    store = B.typestore()
    assert store is B.typestore()  # cached
    for name in ("sensor_msgs/msg/PointCloud2", "nav_msgs/msg/Odometry", "tf2_msgs/msg/TFMessage",
                 "vg_ros/msg/SemanticVoxelGrid", "vg_ros/msg/GroundingTarget"):
        assert name in store.types
    fields = [f.name for f in dataclasses.fields(store.types["vg_ros/msg/SemanticVoxelGrid"]) if f.name != "__msgtype__"]
    assert fields == ["header", "origin", "resolution", "size_x", "size_y", "size_z", "semantics", "mask_camera",
                      "mask_lidar"]


def test_s3e_bag_topics_and_counts(s3e):
    with B.BagReader(s3e) as bag:
        assert bag.storage == "sqlite3"
        assert bag.topics == {
            "/Alpha/imu/data": ("sensor_msgs/msg/Imu", 14),
            "/Alpha/left_camera/compressed": ("sensor_msgs/msg/CompressedImage", 2),
            "/Alpha/right_camera/compressed": ("sensor_msgs/msg/CompressedImage", 2),
            S3E_CLOUD: ("sensor_msgs/msg/PointCloud2", 2),
        }
        assert bag.message_count == 20
        assert bag.start_ns == 1661164286607675136 and bag.end_ns == 1661164286741518843
        assert bag.duration_s == pytest.approx(0.1338437, abs=1e-6)
        times = [t for _, _, t, _ in bag.messages()]
        assert len(times) == 20 and times == sorted(times)
        with pytest.raises(ValueError, match=r"topics: \['/nope'\] not in bag"):
            list(bag.messages(["/nope"]))


def test_s3e_cloud_converts_to_finite_xyz(s3e):
    _, msg = _first(s3e, S3E_CLOUD)
    assert (msg.height, msg.width, msg.point_step) == (1800, 16, 22)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "ring", "time"]
    # the expected points, read independently with plain strided views over the raw bytes
    raw = np.asarray(msg.data).tobytes()
    n = msg.height * msg.width
    cols = [np.ndarray((n,), "<f4", raw, offset=o, strides=(22,)) for o in (0, 4, 8)]
    ref = np.stack(cols, 1)
    finite = np.isfinite(ref).all(1)
    assert 0 < finite.sum() < n  # this cloud really has NaN points (is_dense false)
    assert not msg.is_dense

    scan = C.pointcloud2_to_scan(msg)
    assert scan.xyz.dtype == np.float32 and scan.xyz.shape == (int(finite.sum()), 3) == (16719, 3)
    assert not np.isnan(scan.xyz).any()
    np.testing.assert_array_equal(scan.xyz, ref[finite])
    assert scan.frame_id == "velodyne" and scan.stamp_ns == C.stamp_of(msg)
    ring_ref = np.ndarray((n,), "<u2", raw, offset=16, strides=(22,))[finite]
    time_ref = np.ndarray((n,), "<f4", raw, offset=18, strides=(22,))[finite]
    np.testing.assert_array_equal(scan.ring, ring_ref)
    assert scan.ring.dtype == np.uint16 and set(np.unique(scan.ring)) <= set(range(16))
    np.testing.assert_array_equal(scan.time, time_ref)
    assert -0.11 < scan.time.min() < scan.time.max() < 0.01  # a 10 Hz sweep, seconds relative to the stamp
    organised = C.pointcloud2_to_structured(msg, organised=True)
    assert organised.shape == (1800, 16)


def test_corrupted_s3e_cloud_names_the_field(s3e, tmp_path):
    t, msg = _first(s3e, S3E_CLOUD)
    short = dataclasses.replace(msg, data=msg.data[:-5])
    with pytest.raises(ValueError, match=r"^data: 633595 bytes, expected height \* row_step = 1800 \* 352 = 633600"):
        C.pointcloud2_to_scan(short)
    # the same corruption written to disk and read back from a bag
    with B.BagWriter(tmp_path / "corrupt") as out:
        out.write(S3E_CLOUD, t, short)
    _, again = _first(tmp_path / "corrupt", S3E_CLOUD)
    with pytest.raises(ValueError, match="^data: 633595 bytes"):
        C.pointcloud2_to_scan(again)
    with pytest.raises(ValueError, match="^point_step: 12 bytes is smaller than field 'intensity'"):
        C.pointcloud2_to_scan(dataclasses.replace(msg, point_step=12))


def test_s3e_jpeg_decodes_to_the_right_size_and_colours(s3e):
    from PIL import Image as PILImage
    _, msg = _first(s3e, "/Alpha/left_camera/compressed")
    assert "jpeg" in msg.format
    rgb = C.decode_any_image(msg)
    ref = np.asarray(PILImage.open(io.BytesIO(np.asarray(msg.data).tobytes())).convert("RGB"))
    assert rgb.shape == ref.shape == (1024, 1224, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - ref).mean() < 2.0  # two decoders, same picture, same channel order


def test_tf_example_reads(shared_data):
    path = shared_data / "bags" / "tf_example"
    with B.BagReader(path) as bag:
        assert bag.topics == {"/tf": ("tf2_msgs/msg/TFMessage", 517), "/tf_static": ("tf2_msgs/msg/TFMessage", 1)}
        n_tf, frames = 0, set()
        for topic, _, _, msg in bag.messages():
            for ts in msg.transforms:
                T = C.transform_stamped_to_matrix(ts)
                np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-6)
                frames.add((ts.header.frame_id, ts.child_frame_id))
                n_tf += topic == "/tf"
        assert n_tf >= 517 and frames


def test_info_cli_on_s3e(s3e, capsys):
    assert cli.main(["info", str(s3e)]) == 0
    out = capsys.readouterr().out
    assert "topics:   4" in out and "sqlite3" in out
    for topic, count in ((S3E_CLOUD, 2), ("/Alpha/imu/data", 14), ("/Alpha/left_camera/compressed", 2)):
        line = next(l for l in out.splitlines() if topic in l)
        assert line.split()[-1] == str(count)
    assert cli.main(["info", str(s3e), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"path", "storage", "duration_s", "start_ns", "end_ns", "message_count", "topics"}
    assert summary["message_count"] == 20 and summary["storage"] == "sqlite3"
    assert {t["name"]: t["count"] for t in summary["topics"]} == {
        "/Alpha/imu/data": 14, "/Alpha/left_camera/compressed": 2, "/Alpha/right_camera/compressed": 2, S3E_CLOUD: 2}


def test_info_cli_rejects_non_bags(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "notes.txt", tmp_path / "missing"):
        assert cli.main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vg-ros info: error:") and "Traceback" not in err and len(err.splitlines()) == 1


def test_writer_round_trip_both_flavors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    grid = GridSpec((0.0, 0.0, 0.0), (2.0, 2.0, 1.0), 0.5)
    sem = rng.integers(0, 18, grid.shape).astype(np.uint8)
    T = np.eye(4)
    T[:3, 3] = [1, 2, 3]
    out_path = tmp_path / "drive.mcap"  # `--out drive.mcap` makes this directory
    with B.BagWriter(out_path) as out:
        out.add_topic("/tf_static", "tf2_msgs/msg/TFMessage", latched=True)
        out.add_topic("/cam/image", "sensor_msgs/Image")
        out.write("/cam/image", 100, C.array_to_image(rgb, "rgb8", stamp_ns=100, flavor="rclpy"))  # rclpy message
        out.write("/lidar/points", 150, C.xyz_fields_to_pointcloud2(xyz, {}, stamp_ns=150, flavor="rosbags"))
        out.write("/gt/occupancy", 200, C.voxel_grid_to_msg(sem, grid, 200, "base_link"))
        tf = B.typestore().types["tf2_msgs/msg/TFMessage"](
            transforms=[C.matrix_to_transform_stamped(T, 0, "base_link", "lidar", "rosbags")])
        out.write("/tf_static", 0, tf)
        with pytest.raises(ValueError, match="topic '/cam/image' has type 'sensor_msgs/msg/Image'"):
            out.write("/cam/image", 1, C.make_header(0, "", "rosbags"))
        assert out.counts == {"/tf_static": 1, "/cam/image": 1, "/lidar/points": 1, "/gt/occupancy": 1}
    assert out_path.is_dir() and (out_path / "metadata.yaml").exists()
    meta = (out_path / "metadata.yaml").read_text()
    assert "mcap" in meta and "transient_local" in meta

    with B.BagReader(out_path) as bag:
        assert bag.storage == "mcap"
        assert bag.topics["/gt/occupancy"] == ("vg_ros/msg/SemanticVoxelGrid", 1)
        got = {topic: (t, msg) for topic, _, t, msg in bag.messages()}
    assert got["/cam/image"][0] == 100
    np.testing.assert_array_equal(C.image_to_rgb(got["/cam/image"][1]), rgb)
    np.testing.assert_array_equal(C.pointcloud2_to_scan(got["/lidar/points"][1]).xyz, xyz)
    sem2, grid2, _, _ = C.msg_to_voxel_grid(got["/gt/occupancy"][1])
    np.testing.assert_array_equal(sem2, sem)
    assert grid2 == grid
    np.testing.assert_allclose(C.transform_stamped_to_matrix(got["/tf_static"][1].transforms[0]), T)

    # a single storage file reads too
    mcap_file = next(out_path.glob("*.mcap"))
    with B.BagReader(mcap_file) as bag:
        assert bag.message_count == 4


def test_an_unfinished_mcap_names_the_repair(tmp_path):
    """A recorder killed before it closed its file leaves an mcap without its end magic: the error says so
    and names the repair, as one line."""
    with B.BagWriter(tmp_path / "drive.mcap") as out:
        out.write("/lidar/points", 150, C.xyz_fields_to_pointcloud2(np.zeros((50, 3), np.float32), {}, stamp_ns=150,
                                                                    flavor="rosbags"))
    whole = next((tmp_path / "drive.mcap").glob("*.mcap")).read_bytes()
    (tmp_path / "cut.mcap").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.mcap' is not a readable rosbag2: .*magic.*mcap recover"):
        B.BagReader(tmp_path / "cut.mcap")


def test_writer_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out"
    with B.BagWriter(path) as out:
        out.write("/h", 1, C.make_header(1, "a", "rosbags"))
    with pytest.raises(ValueError, match=r"exists already; --force \(overwrite=True\) replaces it"):
        B.BagWriter(path)
    with B.BagWriter(path, overwrite=True) as out:
        out.write("/h", 2, C.make_header(2, "b", "rosbags"))
    with B.BagReader(path) as bag:
        assert bag.message_count == 1
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a rosbag2; not removing it"):
        B.BagWriter(precious, overwrite=True)
    assert (precious / "thesis.tex").exists()
    with pytest.raises(ValueError, match="msgtype: 'nope/msg/Nope' is not in the typestore"):
        with B.BagWriter(tmp_path / "x") as out:
            out.add_topic("/n", "nope/Nope")


def test_reader_learns_types_from_the_bag(tmp_path, monkeypatch):
    """A bag with our GT type opens in a reader whose typestore lacks it (the msgdef is in the bag)."""
    grid = GridSpec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5)
    with B.BagWriter(tmp_path / "gt") as out:
        out.write("/gt/occupancy", 5, C.voxel_grid_to_msg(np.ones(grid.shape, np.uint8), grid, 5, "base_link"))
    from rosbags.typesys import Stores, get_typestore
    monkeypatch.setattr(B, "typestore", lambda: get_typestore(Stores.ROS2_JAZZY))
    with B.BagReader(tmp_path / "gt") as bag:
        (_, msgtype, _, msg), = list(bag.messages())
    assert msgtype == "vg_ros/msg/SemanticVoxelGrid"
    sem, grid2, _, _ = C.msg_to_voxel_grid(msg)
    assert sem.sum() == 8 and grid2 == grid


def test_sqlite_single_file_reads(s3e, tmp_path):
    db = next(s3e.glob("*.db3"))
    copy = tmp_path / db.name
    shutil.copy(db, copy)
    with B.BagReader(copy) as bag:
        assert bag.topics[S3E_CLOUD] == ("sensor_msgs/msg/PointCloud2", 2)


def test_writer_to_an_unwritable_place_is_a_value_error_and_the_clis_exit_2(tmp_path, capsys):
    # mkdir's OSError went through `vg-ros replay --out` / `vg-ros record --out` as a traceback
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write .*file/out.mcap"):
        B.BagWriter(tmp_path / "file" / "out.mcap")
    (tmp_path / "bad.yaml").write_text("registration_node: [\n")
    code = cli.main(["replay", str(tmp_path / "no.mcap"), "--out", str(tmp_path / "o.mcap"),
                     "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "not a YAML parameters file" in err and "Traceback" not in err
