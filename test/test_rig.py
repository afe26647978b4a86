"""Rig files: the default rig's geometry, and clear errors for broken rigs."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from vg_ros.geometry import invert_T, project_points
from vg_ros.types import Rig


def test_default_rig_layout():
    rig = Rig.load("default")
    assert [c.name for c in rig.cameras][:3] == ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT"]
    assert len(rig.cameras) == 6 and rig.lidar.beams == 32 and rig.lidar.rate_hz == 10.0
    # A point 10 m ahead of the car is seen by the front camera at the image centre row, and
    # a point 10 m to the left lands in the front-left camera, not the front-right one.
    ahead = np.array([[12.0, 0.0, 1.55]])
    front = rig.camera("CAM_FRONT")
    uv, _, valid = project_points(front.K, invert_T(front.T_base_cam), ahead, front.width, front.height)
    assert valid[0] and abs(uv[0, 0] - front.K[0, 2]) < 1e-6
    left = np.array([[3.0, 10.0, 1.5]])
    for name, expect in (("CAM_FRONT_LEFT", True), ("CAM_FRONT_RIGHT", False)):
        cam = rig.camera(name)
        assert project_points(cam.K, invert_T(cam.T_base_cam), left, cam.width, cam.height)[2][0] == expect


def test_scaled_camera_keeps_rays():
    cam = Rig.load("default").camera("CAM_FRONT")
    half = cam.scaled(cam.width // 2, cam.height // 2)
    p = np.array([[10.0, 1.0, 2.0]])
    uv_full = project_points(cam.K, invert_T(cam.T_base_cam), p, cam.width, cam.height)[0]
    uv_half = project_points(half.K, invert_T(half.T_base_cam), p, half.width, half.height)[0]
    np.testing.assert_allclose(uv_half, uv_full / 2)


def test_unknown_rig_names_known_ones():
    with pytest.raises(ValueError, match=r"unknown rig 'nope'.*default"):
        Rig.load("nope")


@pytest.mark.parametrize("patch, match", [
    ({"cameras": [{"name": "A", "width": 10, "height": 10, "fx": 0, "fy": 5, "xyz": [0, 0, 0]}]}, "positive"),
    ({"cameras": [{"name": "A", "width": 10, "height": 10, "fx": 5, "fy": 5}]}, "needs `xyz`"),
    ({"lidar": {"beams": 0, "xyz": [0, 0, 0]}}, "beams >= 1"),
])
def test_broken_rig_files(tmp_path, patch, match):
    data = yaml.safe_load(open(Rig.config_dir() / "rig_default.yaml"))
    data.update(patch)
    path = tmp_path / "rig_broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=match):
        Rig.load(path)
