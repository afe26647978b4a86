"""Sensor rendering for the simulator: triangle meshes of the world, Open3D `RaycastingScene` casts for the
cameras (all pixels of all cameras in one cast) and the LiDAR (one cast), and Occ3D-style occupancy ground
truth with camera and LiDAR visibility masks.

A LiDAR sweep is cast at the tick's instant by default (each point still carries its nominal firing `time`
within the sweep); with `lidar_motion` each azimuth column is fired from where the vehicle is at that column's
time, as a spinning LiDAR on a moving vehicle measures (the sweep is distorted by the ego motion, up to the
distance driven in one period at its end: 1 m at 10 m/s and 10 Hz), while the scene's moving objects stay
where they are at the tick.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import open3d as o3d

from vg_ros.geometry import invert_T
from vg_ros.sim.world import CLS, CURB_HEIGHT, ROAD_HALF_WIDTH, STUFF_RGB, Part, SimObject, World
from vg_ros.types import FREE_CLASS, GridSpec, LidarScan, Rig

SKY_CLASS = FREE_CLASS  # semantic id of pixels that hit nothing
SUN = np.array([0.45, 0.3, 0.84]) / np.linalg.norm([0.45, 0.3, 0.84])
# Texture noise amplitude per class (fraction of brightness), so surfaces are not flat colour.
TEXTURE_AMPLITUDE = np.full(18, 0.04, np.float32)
TEXTURE_AMPLITUDE[[CLS["driveable_surface"], CLS["sidewalk"], CLS["other_flat"]]] = 0.07
TEXTURE_AMPLITUDE[CLS["terrain"]] = 0.16
TEXTURE_AMPLITUDE[CLS["vegetation"]] = 0.2
TEXTURE_AMPLITUDE[CLS["manmade"]] = 0.06
# LiDAR reflectivity per class (cones and barriers are retro-reflective).
REFLECTIVITY = np.full(18, 0.3, np.float32)
REFLECTIVITY[[CLS["traffic_cone"], CLS["barrier"]]] = 0.9
REFLECTIVITY[[CLS["car"], CLS["truck"], CLS["bus"]]] = 0.5
REFLECTIVITY[[CLS["driveable_surface"]]] = 0.15
REFLECTIVITY[[CLS["vegetation"], CLS["terrain"]]] = 0.35
SEAM = 0.4  # depth slack (m) when deciding that a voxel lies before the first hit of a ray


# ----------------------------------------------------------------------------------------------------------
# meshes


def _box_mesh(center, half) -> tuple[np.ndarray, np.ndarray]:
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    v = center + signs * half
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return v, f


def _cyl_mesh(bottom, r0, r1, h, seg=8) -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(seg) * 2 * np.pi / seg
    ring = np.stack([np.cos(a), np.sin(a), np.zeros(seg)], 1)
    v = np.concatenate([bottom + ring * [r0, r0, 0], bottom + ring * [r1, r1, 0] + [0, 0, h],
                        [bottom, bottom + [0, 0, h]]])
    f = []
    for i in range(seg):
        j = (i + 1) % seg
        f += [[i, j, seg + j], [i, seg + j, seg + i], [2 * seg, j, i], [2 * seg + 1, seg + i, seg + j]]
    return v, np.array(f)


def _sphere_mesh(center, r, n_lat=5, n_lon=8) -> tuple[np.ndarray, np.ndarray]:
    verts = [center + [0, 0, r]]
    for i in range(1, n_lat):
        th = np.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * np.pi * j / n_lon
            verts.append(center + r * np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)]))
    verts.append(center - [0, 0, r])
    f = []
    for j in range(n_lon):
        f.append([0, 1 + j, 1 + (j + 1) % n_lon])
    for i in range(n_lat - 2):
        for j in range(n_lon):
            a, b = 1 + i * n_lon + j, 1 + i * n_lon + (j + 1) % n_lon
            f += [[a, a + n_lon, b + n_lon], [a, b + n_lon, b]]
    last = len(verts) - 1
    base = 1 + (n_lat - 2) * n_lon
    for j in range(n_lon):
        f.append([base + j, last, base + (j + 1) % n_lon])
    return np.array(verts), np.array(f)


def part_mesh(part: Part) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) of one part in the object frame."""
    if part.shape == "box":
        return _box_mesh(part.center, part.half)
    if part.shape == "cyl":
        seg = 6 if max(part.half[:2]) < 0.2 else 8
        return _cyl_mesh(part.center, part.half[0], part.half[1], part.half[2], seg)
    if part.shape == "sphere":
        return _sphere_mesh(part.center, part.half[0])
    raise ValueError(f"part.shape: unknown {part.shape!r}")


