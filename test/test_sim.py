"""The simulator's acceptance tests: geometry consistency between cameras, LiDAR and occupancy; unique
referring expressions with masks inside boxes; determinism down to bag bytes; clear CLI errors."""
from __future__ import annotations

import numpy as np
import pytest

from vg_ros.geometry import invert_T, project_points, transform_points, voxel_indices
from vg_ros.sim import COLOURS, SimFrame, make_world, simulate
from vg_ros.sim.core import get_renderer
from vg_ros.sim.language import (VisibleObject, describe, descriptors, mask_box, phrase_descriptors,
                                present_descriptors, resolve, visible_objects)
from vg_ros.types import FREE_CLASS, Rig


@pytest.fixture(scope="module")
def frames() -> list[SimFrame]:
    """Two ticks of two worlds (seeds 1 and 2), one second apart."""
    out = []
    for seed in (1, 2):
        out += list(simulate(seed, 1.1, every=10, expressions=4))
    return out


def _lidar_in_base(f: SimFrame) -> np.ndarray:
    return transform_points(f.rig.lidar.T_base_lidar, f.lidar.xyz.astype(np.float64))


def test_world_is_deterministic_and_attributes_are_named():
    a, b, c = make_world(7), make_world(7), make_world(8)
    key = lambda w: [(o.kind, o.instance_id, o.colour, o.size, o.pose, o.dimensions) for o in w.objects]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    things = [o for o in a.objects if o.instance_id]
    assert len({o.instance_id for o in things}) == len(things)
    assert {o.kind for o in things} >= {"car", "truck", "pedestrian", "cyclist", "cone", "barrier", "pole"}
    assert {o.colour for o in things} <= set(COLOURS) and {o.size for o in things} == {"small", "large"}
    assert any(o.moving for o in a.objects) and any(not o.moving for o in things)
    # colour words are learnable: every pair of named colours is far apart in RGB
    rgb = np.array(list(COLOURS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=2) + np.eye(len(rgb)) * 1e3
    assert dist.min() > 90


def test_ego_drives_a_smooth_path_at_3_to_15_mps():
    w = make_world(3)
    t = np.arange(0, 60, 0.1)
    xy = np.array([w.T_odom_base(s)[:2, 3] for s in t])
    speed = np.linalg.norm(np.diff(xy, axis=0), axis=1) / 0.1
    assert 3.0 <= speed.min() and speed.max() <= 15.0
    yaw = np.unwrap([np.arctan2(w.T_odom_base(s)[1, 0], w.T_odom_base(s)[0, 0]) for s in t])
    assert np.abs(np.diff(yaw)).max() < 0.25           # no jumps in heading
    assert abs(yaw[-1] - yaw[0]) > np.pi / 2            # and it does turn


def test_frame_contents(frames):
    f = frames[0]
    rig = f.rig
    assert list(f.images) == [c.name for c in rig.cameras]
    for cam in rig.cameras:
        assert f.images[cam.name].shape == (cam.height, cam.width, 3) and f.images[cam.name].dtype == np.uint8
        assert f.depth[cam.name].dtype == np.float32 and f.instance[cam.name].dtype == np.int32
        sky = ~np.isfinite(f.depth[cam.name])
        assert sky.any() and np.all(f.semantic[cam.name][sky] == FREE_CLASS)
        assert np.all(f.semantic[cam.name][~sky] < FREE_CLASS)
    n = len(f.lidar.xyz)
    assert 15_000 < n <= rig.lidar.beams * rig.lidar.points_per_ring
    assert f.lidar.ring.dtype == np.uint16 and f.lidar.ring.max() < rig.lidar.beams
    assert f.lidar.time.dtype == np.float32 and 0 <= f.lidar.time.min() and f.lidar.time.max() < 0.1
    assert f.lidar_labels.shape == (n,) and f.lidar_instance.shape == (n,)
    assert f.occupancy.shape == (200, 200, 16) and f.mask_camera.shape == f.mask_lidar.shape == (200, 200, 16)
    assert f.stamp_ns == 1_700_000_000 * 10**9 and frames[1].stamp_ns - f.stamp_ns == 10**9
    classes = set(np.unique(f.occupancy).tolist())
    assert {11, 13, FREE_CLASS} <= classes       # road, sidewalk and free at least


def test_lidar_agrees_with_camera_depth(frames):
    for f in frames:
        pts = _lidar_in_base(f)
        for cam in f.rig.cameras:
            uv, d, ok = project_points(cam.K, invert_T(cam.T_base_cam), pts, cam.width, cam.height)
            assert ok.sum() > 500, cam.name
            pix = np.floor(uv[ok]).astype(int)
            rendered = f.depth[cam.name][pix[:, 1], pix[:, 0]]
            rel = np.abs(rendered - d[ok]) / d[ok]
            assert np.median(rel) < 0.02, (cam.name, np.median(rel))


def test_lidar_returns_fall_in_occupied_voxels_of_their_class(frames):
    for f in frames:
        idx, inside = voxel_indices(_lidar_in_base(f), f.grid)
        occ = f.occupancy[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        assert (occ == f.lidar_labels[inside]).mean() >= 0.95
        # every return's voxel was reached by the LiDAR; most are also seen by some camera
        assert f.mask_lidar[idx[inside, 0], idx[inside, 1], idx[inside, 2]].all()
        assert f.mask_camera[idx[inside, 0], idx[inside, 1], idx[inside, 2]].mean() > 0.5


def test_solid_objects_and_masks(frames):
    f = frames[0]
    world, _ = get_renderer(1, f.rig)
    T_base_odom = invert_T(f.T_odom_base)
    # a static car near the ego is a solid block: its centre voxel (at half height) is a car voxel
    checked = 0
    for o in world.objects:
        if o.kind == "car" and not o.moving:
            c = transform_points(T_base_odom, np.array([[o.pose[0], o.pose[1], 0.55]]))
            idx, inside = voxel_indices(c, f.grid)
            if inside[0] and np.abs(c[0, :2]).max() < 30:
                assert f.occupancy[tuple(idx[0])] == 4
                checked += 1
    assert checked > 0
    # free voxels ahead of the ego are observed; voxels below the road are not
    assert f.mask_camera[112, 100, 5] and f.mask_lidar[112, 100, 5]   # 5 m ahead, 1 m up
    assert not f.mask_camera[100, 100, 0] and not f.mask_lidar[100, 100, 0]


def test_expressions_are_unique_and_masks_lie_in_boxes(frames):
    hops = []
    for f in frames:
        world, _ = get_renderer(1 if f is frames[0] or f is frames[1] else 2, f.rig)
        assert 1 <= len(f.expressions) <= 4
        for e in f.expressions:
            objs = visible_objects(world, f.instance[e.camera], f.depth[e.camera])
            assert resolve(objs, e.text) == [e.instance_id], e.text
            # the target's (kind, colour, size) is present, and the target noun phrase admits it
            present = present_descriptors(world, f.instance[e.camera])
            target = next(o for o in objs if o.instance_id == e.instance_id)
            own = descriptors().index((target.kind, target.colour, target.size))
            assert present[own] and phrase_descriptors(e.text)[own], e.text
            ys, xs = np.nonzero(e.mask)
            assert xs.size >= 150
            assert xs.min() >= e.box[0] and xs.max() < e.box[2] and ys.min() >= e.box[1] and ys.max() < e.box[3]
            assert np.array_equal(e.mask, f.instance[e.camera] == e.instance_id) and e.stamp_ns == f.stamp_ns
            hops.append(e.hops)
    assert set(hops) >= {0, 1}


def test_descriptors_of_images_and_phrases():
    world = make_world(3)
    car = next(o for o in world.objects if o.kind == "car" and o.instance_id)
    instance = np.zeros((20, 30), np.int32)
    instance[4, 7] = car.instance_id          # a single pixel is enough to be present
    present = present_descriptors(world, instance)
    assert present.sum() == 1 and descriptors()[int(np.argmax(present))] == (car.kind, car.colour, car.size)
    assert not present_descriptors(world, np.zeros((20, 30), np.int32)).any()
    names = descriptors()
    picked = lambda text: {names[i] for i in np.flatnonzero(phrase_descriptors(text))}  # noqa: E731
    assert picked("the large red car left of the bus") == {("car", "red", "large")}
    assert picked("the nearest person") == {d for d in names if d[0] == "pedestrian"}
    assert picked("the small post behind the red truck") == {d for d in names if d[0] == "pole" and d[2] == "small"}
    with pytest.raises(ValueError):
        phrase_descriptors("a red car")


def _obj(iid, kind, colour, size, cx, depth):
    return VisibleObject(iid, kind, colour, size, 500, np.array([cx - 10, 50, cx + 10, 80.0]), cx, depth)


def test_language_relations_and_mixture():
    objs = [_obj(1, "car", "red", "small", 100, 10), _obj(2, "car", "red", "small", 300, 20),
            _obj(3, "pedestrian", "blue", "large", 200, 15), _obj(4, "cone", "orange", "small", 400, 8)]
    rng = np.random.default_rng(0)
    seen_hops = []
    for _ in range(200):
        for target in objs:
            res = describe(objs, target, rng)
            assert res is not None
            text, hops = res
            assert resolve(objs, text) == [target.instance_id], text
            seen_hops.append(hops)
    frac = np.bincount(seen_hops, minlength=3) / len(seen_hops)
    assert abs(frac[0] - 0.4) < 0.1 and abs(frac[1] - 0.4) < 0.1 and abs(frac[2] - 0.2) < 0.1
    # the two red cars are told apart only by a relation or a superlative
    assert resolve(objs, "the red car") == [1, 2]
    assert resolve(objs, "the red car to the left of the person") == [1]
    assert resolve(objs, "the farthest red vehicle") == [2]
    assert resolve(objs, "the automobile behind the man walking") == [2]
    assert mask_box(np.zeros((4, 4), bool)).tolist() == [0, 0, 0, 0]


def test_relation_negative_turns_the_relation_only_where_nothing_fits():
    from vg_ros.sim.language import relation_negative
    objs = [_obj(1, "car", "red", "small", 100, 10), _obj(2, "car", "red", "small", 300, 20),
            _obj(3, "pedestrian", "blue", "large", 200, 15), _obj(4, "cone", "orange", "small", 400, 8)]
    rng = np.random.default_rng(0)
    # the cone is right of the person and nearer: turned around, nothing is left of it / behind it
    negative = relation_negative(objs, "the cone right of the person", rng)
    assert negative.startswith("the cone ") and "left" in negative and negative.endswith(" the person")
    assert resolve(objs, negative) == []
    negative = relation_negative(objs, "the orange cone in front of the person", rng)
    assert negative.startswith("the orange cone ") and negative.endswith(" the person")
    assert any(word in negative for word in ("behind", "farther", "further")) and resolve(objs, negative) == []
    # the red car left of the person turned around names the other red car: no negative
    assert relation_negative(objs, "the red car to the left of the person", rng) is None
    assert relation_negative(objs, "the red car", rng) is None                       # zero-hop
    assert relation_negative(objs, "the cone right of the red car", rng) is None      # anchor not unique


def test_flags_skip_work_and_arrays_repeat():
    rig = Rig.load("default")
    a = next(simulate(4, 0.1, rig, cameras=False, occupancy=False, expressions=0))
    assert a.images == {} and a.occupancy is None and a.lidar is not None and a.expressions == []
    b = next(simulate(4, 0.1, rig, lidar=False, occupancy=False, expressions=0))
    assert b.lidar is None and len(b.images) == 6
    c = next(simulate(4, 0.1, rig, lidar=False, occupancy=False, expressions=0))
    assert all(np.array_equal(b.images[k], c.images[k]) for k in b.images)
    d = next(simulate(4, 0.1, rig, cameras=False, occupancy=False, expressions=0))
    assert np.array_equal(a.lidar.xyz, d.lidar.xyz) and np.array_equal(a.lidar.intensity, d.lidar.intensity)
    late = next(simulate(4, 0.1, rig, start_s=2.0, cameras=False, occupancy=False, expressions=0))
    assert late.stamp_ns == a.stamp_ns + 2 * 10**9 and late.tick == 20
    with pytest.raises(ValueError, match="seconds"):
        next(simulate(4, -1.0))
    with pytest.raises(ValueError, match="every"):
        next(simulate(4, 1.0, every=0))


def test_lidar_motion_fires_each_column_from_the_vehicle_at_its_time():
    """`lidar_motion`: each azimuth column is measured from where the vehicle is at the column's `time`, so
    the sweep is bent by the ego motion (up to the distance driven in one period); moved by each column's
    pose into the LiDAR frame at the stamp it is the world again, and deskewing it with the true motion over
    the sweep does the same to within millimetres. The first column is the instantaneous sweep's."""
    from vg_ros.registration.odometry import deskew
    rig = Rig.load("default")
    still = list(simulate(5, 0.3, rig, cameras=False, occupancy=False, expressions=0))[-1]
    moving = list(simulate(5, 0.3, rig, cameras=False, occupancy=True, expressions=0, lidar_motion=True))[-1]
    world, renderer = get_renderer(5, rig)
    T_lidar = lambda t: world.T_odom_base(t) @ rig.lidar.T_base_lidar   # noqa: E731
    poses = renderer.lidar_column_poses(moving.t)
    assert poses.shape == (rig.lidar.points_per_ring, 4, 4) and np.allclose(poses[0], T_lidar(moving.t))
    column = np.rint(moving.lidar.time.astype(np.float64) * rig.lidar.rate_hz * len(poses)).astype(int)
    T_stamp_col = invert_T(T_lidar(moving.t))[None] @ poses[column]
    exact = np.einsum("nij,nj->ni", T_stamp_col[:, :3, :3], moving.lidar.xyz) + T_stamp_col[:, :3, 3]
    bend = np.linalg.norm(moving.lidar.xyz - exact, axis=1)
    speed = np.linalg.norm(T_lidar(moving.t + 0.1)[:3, 3] - T_lidar(moving.t)[:3, 3]) / 0.1
    assert speed > 5 and bend.max() == pytest.approx(speed * 0.1, rel=0.1) and np.median(bend) > 0.3 * speed * 0.1
    delta = invert_T(T_lidar(moving.t)) @ T_lidar(moving.t + 0.1)
    undone = deskew(moving.lidar.xyz.astype(np.float64), moving.lidar.time, delta, 0.1)
    assert np.median(np.linalg.norm(undone - exact, axis=1)) < 0.005
    first = column == 0
    assert np.allclose(moving.lidar.xyz[first], still.lidar.xyz[still.lidar.time == 0], atol=1e-4)
    # the ground truth is at the stamp: each return, where it is in the world, lies in a voxel of its class
    # that the LiDAR mask marks (not where the bent sweep would put it)
    right = []
    for points in (exact, moving.lidar.xyz.astype(np.float64)):
        idx, inside = voxel_indices(transform_points(rig.lidar.T_base_lidar, points), moving.grid)
        right.append((moving.occupancy[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
                      == moving.lidar_labels[inside]).mean())
        if len(right) == 1:
            assert moving.mask_lidar[idx[inside, 0], idx[inside, 1], idx[inside, 2]].all()
    assert right[0] >= 0.95 and right[1] < right[0] - 0.02   # the bent sweep lands in wrong voxels
