"""Occupancy pipeline: input checks, resizing with scaled intrinsics, missing cameras, the BEV grid, checkpoints,
and the real nuScenes sample end to end (calibration checked by projecting its LiDAR with our geometry)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vg_ros.geometry import invert_T, project_points
from vg_ros.occupancy.cli import load_frame_dir, load_lidar
from vg_ros.occupancy.cli import main as occupancy_cli
from vg_ros.occupancy.model import TPVFormer, model_config
from vg_ros.occupancy.pipeline import (OccupancyConfig, OccupancyPipeline, bev_occupancy, load_checkpoint,
                                       save_checkpoint)
from vg_ros.types import FREE_CLASS, CameraFrame, GridSpec, OccupancyResult, Rig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return OccupancyPipeline(OccupancyConfig(model="tiny"), weights="random", device="cpu")


def _frames(scale: float = 1.0, names=None):
    rig = Rig.load("default")
    rng = np.random.default_rng(0)
    frames = []
    for cam in rig.cameras:
        if names and cam.name not in names:
            continue
        cam = cam.scaled(int(cam.width * scale), int(cam.height * scale))
        frames.append(CameraFrame(cam, rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)))
    return frames


def test_infer_returns_grid_with_confidence_and_observed(pipe):
    res = pipe.infer(_frames(), stamp_ns=123)
    assert res.stamp_ns == 123 and res.semantics.shape == (200, 200, 16) == res.confidence.shape == res.observed.shape
    assert res.semantics.dtype == np.uint8 and res.semantics.max() <= FREE_CLASS
    assert np.all((res.confidence >= 1 / 18 - 1e-6) & (res.confidence <= 1))
    assert 0.5 < res.observed.mean() < 1.0  # six surround cameras see most of the grid, not above/below them
    # voxels wholly below the ground (ground_z 0: layers [-1.0, -0.6] and [-0.6, -0.2]) project into the
    # images but no camera sees them: unobserved, so never published as occupied
    assert not res.observed[:, :, :2].any() and res.observed[:, :, 2].any()


def test_any_image_size_is_resized_with_intrinsics(pipe):
    # The same views at 480x270 and 960x540 reach the model as (nearly) the same input.
    small = _frames(1.0)
    large = [CameraFrame(f.camera.scaled(960, 540), np.repeat(np.repeat(f.image, 2, 0), 2, 1)) for f in small]
    a, b = pipe.logits(small), pipe.logits(large)
    assert (a.argmax(0) == b.argmax(0)).float().mean() > 0.95
    np.testing.assert_array_equal(pipe.infer(small, 0).observed, pipe.infer(large, 0).observed)


def test_missing_cameras_leave_their_sector_unobserved(pipe):
    full = pipe.infer(_frames(), 0)
    front = pipe.infer(_frames(names={"CAM_FRONT"}), 0)
    assert front.observed.sum() < 0.3 * full.observed.sum()
    assert front.observed[150:, 95:105].any() and not front.observed[:90].any()  # +x seen, behind not
    grid, _, _ = bev_occupancy(front, 0.2, 2.0)
    assert np.all(grid[:, :90] == -1)  # columns = x cells: everything behind the car is unknown


@pytest.mark.parametrize("breakage, message", [
    (lambda f: setattr(f, "image", f.image[:, :, 0]), "uint8 RGB"),
    (lambda f: setattr(f, "image", f.image.astype(np.float32)), "uint8 RGB"),
    (lambda f: setattr(f, "image", f.image[:100]), "calibration is for 480x270"),
    (lambda f: f.camera.K.__setitem__((0, 0), 0.0), "focal length"),
    (lambda f: f.camera.T_base_cam.__setitem__((0, 3), np.nan), "NaN extrinsic"),
])
def test_bad_input_raises_naming_the_camera(pipe, breakage, message):
    frames = _frames(names={"CAM_FRONT", "CAM_BACK"})
    breakage(frames[1])
    with pytest.raises(ValueError, match=message) as info:
        pipe.infer(frames, 0)
    assert "CAM_BACK" in str(info.value)
    with pytest.raises(ValueError, match="no camera frames"):
        pipe.infer([], 0)


def test_bev_occupancy_layout_and_values():
    grid = GridSpec((-2.0, -1.0, -1.0), (2.0, 1.0, 3.0), 1.0)  # X=4, Y=2, Z=4; layer centres -0.5, 0.5, 1.5, 2.5
    sem = np.full(grid.shape, FREE_CLASS, np.uint8)
    observed = np.ones(grid.shape, bool)
    sem[3, 1, 1] = 4  # a car at x=1.5, y=0.5, z=0.5: in the band
    sem[0, 0, 0] = 11  # road at z=-0.5: below the band
    observed[1, :, :] = False  # x cell 1 unseen
    observed[2, 0, 1:3] = False  # seen only outside the band
    res = OccupancyResult(0, grid, sem, np.ones(grid.shape, np.float32), observed)
    bev, origin_T, resolution = bev_occupancy(res, 0.0, 2.0)
    assert bev.shape == (2, 4) and bev.dtype == np.int8 and resolution == 1.0
    assert bev.tolist() == [[0, -1, -1, 0], [0, -1, 0, 100]]  # rows = y cells, columns = x cells
    np.testing.assert_allclose(origin_T[:3, 3], [-2.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="no voxel layer"):
        bev_occupancy(res, 5.0, 6.0)
    with pytest.raises(ValueError, match="z_max"):
        OccupancyConfig(z_min=1.0, z_max=0.5)


def test_checkpoint_round_trip(tmp_path):
    cfg = model_config("tiny")
    model = TPVFormer(cfg)
    save_checkpoint(model, tmp_path / "w.safetensors", {"steps": 3})
    loaded, meta = load_checkpoint(tmp_path / "w.safetensors")
    assert meta["steps"] == "3" and loaded.cfg == cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ real nuScenes sample


@pytest.fixture(scope="module")
def nuscenes(shared_data):
    return shared_data / "occupancy" / "nuscenes_sample"


def test_nuscenes_lidar_projects_into_images_as_calibrated(nuscenes):
    frames = load_frame_dir(nuscenes)
    points, T_ego_lidar = load_lidar(nuscenes)
    calib = json.loads((nuscenes / "calib.json").read_text())
    assert len(frames) == 6 and len(points) == 34688
    for frame in frames:
        cam, entry = frame.camera, calib["cameras"][frame.camera.name]
        assert (cam.width, cam.height) == (1600, 900) and frame.image.shape == (900, 1600, 3)
        T_cam_lidar = np.asarray(entry["lidar2cam"])
        uv, depth, valid = project_points(cam.K, T_cam_lidar, points, cam.width, cam.height)
        assert 3000 <= valid.sum() <= 5000, (cam.name, int(valid.sum()))
        # Our projection agrees with the dataset's own lidar2img to a fraction of a pixel.
        hom = np.c_[points[valid], np.ones(valid.sum())] @ np.asarray(entry["lidar2img"]).T
        np.testing.assert_allclose(hom[:, :2] / hom[:, 2:3], uv[valid], atol=0.5)
        # The pipeline uses cam2ego; going through the ego frame differs from lidar2cam only by the ego
        # motion between the camera's and the LiDAR's timestamps (nuScenes compensates it): a steady speed.
        D = T_cam_lidar @ invert_T(invert_T(cam.T_base_cam) @ T_ego_lidar)
        dt = abs(entry["timestamp"] - calib["timestamp"])
        assert np.degrees(np.arccos(np.clip((np.trace(D[:3, :3]) - 1) / 2, -1, 1))) < 0.1
        assert np.linalg.norm(D[:3, 3]) <= 10.0 * dt + 0.01, cam.name  # < 10 m/s, as in the drive


def test_nuscenes_end_to_end_cli_writes_bev_png(nuscenes, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "bev.png"
    assert occupancy_cli([str(nuscenes), "--json", "--png", str(out), "--weights", "random"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cameras"] == ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT",
                               "CAM_BACK_RIGHT"]
    assert info["grid"]["shape"] == [200, 200, 16] and info["observed_fraction"] > 0.5
    png = np.asarray(Image.open(out))
    assert png.shape == (400, 400, 3)


def test_cli_reports_bad_folders_as_user_errors(tmp_path):
    from vg_ros.cli import UserError
    with pytest.raises(UserError, match="no calib.json"):
        occupancy_cli([str(tmp_path)])
    (tmp_path / "calib.json").write_text(json.dumps({"cameras": {"CAM_FRONT": {"img_path": "x.jpg"}}}))
    with pytest.raises(UserError, match="cannot read image"):
        occupancy_cli([str(tmp_path)])
    for entry, needle in ((5, "must be a mapping"), ({"img_path": 5}, "missing `img_path`")):
        (tmp_path / "calib.json").write_text(json.dumps({"cameras": {"CAM_FRONT": entry}}))
        with pytest.raises(UserError, match=needle):
            occupancy_cli([str(tmp_path)])
    with pytest.raises(UserError, match="unknown image extension"):
        occupancy_cli([str(tmp_path), "--png", str(tmp_path / "bev.xyz")])


def test_cli_refuses_a_calibration_made_for_another_image_size(nuscenes, tmp_path):
    """Images rescaled without their K (and no width/height in calib.json): the principal point falls outside
    the image; refused with the reason instead of an occupancy grid from wrong rays."""
    from PIL import Image
    from vg_ros.cli import UserError
    calib = json.loads((nuscenes / "calib.json").read_text())
    for name, entry in calib["cameras"].items():
        image = Image.open(nuscenes / entry["img_path"])
        image.resize((image.width // 2, image.height // 2)).save(tmp_path / Path(entry["img_path"]).name)
        entry["img_path"] = Path(entry["img_path"]).name
        entry.pop("width", None)
        entry.pop("height", None)
    (tmp_path / "calib.json").write_text(json.dumps(calib))
    with pytest.raises(UserError, match="principal point .* lies outside the 800x450 image"):
        occupancy_cli([str(tmp_path), "--weights", "random"])


@pytest.mark.parametrize("model,D", [("plumb_bob", [-0.3, 0.08, 0.001, -0.001, 0.0]),
                                     ("equidistant", [0.0, 0.0, 0.0, 0.0]),   # a fisheye even without coefficients
                                     ("equidistant", [-0.05, 0.01, 0.002, -0.001])])
def test_a_distorted_camera_is_rectified_to_its_pinhole_before_the_network(model, D):
    """The network projects with a pinhole: a frame from a lens with distortion is resampled so that a
    3D point appears where the pinhole puts it (and the camera handed on has no distortion)."""
    import cv2

    from vg_ros.occupancy.pipeline import pinhole, prepare_inputs, rectified
    from vg_ros.types import CameraFrame, CameraModel
    K = np.array([[260.0, 0, 160], [0, 260.0, 120], [0, 0, 1]])
    cam = CameraModel("c", 320, 240, K, np.eye(4), "c", np.array(D), model)
    points = np.array([[1.5, 1.0, 4.0], [-1.8, -0.9, 5.0], [1.6, -1.1, 5.0], [-1.0, 1.2, 4.5]])   # off centre
    raw = np.zeros((240, 320, 3), np.uint8)
    seen, _, valid = project_points(K, np.eye(4), points, 320, 240, distortion=D, distortion_model=model)
    assert valid.all()
    for u, v in seen:
        cv2.circle(raw, (int(round(u - 0.5)), int(round(v - 0.5))), 2, (255, 255, 255), -1)
    out = rectified(CameraFrame(cam, raw, 7))
    assert not out.camera.distorted and out.stamp_ns == 7 and out.image.shape == raw.shape
    ideal, _, _ = project_points(K, np.eye(4), points, 320, 240)
    for (u, v), (su, sv) in zip(ideal, seen):
        assert np.hypot(u - su, v - sv) > 3                      # the lens moved it ...
        r0, c0 = int(v) - 8, int(u) - 8
        window = out.image[r0:r0 + 17, c0:c0 + 17, 0].astype(float)
        rows, cols = np.nonzero(window > 60)
        weights = window[rows, cols]
        centre = (c0 + (cols * weights).sum() / weights.sum() + 0.5, r0 + (rows * weights).sum() / weights.sum() + 0.5)
        assert np.hypot(centre[0] - u, centre[1] - v) < 1.0    # ... and rectification puts it back
    plain = CameraFrame(pinhole(cam), raw)
    assert rectified(plain) is plain
    images, cams = prepare_inputs([CameraFrame(cam, raw)], (160, 120))
    assert not cams[0].distorted and images.shape == (1, 3, 120, 160)