@dataclass
class MeshSet:
    """Triangles with per-triangle attributes: `verts` (V, 3) float32, `tris` (F, 3) uint32, `rgb` (F, 3)
    float32 0..1, `cls` (F,) uint8, `inst` (F,) int32."""

    verts: np.ndarray
    tris: np.ndarray
    rgb: np.ndarray
    cls: np.ndarray
    inst: np.ndarray

    @staticmethod
    def concat(sets: list["MeshSet"]) -> "MeshSet":
        offs = np.cumsum([0] + [len(s.verts) for s in sets[:-1]])
        return MeshSet(np.concatenate([s.verts for s in sets]).astype(np.float32),
                       np.concatenate([s.tris + o for s, o in zip(sets, offs)]).astype(np.uint32),
                       np.concatenate([s.rgb for s in sets]).astype(np.float32),
                       np.concatenate([s.cls for s in sets]).astype(np.uint8),
                       np.concatenate([s.inst for s in sets]).astype(np.int32))


def object_mesh(obj: SimObject) -> MeshSet:
    """The object's triangles in its own frame."""
    vs, fs, rgb, cls = [], [], [], []
    n = 0
    for part in obj.parts:
        v, f = part_mesh(part)
        vs.append(v)
        fs.append(f + n)
        n += len(v)
        rgb.append(np.tile(np.asarray(part.rgb, np.float32) / 255.0, (len(f), 1)))
        cls.append(np.full(len(f), part.class_id, np.uint8))
    nf = sum(len(f) for f in fs)
    return MeshSet(np.concatenate(vs), np.concatenate(fs), np.concatenate(rgb), np.concatenate(cls),
                   np.full(nf, obj.instance_id, np.int32))


def _transform(ms: MeshSet, T: np.ndarray) -> MeshSet:
    return MeshSet(ms.verts @ T[:3, :3].T + T[:3, 3], ms.tris, ms.rgb, ms.cls, ms.inst)


def ground_mesh(world: World) -> MeshSet:
    """Ground cells as quads at z = 0, sidewalks as boxes CURB_HEIGHT tall."""
    g = world.ground
    sets = []
    rgb_of = {CLS["driveable_surface"]: STUFF_RGB["road"], CLS["sidewalk"]: STUFF_RGB["sidewalk"],
              CLS["terrain"]: STUFF_RGB["terrain"], CLS["other_flat"]: STUFF_RGB["other_flat"]}
    for i in range(len(g.xs) - 1):
        for j in range(len(g.ys) - 1):
            c = int(g.cls[i, j])
            x0, x1, y0, y1 = g.xs[i], g.xs[i + 1], g.ys[j], g.ys[j + 1]
            if g.raised[i, j]:
                v, f = _box_mesh(np.array([(x0 + x1) / 2, (y0 + y1) / 2, CURB_HEIGHT / 2]),
                                 np.array([(x1 - x0) / 2, (y1 - y0) / 2, CURB_HEIGHT / 2]))
                f = f[2:]  # no bottom face (triangles 0, 1 are the z- face)
            else:
                v = np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]], float)
                f = np.array([[0, 1, 2], [0, 2, 3]])
            sets.append(MeshSet(v, f, np.tile(np.asarray(rgb_of[c], np.float32) / 255, (len(f), 1)),
                                np.full(len(f), c, np.uint8), np.zeros(len(f), np.int32)))
    return MeshSet.concat(sets)


# ----------------------------------------------------------------------------------------------------------
# occupancy of one part


