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
