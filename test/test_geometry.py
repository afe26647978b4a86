"""SE(3), quaternion, projection and voxel helpers: property tests against their definitions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vg_ros.geometry import (R_BODY_OPTICAL, R_to_quat, R_to_rpy, invert_T, make_T, project_points, quat_to_R,
                             rotation_angle_deg, rpy_to_R, transform_points, voxel_centers, voxel_indices)
from vg_ros.types import GridSpec

angles = st.floats(-np.pi + 1e-3, np.pi - 1e-3)
pitches = st.floats(-np.pi / 2 + 1e-2, np.pi / 2 - 1e-2)
coords = st.floats(-100, 100)


@given(angles, pitches, angles)
def test_rpy_roundtrip_and_orthonormal(roll, pitch, yaw):
    R = rpy_to_R(roll, pitch, yaw)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    np.testing.assert_allclose(rpy_to_R(*R_to_rpy(R)), R, atol=1e-9)


@given(angles, pitches, angles)
def test_quaternion_roundtrip(roll, pitch, yaw):
    R = rpy_to_R(roll, pitch, yaw)
    q = R_to_quat(R)
    assert np.linalg.norm(q) == pytest.approx(1.0)
    assert q[3] >= 0
    np.testing.assert_allclose(quat_to_R(q), R, atol=1e-9)


def test_zero_quaternion_is_an_error():
    with pytest.raises(ValueError, match="quaternion"):
        quat_to_R([0, 0, 0, 0])


@given(angles, pitches, angles, coords, coords, coords)
@settings(max_examples=50)
def test_invert_and_transform(roll, pitch, yaw, x, y, z):
    T = make_T(rpy_to_R(roll, pitch, yaw), [x, y, z])
    np.testing.assert_allclose(T @ invert_T(T), np.eye(4), atol=1e-9)
    pts = np.random.default_rng(0).normal(size=(20, 3))
    np.testing.assert_allclose(transform_points(invert_T(T), transform_points(T, pts)), pts, atol=1e-9)


def test_rotation_angle():
    assert rotation_angle_deg(rpy_to_R(0, 0, np.radians(30))) == pytest.approx(30.0)
    assert rotation_angle_deg(np.eye(3)) == 0.0


def test_projection_of_points_ahead_and_behind():
    K = np.array([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]])
    T_cam_x = np.eye(4)
    uv, depth, valid = project_points(K, T_cam_x, np.array([[0, 0, 10.0], [1, -2, 10.0], [0, 0, -5.0], [100, 0, 1.0]]),
                                      width=100, height=80)
    np.testing.assert_allclose(uv[0], [50, 40])
    np.testing.assert_allclose(uv[1], [60, 20])
    np.testing.assert_allclose(depth[:3], [10, 10, -5])
    assert valid.tolist() == [True, True, False, False]


def test_body_optical_rotation_looks_forward():
    # The optical z axis (viewing direction) is the body x axis; optical x (right) is body -y.
    np.testing.assert_allclose(R_BODY_OPTICAL @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(R_BODY_OPTICAL @ [1, 0, 0], [0, -1, 0])


def test_voxel_indices_and_centres_agree():
    grid = GridSpec()
    assert grid.shape == (200, 200, 16)
    centres = voxel_centers(grid)
    assert centres.shape == (200, 200, 16, 3)
    picks = np.array([[0, 0, 0], [199, 199, 15], [100, 37, 5]])
    pts = centres[picks[:, 0], picks[:, 1], picks[:, 2]]
    idx, inside = voxel_indices(pts, grid)
    assert inside.all()
    np.testing.assert_array_equal(idx, picks)
    _, inside = voxel_indices(np.array([[40.01, 0, 0], [0, 0, -1.01]]), grid)
    assert not inside.any()


DISTORTIONS = [("plumb_bob", [-0.3, 0.1, 0.001, -0.002, 0.02]), ("plumb_bob", [-0.3, 0.1, 0.001, -0.002]),
               ("", [-0.25, 0.05, 0.0, 0.001, 0.0]),
               ("rational_polynomial", [0.2, -0.1, 0.001, 0.002, 0.01, 0.3, -0.05, 0.02]),
               ("equidistant", [0.1, -0.02, 0.003, -0.001])]


@pytest.mark.parametrize("model,D", DISTORTIONS)
def test_lens_distortion_projects_as_opencv(model, D):
    import cv2
    rng = np.random.default_rng(0)
    K = np.array([[400.0, 0, 320], [0, 410.0, 240], [0, 0, 1]])
    pts = np.c_[rng.uniform(-3, 3, (500, 2)), rng.uniform(2, 10, 500)]
    uv, depth, valid = project_points(K, np.eye(4), pts, 640, 480, distortion=D, distortion_model=model)
    if model == "equidistant":
        ref, _ = cv2.fisheye.projectPoints(pts[None], np.zeros(3), np.zeros(3), K, np.array(D))
    else:
        ref, _ = cv2.projectPoints(pts, np.zeros(3), np.zeros(3), K, np.array(D))
    np.testing.assert_allclose(uv, ref.reshape(-1, 2), atol=1e-9)
    np.testing.assert_array_equal(depth, pts[:, 2])
    assert 0 < valid.sum() < len(pts)


def test_distortion_none_or_zero_is_the_pinhole_and_bad_models_are_named():
    K = np.array([[400.0, 0, 320], [0, 400.0, 240], [0, 0, 1]])
    pts = np.array([[1.0, 0.5, 4.0], [-2.0, 1.0, 5.0]])
    plain = project_points(K, np.eye(4), pts, 640, 480)
    for D, model in (((), ""), (np.zeros(5), "plumb_bob"), (np.zeros(8), "rational_polynomial")):
        for a, b in zip(project_points(K, np.eye(4), pts, 640, 480, distortion=D, distortion_model=model), plain):
            np.testing.assert_array_equal(a, b)
    # a fisheye bends rays even with zero coefficients (r = theta, not tan theta), as OpenCV's fisheye model
    import cv2
    fisheye, _, _ = project_points(K, np.eye(4), pts, 640, 480, distortion=np.zeros(4), distortion_model="equidistant")
    ref, _ = cv2.fisheye.projectPoints(pts[None], np.zeros(3), np.zeros(3), K, np.zeros(4))
    np.testing.assert_allclose(fisheye, ref.reshape(-1, 2), atol=1e-9)
    assert np.abs(fisheye - plain[0]).max() > 5
    # strong barrel distortion folds a point far outside the view back into the image: it stays invalid
    far_left = np.array([[-20.0, 0.0, 10.0]])   # x/z = -2: the polynomial maps it to x/z = +0.4
    uv, _, valid = project_points(K, np.eye(4), far_left, 640, 480, distortion=[-0.3, 0.0, 0, 0, 0],
                                  distortion_model="plumb_bob")
    assert 0 <= uv[0, 0] < 640 and not valid[0]
    from vg_ros.geometry import check_distortion
    with pytest.raises(ValueError, match="distortion_model 'kannala' is not supported"):
        check_distortion([0.1, 0, 0, 0], "kannala")
    with pytest.raises(ValueError, match="'equidistant': 5 coefficients, expected 4"):
        check_distortion(np.zeros(5), "equidistant")