def _axis_centres(grid: GridSpec, axis: int, lo: float, hi: float) -> tuple[int, int, np.ndarray]:
    n = grid.shape[axis]
    vs = grid.voxel_size
    i0 = max(int(math.floor((lo - grid.lower[axis]) / vs)), 0)
    i1 = min(int(math.floor((hi - grid.lower[axis]) / vs)) + 1, n)
    return i0, i1, grid.lower[axis] + (np.arange(i0, i1) + 0.5) * vs


def voxelise_part(occ: np.ndarray, grid: GridSpec, part: Part, T_base_obj: np.ndarray) -> None:
    """Write `part.class_id` into every voxel of `occ` (X, Y, Z) that the part (in the object frame, the object
    at T_base_obj, yaw only) intersects: the solid volume plus its surface (exact tests on the part's axes)."""
    hv = grid.voxel_size / 2
    c = T_base_obj[:3, :3] @ part.center + T_base_obj[:3, 3]
    cos, sin = T_base_obj[0, 0], T_base_obj[1, 0]
    if part.shape == "box":
        hx, hy, hz = part.half
        ex, ey = abs(cos) * hx + abs(sin) * hy, abs(sin) * hx + abs(cos) * hy
        (x0, x1, X), (y0, y1, Y), (z0, z1, Z) = (_axis_centres(grid, 0, c[0] - ex - hv, c[0] + ex + hv),
                                                 _axis_centres(grid, 1, c[1] - ey - hv, c[1] + ey + hv),
                                                 _axis_centres(grid, 2, c[2] - hz - hv, c[2] + hz + hv))
        if x0 >= x1 or y0 >= y1 or z0 >= z1:
            return
        dx, dy = (X - c[0])[:, None], (Y - c[1])[None, :]
        lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy
        pad = hv * (abs(cos) + abs(sin))
        xy = (np.abs(lx) <= hx + pad) & (np.abs(ly) <= hy + pad)
        z = np.abs(Z - c[2]) <= hz + hv
    elif part.shape == "cyl":
        r0, r1, h = part.half
        r = max(r0, r1)
        (x0, x1, X), (y0, y1, Y), (z0, z1, Z) = (_axis_centres(grid, 0, c[0] - r - hv, c[0] + r + hv),
                                                 _axis_centres(grid, 1, c[1] - r - hv, c[1] + r + hv),
                                                 _axis_centres(grid, 2, c[2] - hv, c[2] + h + hv))
        if x0 >= x1 or y0 >= y1 or z0 >= z1:
            return
        dx = np.maximum(np.abs(X - c[0]) - hv, 0)[:, None]
        dy = np.maximum(np.abs(Y - c[1]) - hv, 0)[None, :]
        lo, hi = np.clip(Z - hv, c[2], c[2] + h), np.clip(Z + hv, c[2], c[2] + h)
        rmax = np.maximum(r0 + (r1 - r0) * (lo - c[2]) / h, r0 + (r1 - r0) * (hi - c[2]) / h)
        z = (Z + hv >= c[2]) & (Z - hv <= c[2] + h)
        d2 = dx * dx + dy * dy
        sub = (d2[:, :, None] <= (rmax * rmax)[None, None, :]) & z[None, None, :]
        view = occ[x0:x1, y0:y1, z0:z1]
        view[sub] = part.class_id
        return
    elif part.shape == "sphere":
        r = part.half[0]
        (x0, x1, X), (y0, y1, Y), (z0, z1, Z) = (_axis_centres(grid, 0, c[0] - r - hv, c[0] + r + hv),
                                                 _axis_centres(grid, 1, c[1] - r - hv, c[1] + r + hv),
                                                 _axis_centres(grid, 2, c[2] - r - hv, c[2] + r + hv))
        if x0 >= x1 or y0 >= y1 or z0 >= z1:
            return
        dx = np.maximum(np.abs(X - c[0]) - hv, 0)[:, None, None]
        dy = np.maximum(np.abs(Y - c[1]) - hv, 0)[None, :, None]
        dz = np.maximum(np.abs(Z - c[2]) - hv, 0)[None, None, :]
        view = occ[x0:x1, y0:y1, z0:z1]
        view[dx * dx + dy * dy + dz * dz <= r * r] = part.class_id
        return
    else:
        raise ValueError(f"part.shape: unknown {part.shape!r}")
    view = occ[x0:x1, y0:y1, z0:z1]
    view[xy[:, :, None] & z[None, None, :]] = part.class_id


# ----------------------------------------------------------------------------------------------------------
# renderer


def _apply_T(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """T (4, 4) applied to points (N, 3), elementwise (numpy's (N, 3) @ (3, 3) is slow for large N)."""
    out = np.empty_like(pts)
    for k in range(3):
        out[:, k] = pts[:, 0] * T[k, 0] + pts[:, 1] * T[k, 1] + pts[:, 2] * T[k, 2] + T[k, 3]
    return out


@dataclass
class RenderOutput:
    images: dict[str, np.ndarray]
    depth: dict[str, np.ndarray]
    semantic: dict[str, np.ndarray]
    instance: dict[str, np.ndarray]
    lidar: LidarScan | None
    lidar_labels: np.ndarray
    lidar_instance: np.ndarray
    occupancy: np.ndarray | None
    mask_camera: np.ndarray | None
    mask_lidar: np.ndarray | None


class Renderer:
    """Renders a World with a Rig. Everything that depends only on the rig (ray directions, the voxel ->
    pixel / LiDAR-ray tables of the visibility masks) is computed once here."""

    def __init__(self, world: World, rig: Rig, grid: GridSpec | None = None):
        self.world, self.rig, self.grid = world, rig, grid or GridSpec()
        # --- static meshes in odom; moving objects keep their local mesh
        static = [ground_mesh(world)]
        self.moving: list[tuple[SimObject, MeshSet]] = []
        for obj in world.objects:
            ms = object_mesh(obj)
            if obj.moving:
                self.moving.append((obj, ms))
            else:
                static.append(_transform(ms, obj.T_world_obj(0.0)))
        self.static = MeshSet.concat(static)
        self.static_things = [o for o in world.objects if not o.moving]
        # --- camera rays in the optical frame, z = 1 so that t_hit is the z-depth
        self.cam_dirs = []
        for cam in rig.cameras:
            u, v = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
            pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], 1)
            self.cam_dirs.append(np.ascontiguousarray((pix @ np.linalg.inv(cam.K).T).astype(np.float32)))
        self.n_cam_rays = sum(len(d) for d in self.cam_dirs)
        # --- LiDAR rays in the LiDAR frame, azimuth-major (the firing order)
        li = rig.lidar
        self.beam_elev = np.radians(np.linspace(li.vfov_deg[0], li.vfov_deg[1], li.beams))
        self.azimuths = np.arange(li.points_per_ring) * 2 * np.pi / li.points_per_ring
        el, az = np.meshgrid(self.beam_elev, self.azimuths)          # (N_az, beams)
        self.lidar_dirs = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], -1).reshape(-1, 3)
        self.lidar_dirs = np.ascontiguousarray(self.lidar_dirs.astype(np.float32))
        self.lidar_ring = np.tile(np.arange(li.beams, dtype=np.uint16), li.points_per_ring)
        self.lidar_column_time = np.arange(li.points_per_ring) / li.points_per_ring / li.rate_hz   # s after the stamp
        self.lidar_time = np.repeat(self.lidar_column_time.astype(np.float32), li.beams)
        self._sky_cache: dict[str, np.ndarray] = {}
        self._mask_tables()

    # -- visibility tables ------------------------------------------------------------------------------
    def _mask_tables(self) -> None:
        g = self.grid
        X, Y, Z = g.shape
        axes = [g.lower[i] + (np.arange(n) + 0.5) * g.voxel_size for i, n in enumerate(g.shape)]
        cx, cy, cz = np.meshgrid(*axes, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel(), cz.ravel()], 1)   # (X*Y*Z, 3) base_link
        flat = np.arange(len(centres), dtype=np.int64)
        self.cam_tables = []
        for cam in self.rig.cameras:
            p = _apply_T(invert_T(cam.T_base_cam), centres)
            z = p[:, 2]
            ok = z > 0.05
            zs = np.where(ok, z, 1.0)
            u = np.floor(cam.K[0, 0] * p[:, 0] / zs + cam.K[0, 2])
            v = np.floor(cam.K[1, 1] * p[:, 1] / zs + cam.K[1, 2])
            ok &= (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
            self.cam_tables.append((flat[ok].astype(np.int32), (v[ok] * cam.width + u[ok]).astype(np.int32),
                                    z[ok].astype(np.float32)))
        li = self.rig.lidar
        p = _apply_T(invert_T(li.T_base_lidar), centres)
        r = np.linalg.norm(p, axis=1)
        el = np.arcsin(np.clip(p[:, 2] / np.maximum(r, 1e-6), -1, 1))
        az = np.mod(np.arctan2(p[:, 1], p[:, 0]), 2 * np.pi)
        span = self.beam_elev[-1] - self.beam_elev[0]
        b = np.clip(np.round((el - self.beam_elev[0]) / span * (li.beams - 1)), 0, li.beams - 1).astype(np.int64) \
            if li.beams > 1 else np.zeros(len(el), np.int64)
        on_ray = np.abs(el - self.beam_elev[b]) <= np.arctan2(np.sqrt(3) * g.voxel_size / 2, np.maximum(r, 1e-3))
        on_ray &= r <= li.max_range + g.voxel_size
        j = np.mod(np.round(az / (2 * np.pi) * li.points_per_ring), li.points_per_ring).astype(np.int64)
        self.lidar_table = (flat[on_ray].astype(np.int32), (j * li.beams + b)[on_ray].astype(np.int32),
                            r[on_ray].astype(np.float32))

    # -- one tick ---------------------------------------------------------------------------------------
    def scene_at(self, t: float) -> MeshSet:
        """All triangles in odom at time t."""
        sets = [self.static] + [_transform(ms, obj.T_world_obj(t)) for obj, ms in self.moving]
        return MeshSet.concat(sets)

    def lidar_column_poses(self, t: float) -> np.ndarray:
        """T_odom_lidar (points_per_ring, 4, 4) at each azimuth column's firing time within the sweep stamped t."""
        T_base_lidar = self.rig.lidar.T_base_lidar
        return np.stack([self.world.T_odom_base(t + dt) @ T_base_lidar for dt in self.lidar_column_time])

    def render(self, t: float, tick: int, *, cameras: bool = True, lidar: bool = True,
               occupancy: bool = True, lidar_motion: bool = False) -> tuple[np.ndarray, RenderOutput]:
        """Render the tick at time t (seconds from the world's start); `tick` seeds the LiDAR noise.
        `lidar_motion`: fire each LiDAR column from the vehicle's pose at its own time (module docstring)."""
        T_odom_base = self.world.T_odom_base(t)
        column_poses = self.lidar_column_poses(t) if lidar and lidar_motion else None
        mesh = self.scene_at(t) if (cameras or lidar) else None
        scene = None
        if mesh is not None:
            scene = o3d.t.geometry.RaycastingScene()
            scene.add_triangles(o3d.core.Tensor(mesh.verts), o3d.core.Tensor(mesh.tris))
        n_rays = (self.n_cam_rays if cameras else 0) + (len(self.lidar_dirs) if lidar else 0)
        ray_arr = np.empty((n_rays, 6), np.float32)
        start = 0
        if cameras:
            for cam, dirs in zip(self.rig.cameras, self.cam_dirs):
                start = self._fill_rays(ray_arr, start, T_odom_base @ cam.T_base_cam, dirs)
        if lidar and column_poses is None:
            self._fill_rays(ray_arr, start, T_odom_base @ self.rig.lidar.T_base_lidar, self.lidar_dirs)
        elif lidar:
            self._fill_column_rays(ray_arr, start, column_poses, self.lidar_dirs)
        images, depth, semantic, instance = {}, {}, {}, {}
        scan, labels, inst_pts = None, np.zeros(0, np.uint8), np.zeros(0, np.int32)
        if n_rays:
            hit = scene.cast_rays(o3d.core.Tensor(ray_arr))
            t_hit = hit["t_hit"].numpy()
            prim = hit["primitive_ids"].numpy().astype(np.int64)
            normals = hit["primitive_normals"].numpy()
            start = 0
            if cameras:
                for cam in self.rig.cameras:
                    n = cam.width * cam.height
                    sl = slice(start, start + n)
                    im, dp, sem, ins = self._shade(cam, ray_arr[sl], t_hit[sl], prim[sl], normals[sl], mesh)
                    images[cam.name], depth[cam.name], semantic[cam.name], instance[cam.name] = im, dp, sem, ins
                    start += n
            if lidar:
                sl = slice(start, start + len(self.lidar_dirs))
                scan, labels, inst_pts, self._last_range = self._lidar(t_hit[sl], prim[sl], normals[sl], ray_arr[sl],
                                                                       mesh, tick)
        occ = mask_cam = mask_lidar = None
        if occupancy:
            occ = self.occupancy(t, T_odom_base)
            # Free space: voxels whose centre lies before the first hit of the ray through it (tables built
            # once per rig); surfaces: the voxels holding the hit points themselves.
            if cameras:
                mask_cam = np.zeros(occ.size, bool)
                for cam, dirs, (vox, pix, z) in zip(self.rig.cameras, self.cam_dirs, self.cam_tables):
                    dp = depth[cam.name].ravel()
                    seen = z <= dp[pix] + SEAM
                    mask_cam[vox[seen]] = True
                    hit = np.isfinite(dp)
                    self._mark(mask_cam, dirs[hit] * dp[hit, None], cam.T_base_cam)
                mask_cam = mask_cam.reshape(occ.shape)
            if lidar:
                vox, ray, r = self.lidar_table
                mask_lidar = np.zeros(occ.size, bool)
                mask_lidar[vox[r <= self._last_range[ray] + SEAM]] = True
                T = self.rig.lidar.T_base_lidar
                xyz = scan.xyz
                # bent sweeps: each return from its column's pose to the LiDAR at the stamp (the free space
                # before it, above, is still taken along the stamp's ray: off by at most one period's drive)
                if column_poses is not None:
                    column = np.rint(scan.time.astype(np.float64) * self.rig.lidar.rate_hz
                                     * len(column_poses)).astype(np.int64)
                    T_stamp_col = invert_T(T_odom_base @ T)[None] @ column_poses[column]
                    xyz = (np.einsum("nij,nj->ni", T_stamp_col[:, :3, :3], xyz) + T_stamp_col[:, :3, 3]).astype(np.float32)
                self._mark(mask_lidar, xyz, T)
                mask_lidar = mask_lidar.reshape(occ.shape)
        return T_odom_base, RenderOutput(images, depth, semantic, instance, scan, labels, inst_pts, occ, mask_cam,
                                         mask_lidar)

    def _sky(self, cam) -> np.ndarray:
        """Sky colours (H*W, 3) float32 for a camera: a vertical gradient, cached."""
        if cam.name not in self._sky_cache:
            H, W = cam.height, cam.width
            rows = np.repeat(np.arange(H, dtype=np.float32) / max(H - 1, 1), W)
            self._sky_cache[cam.name] = np.stack([0.43 + 0.35 * rows, 0.62 + 0.25 * rows, 0.86 + 0.08 * rows], 1)
        return self._sky_cache[cam.name]

    @staticmethod
    def _fill_rays(buf: np.ndarray, start: int, T: np.ndarray, dirs: np.ndarray) -> int:
        """Write rays (origin, direction) of `dirs` (N, 3) float32 (sensor frame) posed by T into buf[start:]."""
        n = len(dirs)
        out = buf[start:start + n]
        out[:, :3] = T[:3, 3].astype(np.float32)
        R = T[:3, :3].astype(np.float32)
        for k in range(3):
            np.multiply(dirs[:, 0], R[k, 0], out=out[:, 3 + k])
            out[:, 3 + k] += dirs[:, 1] * R[k, 1]
            out[:, 3 + k] += dirs[:, 2] * R[k, 2]
        return start + n

    @staticmethod
    def _fill_column_rays(buf: np.ndarray, start: int, poses: np.ndarray, dirs: np.ndarray) -> int:
        """As `_fill_rays` for azimuth-major `dirs` (columns x beams, 3) with one pose (columns, 4, 4) per column."""
        n = len(dirs)
        out = buf[start:start + n]
        D = dirs.reshape(len(poses), -1, 3)
        out[:, 3:] = np.einsum("kij,kbj->kbi", poses[:, :3, :3].astype(np.float32), D).reshape(-1, 3)
        out[:, :3] = np.repeat(poses[:, :3, 3].astype(np.float32), D.shape[1], axis=0)
        return start + n

    def _mark(self, flat_mask: np.ndarray, pts: np.ndarray, T_base_sensor: np.ndarray) -> None:
        """Set the voxels of `flat_mask` (X*Y*Z,) that hold points (N, 3) float32 given in a sensor frame."""
        g = self.grid
        X, Y, Z = g.shape
        R, t = T_base_sensor[:3, :3].astype(np.float32), T_base_sensor[:3, 3]
        idx = []
        for k in range(3):
            coord = pts[:, 0] * R[k, 0] + pts[:, 1] * R[k, 1] + pts[:, 2] * R[k, 2]
            idx.append(np.floor((coord + np.float32(t[k] - g.lower[k])) * np.float32(1 / g.voxel_size)).astype(np.int64))
        ix, iy, iz = idx
        ok = (ix >= 0) & (ix < X) & (iy >= 0) & (iy < Y) & (iz >= 0) & (iz < Z)
        flat_mask[((ix[ok] * Y + iy[ok]) * Z + iz[ok])] = True

    def _shade(self, cam, rays, t_hit, prim, normals, mesh: MeshSet):
        H, W = cam.height, cam.width
        hit = np.isfinite(t_hit)
        p = prim[hit]
        r = rays[hit]
        th = t_hit[hit]
        n = normals[hit]
        facing = n[:, 0] * r[:, 3] + n[:, 1] * r[:, 4] + n[:, 2] * r[:, 5]
        sun = SUN.astype(np.float32)
        n_dot_sun = n[:, 0] * sun[0] + n[:, 1] * sun[1] + n[:, 2] * sun[2]
        n_dot_sun = np.where(facing > 0, -n_dot_sun, n_dot_sun)   # normals toward the viewer
        cls = mesh.cls[p]
        lambert = 0.45 + 0.55 * np.clip(n_dot_sun, 0, 1)
        x = r[:, 0] + r[:, 3] * th
        y = r[:, 1] + r[:, 4] * th
        z = r[:, 2] + r[:, 5] * th
        # Deterministic world-space texture: a hash of the 0.3 m cell of the hit point.
        h = ((np.floor(x * (1 / 0.3)).astype(np.int64) * 73856093) ^ (np.floor(y * (1 / 0.3)).astype(np.int64) * 19349663)
             ^ (np.floor(z * (1 / 0.3)).astype(np.int64) * 83492791))
        noise = ((h & 0xFFFF).astype(np.float32) * (2 / 65535.0) - 1.0) * TEXTURE_AMPLITUDE[cls]
        rgb = mesh.rgb[p] * (lambert * (1 + noise))[:, None]
        # Dashed centre lines on roads (outside junctions).
        road = np.flatnonzero(cls == CLS["driveable_surface"])
        if road.size:
            g = self.world.ground
            rx, ry = x[road], y[road]
            in_x = np.zeros(road.size, bool)
            in_y = np.zeros(road.size, bool)
            for c in g.road_x:
                in_x |= np.abs(rx - c) < ROAD_HALF_WIDTH
            for c in g.road_y:
                in_y |= np.abs(ry - c) < ROAD_HALF_WIDTH
            mark = np.zeros(road.size, bool)
            for c in g.road_x:
                mark |= (np.abs(rx - c) < 0.12) & ~in_y & (np.mod(ry, 6.0) < 3.0)
            for c in g.road_y:
                mark |= (np.abs(ry - c) < 0.12) & ~in_x & (np.mod(rx, 6.0) < 3.0)
            sel = road[mark]
            rgb[sel] = 0.85 * lambert[sel, None]
        image = self._sky(cam).copy()
        image[hit] = rgb
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(H, W, 3)
        depth = t_hit.astype(np.float32).reshape(H, W)
        depth[~np.isfinite(depth)] = np.inf
        sem = np.full(H * W, SKY_CLASS, np.uint8)
        sem[hit] = cls
        ins = np.zeros(H * W, np.int32)
        ins[hit] = mesh.inst[p]
        return image, depth, sem.reshape(H, W), ins.reshape(H, W)

    def _lidar(self, t_hit, prim, normals, rays, mesh: MeshSet, tick: int):
        li = self.rig.lidar
        rng = np.random.default_rng([self.world.seed, int(tick), 7])
        noise = rng.normal(0.0, li.range_noise_std, len(t_hit)).astype(np.float32)
        valid = np.isfinite(t_hit) & (t_hit >= li.min_range) & (t_hit <= li.max_range)
        rng_true = np.where(valid, t_hit, li.max_range).astype(np.float32)
        r = t_hit[valid] + noise[valid]
        xyz = (self.lidar_dirs[valid] * r[:, None]).astype(np.float32)
        p = prim[valid]
        cls = mesh.cls[p]
        n = normals[valid]
        cosine = np.abs(np.sum(n * rays[valid, 3:], 1))
        intensity = np.clip(255.0 * REFLECTIVITY[cls] * (0.25 + 0.75 * cosine) * (1 + 0.05 * rng.standard_normal(len(r))),
                            0, 255).astype(np.float32)
        scan = LidarScan(xyz=xyz, frame_id=li.frame_id, intensity=intensity, ring=self.lidar_ring[valid].copy(),
                         time=self.lidar_time[valid].copy())
        return scan, cls.astype(np.uint8), mesh.inst[p].astype(np.int32), rng_true

    def occupancy(self, t: float, T_odom_base: np.ndarray) -> np.ndarray:
        """Semantic occupancy (X, Y, Z) uint8 in base_link at time t: the ground layer, then stuff, then things."""
        g = self.grid
        occ = np.full(g.shape, FREE_CLASS, np.uint8)
        T_base_odom = invert_T(T_odom_base)
        # ground: the layer holding z in [0, CURB_HEIGHT], class sampled at each column centre
        X, Y, _ = g.shape
        ax = g.lower[0] + (np.arange(X) + 0.5) * g.voxel_size
        ay = g.lower[1] + (np.arange(Y) + 0.5) * g.voxel_size
        cx, cy = np.meshgrid(ax, ay, indexing="ij")
        wx = T_odom_base[0, 0] * cx + T_odom_base[0, 1] * cy + T_odom_base[0, 3]
        wy = T_odom_base[1, 0] * cx + T_odom_base[1, 1] * cy + T_odom_base[1, 3]
        gcls = self.world.ground.class_at(wx.ravel(), wy.ravel()).reshape(X, Y)
        base_z = T_base_odom[2, 3]
        kz = int(math.floor((base_z + 0.5 * CURB_HEIGHT - g.lower[2]) / g.voxel_size))
        if 0 <= kz < g.shape[2]:
            occ[:, :, kz] = gcls
        reach = math.hypot(*(np.asarray(g.upper[:2]) - np.asarray(g.lower[:2]))) / 2 + 1.0
        ego = T_odom_base[:2, 3]
        things = []
        for obj in self.world.objects:
            x, y, _ = obj.pose_at(t)
            if math.hypot(x - ego[0], y - ego[1]) > reach + obj.radius:
                continue
            if obj.instance_id:      # things are written after all stuff so that they win shared voxels
                things.append(obj)
            else:
                self._vox_obj(occ, obj, t, T_base_odom)
        for obj in things:
            self._vox_obj(occ, obj, t, T_base_odom)
        return occ

    def _vox_obj(self, occ, obj: SimObject, t: float, T_base_odom: np.ndarray) -> None:
        T = T_base_odom @ obj.T_world_obj(t)
        for part in obj.parts:
            voxelise_part(occ, self.grid, part, T)
