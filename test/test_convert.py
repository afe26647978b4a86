"""vg_ros.convert: hypothesis round trips for every converter in both flavors (rclpy and rosbags messages),
hand-built messages with padding / big-endian layouts, and one precise ValueError per malformed field."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vg_ros import convert as C
from vg_ros.bag import typestore
from vg_ros.geometry import make_T, quat_to_R, rpy_to_R
from vg_ros.types import CameraModel, Expression, GridSpec, LidarScan

FLAVORS = ("rclpy", "rosbags")
HSET = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def build(flavor: str, msgtype: str, **fields):
    """A message built by hand, the way a foreign driver would fill it (raw `data` bytes)."""
    if "data" in fields and isinstance(fields["data"], (bytes, bytearray)):
        fields["data"] = bytes(fields["data"]) if flavor == "rclpy" else np.frombuffer(fields["data"], np.uint8).copy()
    if flavor == "rclpy":
        pkg, _, name = msgtype.split("/")
        return getattr(importlib.import_module(f"{pkg}.msg"), name)(**fields)
    return typestore().types[msgtype](**fields)


def header(flavor, stamp_ns=0, frame_id=""):
    return C.make_header(stamp_ns, frame_id, flavor)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality (NaN payloads included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------- Image

ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1", "yuv422", "bayer_grbg16"]


@HSET
@given(flavor=st.sampled_from(FLAVORS), encoding=st.sampled_from(ENCODINGS), height=st.integers(1, 7),
       width=st.integers(1, 9), pad=st.integers(0, 9), big=st.booleans(), seed=st.integers(0, 2**31))
def test_image_hand_built_padded_and_big_endian(flavor, encoding, height, width, pad, big, seed):
    char, channels = C.IMAGE_ENCODINGS[encoding]
    dtype = np.dtype(char)
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    expected = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)
    row_bytes = width * channels * dtype.itemsize
    step = row_bytes + pad
    rows = expected.astype(dtype.newbyteorder(">" if big else "<")).reshape(height, row_bytes // dtype.itemsize)
    raw = np.zeros((height, step), np.uint8)
    raw[:, :row_bytes] = rows.view(np.uint8).reshape(height, row_bytes)
    raw[:, row_bytes:] = 0xAB  # padding junk must not leak in
    msg = build(flavor, "sensor_msgs/msg/Image", header=header(flavor, 5, "cam"), height=height, width=width,
                encoding=encoding, is_bigendian=int(big), step=step, data=raw.tobytes())
    out = C.image_to_array(msg)
    assert out.dtype == dtype and out.dtype.isnative
    assert bits_equal(out, expected)
    assert out.flags.writeable


@HSET
@given(flavor=st.sampled_from(FLAVORS), encoding=st.sampled_from(ENCODINGS), height=st.integers(1, 6),
       width=st.integers(1, 6), seed=st.integers(0, 2**31), stamp=st.integers(0, 2**62))
def test_image_round_trip(flavor, encoding, height, width, seed, stamp):
    char, channels = C.IMAGE_ENCODINGS[encoding]
    dtype = np.dtype(char)
    shape = (height, width) if channels == 1 else (height, width, channels)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)
    msg = C.array_to_image(arr, encoding, stamp_ns=stamp, frame_id="f", flavor=flavor)
    assert C.stamp_of(msg) == stamp and msg.header.frame_id == "f"
    assert msg.step == width * channels * dtype.itemsize
    assert bits_equal(C.image_to_array(msg), arr)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_image_to_rgb_converts_every_colour_encoding(flavor):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    alpha = np.full((4, 5, 1), 7, np.uint8)
    cases = {
        "rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.concatenate([rgb, alpha], 2),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], 2),
    }
    for enc, arr in cases.items():
        msg = C.array_to_image(np.ascontiguousarray(arr), enc, flavor=flavor)
        np.testing.assert_array_equal(C.image_to_rgb(msg), rgb)
        np.testing.assert_array_equal(C.decode_any_image(msg), rgb)
    mono = rgb[:, :, 0]
    np.testing.assert_array_equal(C.image_to_rgb(C.array_to_image(mono, "mono8", flavor=flavor)), np.stack([mono] * 3, 2))
    mono16 = mono.astype(np.uint16) * 256 + 255
    np.testing.assert_array_equal(C.image_to_rgb(C.array_to_image(mono16, "mono16", flavor=flavor)), np.stack([mono] * 3, 2))
    for depth_enc, dt in (("16UC1", np.uint16), ("32FC1", np.float32)):
        with pytest.raises(ValueError, match="encoding"):
            C.image_to_rgb(C.array_to_image(np.zeros((2, 2), dt), depth_enc, flavor=flavor))
    # 16-bit colour: the high byte, as mono16
    rgb16 = rgb.astype(np.uint16) * 256 + 255
    for enc, arr in {"rgb16": rgb16, "bgr16": rgb16[:, :, ::-1],
                     "rgba16": np.concatenate([rgb16, np.full((4, 5, 1), 9, np.uint16)], 2),
                     "bgra16": np.concatenate([rgb16[:, :, ::-1], np.full((4, 5, 1), 9, np.uint16)], 2)}.items():
        msg = C.array_to_image(np.ascontiguousarray(arr), enc, flavor=flavor)
        np.testing.assert_array_equal(C.image_to_rgb(msg), rgb)


def _gradient_rgb(h: int = 8, w: int = 12) -> np.ndarray:
    """A smooth (linear) colour image: bilinear demosaicing restores it exactly away from the border."""
    y, x = np.mgrid[0:h, 0:w].astype(float)
    return np.stack([100 + 8 * x, 50 + 10 * y, 200 - 5 * x - 6 * y], 2).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_mosaics_are_demosaiced_with_the_pattern_they_name(pattern):
    rgb = _gradient_rgb()
    mosaic = np.zeros(rgb.shape[:2], np.uint8)
    for k, colour in enumerate(pattern):   # the 2x2 pattern from the top-left pixel, row by row
        dy, dx = divmod(k, 2)
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    for bits, arr in ((8, mosaic), (16, mosaic.astype(np.uint16) * 256)):
        out = C.image_to_rgb(C.array_to_image(arr, f"bayer_{pattern}{bits}"))
        assert out.shape == rgb.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out[2:-2, 2:-2], rgb[2:-2, 2:-2])
    # another pattern's reading of the same bytes is far off: the mapping is not symmetric by chance
    other = next(p for p in ("rggb", "bggr") if p != pattern)
    wrong = C.image_to_rgb(C.array_to_image(mosaic, f"bayer_{other}8"))
    assert np.abs(wrong[2:-2, 2:-2].astype(int) - rgb[2:-2, 2:-2]).mean() > 10


def test_packed_yuv422_in_both_byte_orders():
    rgb = _gradient_rgb()
    f = rgb.astype(float)   # BT.601, studio range, chroma shared by each pixel pair
    Y = 16 + (65.481 * f[..., 0] + 128.553 * f[..., 1] + 24.966 * f[..., 2]) / 255
    U = 128 + (-37.797 * f[..., 0] - 74.203 * f[..., 1] + 112 * f[..., 2]) / 255
    V = 128 + (112 * f[..., 0] - 93.786 * f[..., 1] - 18.214 * f[..., 2]) / 255
    chroma = np.zeros(Y.shape)
    chroma[:, 0::2] = (U[:, 0::2] + U[:, 1::2]) / 2
    chroma[:, 1::2] = (V[:, 0::2] + V[:, 1::2]) / 2
    for enc, order in (("yuv422", (chroma, Y)), ("yuv422_yuy2", (Y, chroma))):   # UYVY, YUYV
        packed = np.round(np.stack(order, 2)).astype(np.uint8)
        out = C.image_to_rgb(C.array_to_image(packed, enc))
        assert np.abs(out.astype(int) - rgb).max() <= 6   # the pair's shared chroma on a steep gradient
    with pytest.raises(ValueError, match="^width: 3 is odd"):
        C.image_to_rgb(C.array_to_image(np.zeros((2, 3, 2), np.uint8), "yuv422"))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_malformed_images_name_the_field(flavor):
    def img(**kw):
        fields = dict(header=header(flavor), height=2, width=3, encoding="rgb8", is_bigendian=0, step=9,
                      data=bytes(18))
        fields.update(kw)
        return build(flavor, "sensor_msgs/msg/Image", **fields)

    assert C.image_to_array(img()).shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"^data: 17 bytes, expected height \* step = 2 \* 9 = 18"):
        C.image_to_array(img(data=bytes(17)))
    with pytest.raises(ValueError, match="^data: 19 bytes"):  # too long is as wrong as too short
        C.image_to_array(img(data=bytes(19)))
    with pytest.raises(ValueError, match="^step: 8 bytes per row is less than width"):
        C.image_to_array(img(step=8, data=bytes(16)))
    with pytest.raises(ValueError, match="^encoding: unknown image encoding 'yuv422_weird'"):
        C.image_to_array(img(encoding="yuv422_weird"))
    with pytest.raises(ValueError, match="image: encoding 'rgb8' needs dtype uint8"):
        C.array_to_image(np.zeros((2, 2, 3), np.float32), "rgb8")
    with pytest.raises(ValueError, match="image: encoding 'rgb8' needs shape"):
        C.array_to_image(np.zeros((2, 2), np.uint8), "rgb8")


# ---------------------------------------------------------------------------------------------- CompressedImage

@pytest.mark.parametrize("flavor", FLAVORS)
def test_compressed_png_exact_and_jpeg_close(flavor):
    rng = np.random.default_rng(4)
    smooth = np.clip(np.add.outer(np.arange(48), np.arange(64))[:, :, None] * [2, 1, 3] % 256, 0, 255).astype(np.uint8)
    noisy = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    png = C.rgb_to_compressed(noisy, "png", stamp_ns=9, frame_id="cam", flavor=flavor)
    assert png.format == "png" and C.stamp_of(png) == 9
    np.testing.assert_array_equal(C.compressed_to_rgb(png), noisy)
    np.testing.assert_array_equal(C.decode_any_image(png), noisy)
    np.testing.assert_array_equal(C.image_to_rgb(png), noisy)   # what the nodes and replay call
    jpg = C.rgb_to_compressed(smooth, "jpeg", quality=95, flavor=flavor)
    out = C.decode_any_image(jpg)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 4.0
    # colour order: a pure red image stays red
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert C.compressed_to_rgb(C.rgb_to_compressed(red, "jpeg", flavor=flavor))[8, 8, 0] > 240


@pytest.mark.parametrize("flavor", FLAVORS)
def test_malformed_compressed_names_the_field(flavor):
    with pytest.raises(ValueError, match="^data: 4 bytes do not decode"):
        C.compressed_to_rgb(build(flavor, "sensor_msgs/msg/CompressedImage", header=header(flavor), format="jpeg",
                                  data=b"\x00\x01\x02\x03"))
    with pytest.raises(ValueError, match="^data: CompressedImage has no bytes"):
        C.compressed_to_rgb(build(flavor, "sensor_msgs/msg/CompressedImage", header=header(flavor), format="png",
                                  data=b""))
    with pytest.raises(ValueError, match="^format: unsupported CompressedImage format 'bmp'"):
        C.compressed_to_rgb(build(flavor, "sensor_msgs/msg/CompressedImage", header=header(flavor), format="bmp",
                                  data=b"\x00"))


# ---------------------------------------------------------------------------------------------- CameraInfo

@HSET
@given(flavor=st.sampled_from(FLAVORS), fx=st.floats(1, 5000), fy=st.floats(1, 5000), cx=st.floats(0, 2000),
       cy=st.floats(0, 2000), w=st.integers(1, 4000), h=st.integers(1, 4000),
       dist=st.sampled_from([0, 5, 8]), stamp=st.integers(0, 2**62))
def test_camera_info_round_trip(flavor, fx, fy, cx, cy, w, h, dist, stamp):
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    d = np.linspace(-0.1, 0.1, dist)
    T = make_T(rpy_to_R(0.1, -0.2, 0.3), [1, 2, 3])
    cam = CameraModel("front", w, h, K, T, frame_id="cam_front_optical", distortion=d)
    msg = C.camera_model_to_info(cam, stamp, flavor)
    assert C.stamp_of(msg) == stamp and msg.header.frame_id == "cam_front_optical"
    assert np.allclose(np.asarray(msg.p).reshape(3, 4)[:, :3], K)
    back = C.camera_info_to_model(msg, name="front", T_base_cam=T)
    assert back.name == "front" and back.frame_id == "cam_front_optical"
    assert (back.width, back.height) == (w, h)
    np.testing.assert_array_equal(back.K, K)
    # a pinhole goes out as plumb_bob with five zeros (what image_proc and camera_calibration expect)
    np.testing.assert_array_equal(back.distortion, d if dist else np.zeros(5))
    assert msg.distortion_model == ("rational_polynomial" if dist == 8 else "plumb_bob") and back.distorted == bool(dist)
    np.testing.assert_array_equal(back.T_base_cam, T)
    assert C.camera_info_to_model(msg).name == "cam_front_optical"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_camera_info_rejects_bad_intrinsics(flavor):
    cam = CameraModel("c", 10, 10, np.array([[5.0, 0, 5], [0, 5, 5], [0, 0, 1]]), np.eye(4), "c")
    good = C.camera_model_to_info(cam, 0, flavor)
    for bad_K, match in ((np.zeros((3, 3)), "^k: focal lengths"), (np.full((3, 3), np.nan), "^k: focal lengths")):
        msg = C.camera_model_to_info(cam, 0, flavor)
        msg.k = bad_K.reshape(-1).copy()
        with pytest.raises(ValueError, match=match):
            C.camera_info_to_model(msg)
    good.width = 0
    with pytest.raises(ValueError, match="^width/height: camera size 0x10"):
        C.camera_info_to_model(good)


# ---------------------------------------------------------------------------------------------- PointCloud2

NAME_POOL = ["x", "y", "z", "intensity", "ring", "t", "label", "rgb", "normal"]


@st.composite
def cloud_layouts(draw):
    names = draw(st.lists(st.sampled_from(NAME_POOL), min_size=1, max_size=6, unique=True))
    fields, offset = [], 0
    for name in names:
        datatype = draw(st.integers(1, 8))
        count = draw(st.integers(1, 3)) if name not in ("x", "y", "z") else 1
        offset += draw(st.integers(0, 5))  # gap before the field
        fields.append((name, offset, datatype, count))
        offset += np.dtype(C.POINTFIELD_DTYPES[datatype]).itemsize * count
    point_step = offset + draw(st.integers(0, 7))
    height, width = draw(st.integers(1, 4)), draw(st.integers(0, 7))
    row_step = width * point_step + draw(st.integers(0, 9))
    order = draw(st.permutations(range(len(fields))))  # fields listed in any order
    return [fields[i] for i in order], point_step, height, width, row_step, draw(st.booleans())


@HSET
@given(flavor=st.sampled_from(FLAVORS), layout=cloud_layouts(), seed=st.integers(0, 2**31))
def test_pointcloud2_any_layout_hand_built(flavor, layout, seed):
    fields, point_step, height, width, row_step, big = layout
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (height, row_step), dtype=np.uint8)  # padding is junk too
    pfs = [build(flavor, "sensor_msgs/msg/PointField", name=n, offset=o, datatype=d, count=c) for n, o, d, c in fields]
    msg = build(flavor, "sensor_msgs/msg/PointCloud2", header=header(flavor, 11, "lidar"), height=height, width=width,
                fields=pfs, is_bigendian=big, point_step=point_step, row_step=row_step, data=raw.tobytes(),
                is_dense=False)
    cloud = C.pointcloud2_to_structured(msg)
    organised = C.pointcloud2_to_structured(msg, organised=True)
    assert cloud.shape == (height * width,) and organised.shape == (height, width)
    assert set(cloud.dtype.names) == {f[0] for f in fields}
    order = ">" if big else "<"
    for name, offset, datatype, count in fields:
        base = np.dtype(order + C.POINTFIELD_DTYPES[datatype])
        for r in range(height):
            for c in range(width):
                start = c * point_step + offset
                want = raw[r, start:start + base.itemsize * count].view(base).astype(base.newbyteorder("="))
                got = organised[name][r, c]
                assert bits_equal(np.atleast_1d(got), want)
                assert np.asarray(got).dtype.isnative
    # and back: our message re-reads to the same structured array, in either flavor
    again = C.pointcloud2_to_structured(C.structured_to_pointcloud2(organised, stamp_ns=11, frame_id="lidar",
                                                                     flavor=flavor), organised=True)
    assert bits_equal(again, organised)


@HSET
@given(flavor=st.sampled_from(FLAVORS), n=st.integers(0, 300), seed=st.integers(0, 2**31),
       with_intensity=st.booleans(), with_ring=st.booleans(), with_time=st.booleans())
def test_scan_round_trip(flavor, n, seed, with_intensity, with_ring, with_time):
    rng = np.random.default_rng(seed)
    scan = LidarScan(xyz=rng.normal(0, 30, (n, 3)).astype(np.float32), stamp_ns=int(rng.integers(0, 2**62)),
                     frame_id="lidar_top",
                     intensity=rng.random(n).astype(np.float32) if with_intensity else None,
                     ring=rng.integers(0, 128, n).astype(np.uint16) if with_ring else None,
                     time=rng.random(n).astype(np.float32) * 0.1 if with_time else None)
    msg = C.scan_to_pointcloud2(scan, flavor)
    assert msg.is_dense and msg.height == 1 and msg.width == n
    back = C.pointcloud2_to_scan(msg)
    assert back.stamp_ns == scan.stamp_ns and back.frame_id == "lidar_top"
    np.testing.assert_array_equal(back.xyz, scan.xyz)
    for name in ("intensity", "ring", "time"):
        want, got = getattr(scan, name), getattr(back, name)
        assert (want is None) == (got is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype


@pytest.mark.parametrize("flavor", FLAVORS)
def test_scan_drops_nan_points_and_reads_time_aliases(flavor):
    n = 1000
    rng = np.random.default_rng(5)
    xyz = rng.normal(0, 10, (n, 3)).astype(np.float32)
    bad = rng.random(n) < 0.3
    xyz[bad, rng.integers(0, 3, bad.sum())] = np.nan
    xyz[0] = [np.inf, 0, 0]
    bad[0] = True
    t_ns = rng.integers(0, 100_000_000, n).astype(np.uint32)
    msg = C.xyz_fields_to_pointcloud2(xyz, {"t": t_ns, "reflectivity": np.arange(n, dtype=np.uint16)},
                                      stamp_ns=10**18, frame_id="os", flavor=flavor)
    assert not msg.is_dense
    scan = C.pointcloud2_to_scan(msg)
    assert scan.xyz.shape == ((~bad).sum(), 3) and np.isfinite(scan.xyz).all()
    np.testing.assert_allclose(scan.time, t_ns[~bad] * 1e-9, rtol=1e-6)
    np.testing.assert_array_equal(scan.intensity, np.arange(n)[~bad].astype(np.float32))
    assert C.pointcloud2_to_scan(msg, drop_invalid=False).xyz.shape == (n, 3)
    # Hesai-style absolute float64 seconds become seconds since the stamp
    stamp_ns = 1_700_000_000_000_000_000
    abs_t = stamp_ns * 1e-9 + np.linspace(0, 0.1, n)
    msg2 = C.xyz_fields_to_pointcloud2(np.nan_to_num(xyz), {"timestamp": abs_t}, stamp_ns=stamp_ns, flavor=flavor)
    np.testing.assert_allclose(C.pointcloud2_to_scan(msg2).time, np.linspace(0, 0.1, n), atol=1e-6)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_malformed_clouds_name_the_field(flavor):
    def pf(name, offset, datatype=7, count=1):
        return build(flavor, "sensor_msgs/msg/PointField", name=name, offset=offset, datatype=datatype, count=count)

    def cloud(**kw):
        fields = dict(header=header(flavor), height=2, width=3, fields=[pf("x", 0), pf("y", 4), pf("z", 8)],
                      is_bigendian=False, point_step=12, row_step=36, data=bytes(72), is_dense=True)
        fields.update(kw)
        return build(flavor, "sensor_msgs/msg/PointCloud2", **fields)

    assert C.pointcloud2_to_scan(cloud()).xyz.shape == (6, 3)
    with pytest.raises(ValueError, match=r"^data: 71 bytes, expected height \* row_step = 2 \* 36 = 72"):
        C.pointcloud2_to_structured(cloud(data=bytes(71)))
    with pytest.raises(ValueError, match="^point_step: 10 bytes is smaller than field 'z'"):
        C.pointcloud2_to_structured(cloud(point_step=10, row_step=30, data=bytes(60)))
    with pytest.raises(ValueError, match="^row_step: 30 is less than width"):
        C.pointcloud2_to_structured(cloud(row_step=30, data=bytes(60)))
    with pytest.raises(ValueError, match="^fields: PointCloud2 has no 'z' field"):
        C.pointcloud2_to_scan(cloud(fields=[pf("x", 0), pf("y", 4)]))
    with pytest.raises(ValueError, match=r"^fields\['y'\].datatype: unknown PointField datatype 9"):
        C.pointcloud2_to_structured(cloud(fields=[pf("x", 0), pf("y", 4, 9), pf("z", 8)]))
    with pytest.raises(ValueError, match="^fields: duplicate field name 'x'"):
        C.pointcloud2_to_structured(cloud(fields=[pf("x", 0), pf("x", 4), pf("z", 8)]))
    with pytest.raises(ValueError, match=r"^fields\['z'\].count: must be >= 1"):
        C.pointcloud2_to_structured(cloud(fields=[pf("x", 0), pf("y", 4), pf("z", 8, 7, 0)]))
    with pytest.raises(ValueError, match=r"^fields\['bad'\]: dtype int64 has no PointField datatype"):
        C.structured_to_pointcloud2(np.zeros(3, dtype=[("x", "f4"), ("bad", "i8")]))
    with pytest.raises(ValueError, match=r"^extra\['label'\]: expected shape \(4,\)"):
        C.xyz_fields_to_pointcloud2(np.zeros((4, 3)), {"label": np.zeros(5, np.uint8)})


def test_large_cloud_is_vectorised():
    """150k points with a 22-byte step (the S3E layout) convert in well under a second."""
    import time
    n = 150_000
    arr = np.zeros(n, dtype=np.dtype({"names": ["x", "y", "z", "intensity", "ring", "time"],
                                      "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"],
                                      "offsets": [0, 4, 8, 12, 16, 18], "itemsize": 22}))
    arr["x"] = np.arange(n)
    msg = C.structured_to_pointcloud2(arr, frame_id="velodyne", flavor="rclpy")
    t0 = time.perf_counter()
    scan = C.pointcloud2_to_scan(msg)
    assert time.perf_counter() - t0 < 1.0
    assert scan.xyz.shape == (n, 3) and scan.xyz[-1, 0] == n - 1


# ---------------------------------------------------------------------------------------------- OccupancyGrid

@HSET
@given(flavor=st.sampled_from(FLAVORS), h=st.integers(0, 40), w=st.integers(0, 40), seed=st.integers(0, 2**31),
       res=st.floats(0.01, 2.0), yaw=st.floats(-3.1, 3.1), stamp=st.integers(0, 2**62))
def test_occupancy_grid_round_trip(flavor, h, w, seed, res, yaw, stamp):
    rng = np.random.default_rng(seed)
    grid = rng.integers(-1, 101, (h, w)).astype(np.int8)
    origin = make_T(rpy_to_R(0, 0, yaw), rng.normal(0, 50, 3))
    msg = C.array_to_occupancy_grid(grid, res, origin, stamp_ns=stamp, frame_id="map", flavor=flavor)
    assert C.stamp_of(msg) == stamp and msg.header.frame_id == "map"
    grid2, origin2, res2 = C.occupancy_grid_to_array(msg)
    np.testing.assert_array_equal(grid2, grid)
    assert grid2.dtype == np.int8 and grid2.shape == (h, w)
    np.testing.assert_allclose(origin2, origin, atol=1e-9)
    assert res2 == pytest.approx(res, rel=1e-6)  # float32 on the wire


@pytest.mark.parametrize("flavor", FLAVORS)
def test_malformed_occupancy_grid_names_the_field(flavor):
    msg = C.array_to_occupancy_grid(np.zeros((3, 4), np.int8), 0.5, flavor=flavor)
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match=r"^data: 11 cells, expected info.width \* info.height = 4 \* 3 = 12"):
        C.occupancy_grid_to_array(msg)
    with pytest.raises(ValueError, match=r"^grid: values must lie in \[-1, 100\]"):
        C.array_to_occupancy_grid(np.full((2, 2), 101), 0.5, flavor=flavor)
    with pytest.raises(ValueError, match="^resolution: must be positive"):
        C.array_to_occupancy_grid(np.zeros((2, 2), np.int8), 0.0, flavor=flavor)


# ---------------------------------------------------------------------------------------------- poses

quaternions = st.tuples(*[st.floats(-1, 1)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1)
translations = st.tuples(*[st.floats(-1e4, 1e4)] * 3)


def _T(q, t):
    return make_T(quat_to_R(np.array(q)), np.array(t))


@HSET
@given(flavor=st.sampled_from(FLAVORS), q=quaternions, t=translations, stamp=st.integers(0, 2**62))
def test_pose_and_transform_round_trips(flavor, q, t, stamp):
    T = _T(q, t)
    np.testing.assert_allclose(C.pose_to_matrix(C.matrix_to_pose(T, flavor)), T, atol=1e-9)
    np.testing.assert_allclose(C.transform_to_matrix(C.matrix_to_transform(T, flavor)), T, atol=1e-9)
    ps = C.matrix_to_pose_stamped(T, stamp, "map", flavor)
    assert C.stamp_of(ps) == stamp and ps.header.frame_id == "map"
    np.testing.assert_allclose(C.pose_stamped_to_matrix(ps), T, atol=1e-9)
    ts = C.matrix_to_transform_stamped(T, stamp, "odom", "base_link", flavor)
    assert (ts.header.frame_id, ts.child_frame_id, C.stamp_of(ts)) == ("odom", "base_link", stamp)
    np.testing.assert_allclose(C.transform_stamped_to_matrix(ts), T, atol=1e-9)


@HSET
@given(flavor=st.sampled_from(FLAVORS), q=quaternions, t=translations, seed=st.integers(0, 2**31),
       stamp=st.integers(0, 2**62))
def test_odometry_round_trip_with_covariance(flavor, q, t, seed, stamp):
    rng = np.random.default_rng(seed)
    T = _T(q, t)
    A = rng.normal(size=(6, 6))
    cov = A @ A.T
    twist = rng.normal(size=6)
    msg = C.matrix_to_odometry(T, cov, stamp, "odom", "base_link", flavor, twist=twist, twist_cov=cov * 2)
    assert (msg.header.frame_id, msg.child_frame_id, C.stamp_of(msg)) == ("odom", "base_link", stamp)
    T2, cov2 = C.odometry_to_matrix(msg)
    np.testing.assert_allclose(T2, T, atol=1e-9)
    np.testing.assert_array_equal(cov2, cov)
    tw2, tcov2 = C.odometry_twist(msg)
    np.testing.assert_array_equal(tw2, twist)
    np.testing.assert_array_equal(tcov2, cov * 2)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_bad_poses_raise(flavor):
    with pytest.raises(ValueError, match="^T: not a rigid transform"):
        C.matrix_to_pose(np.diag([2.0, 1, 1, 1]), flavor)
    with pytest.raises(ValueError, match=r"^T: expected \(4, 4\)"):
        C.matrix_to_transform(np.eye(3), flavor)
    pose = C.matrix_to_pose(np.eye(4), flavor)
    pose.orientation.w = 0.0
    with pytest.raises(ValueError, match="quaternion .* is zero"):
        C.pose_to_matrix(pose)
    with pytest.raises(ValueError, match=r"^cov: expected \(6, 6\)"):
        C.matrix_to_odometry(np.eye(4), np.eye(3), flavor=flavor)


# ---------------------------------------------------------------------------------------------- ground truth

@HSET
@given(seed=st.integers(0, 2**31), masks=st.booleans(),
       grid=st.sampled_from([GridSpec(), GridSpec((-10.0, -5.0, -2.0), (10.0, 5.0, 2.0), 0.5),
                             GridSpec((0.0, 0.0, 0.0), (3.0, 2.0, 1.0), 0.1)]))
def test_voxel_grid_round_trip(seed, masks, grid):
    rng = np.random.default_rng(seed)
    sem = rng.integers(0, 18, grid.shape).astype(np.uint8)
    mc = rng.random(grid.shape) < 0.5 if masks else None
    ml = rng.random(grid.shape) < 0.2 if masks else None
    msg = C.voxel_grid_to_msg(sem, grid, 123, "base_link", mask_camera=mc, mask_lidar=ml)
    assert msg.size_x * msg.size_y * msg.size_z == sem.size
    # the documented layout: voxel (x, y, z) at (x * size_y + y) * size_z + z
    x, y, z = 1, 1, 0
    assert msg.semantics[(x * msg.size_y + y) * msg.size_z + z] == sem[x, y, z]
    sem2, grid2, mc2, ml2 = C.msg_to_voxel_grid(msg)
    np.testing.assert_array_equal(sem2, sem)
    assert grid2 == grid and grid2.shape == grid.shape
    if masks:
        np.testing.assert_array_equal(mc2, mc)
        np.testing.assert_array_equal(ml2, ml)
    else:
        assert mc2 is None and ml2 is None


def test_voxel_grid_errors():
    grid = GridSpec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5)
    with pytest.raises(ValueError, match=r"^semantics: shape \(3, 2, 2\) does not match grid shape \(2, 2, 2\)"):
        C.voxel_grid_to_msg(np.zeros((3, 2, 2), np.uint8), grid)
    msg = C.voxel_grid_to_msg(np.zeros((2, 2, 2), np.uint8), grid)
    msg.semantics = msg.semantics[:-1]
    with pytest.raises(ValueError, match="^semantics: 7 values, expected size_x"):
        C.msg_to_voxel_grid(msg)


@HSET
@given(seed=st.integers(0, 2**31), hops=st.integers(0, 2), text=st.text(max_size=40), stamp=st.integers(0, 2**62))
def test_expression_round_trip(seed, hops, text, stamp):
    rng = np.random.default_rng(seed)
    mask = rng.random((12, 17)) < 0.3
    expr = Expression(text, "front", int(rng.integers(0, 1000)), np.array([1.5, 2.0, 10.25, 11.0]), mask, hops, stamp)
    back = C.msg_to_expression(C.expression_to_msg(expr, None, "cam_front_optical"))
    assert (back.text, back.camera, back.instance_id, back.hops, back.stamp_ns) == \
        (text, "front", expr.instance_id, hops, stamp)
    np.testing.assert_array_equal(back.mask, mask)
    np.testing.assert_array_equal(back.box, expr.box)


def test_unknown_flavor_is_rejected():
    with pytest.raises(ValueError, match="flavor must be one of"):
        C.make_header(0, "", "ros1")
    with pytest.raises(ValueError, match="'vg_ros/msg/SemanticVoxelGrid' has no rclpy class here"):
        C.voxel_grid_to_msg(np.zeros((1, 1, 1), np.uint8), GridSpec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0),
                            flavor="rclpy")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_compressed_depth_is_refused_by_name(flavor):
    msg = build(flavor, "sensor_msgs/msg/CompressedImage", header=header(flavor), format="16UC1; compressedDepth png",
                data=b"\x00" * 20)
    with pytest.raises(ValueError, match="^format: '16UC1; compressedDepth png' is a compressedDepth image"):
        C.decode_any_image(msg)


def test_read_rgb_files_of_every_depth(tmp_path):
    from PIL import Image
    rgb = _gradient_rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, np.full((8, 12, 1), 5, np.uint8)], 2)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(C.read_rgb(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(C.read_rgb(tmp_path / "rgba.png"), rgb)
    # a 16-bit grey PNG keeps its high byte (PIL's own convert("RGB") would clip it to white)
    grey16 = rgb[:, :, 1].astype(np.uint16) * 256 + 200
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    np.testing.assert_array_equal(C.read_rgb(tmp_path / "grey16.png"), np.stack([rgb[:, :, 1]] * 3, 2))
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "depth.tiff")
    with pytest.raises(ValueError, match="float image"):
        C.read_rgb(tmp_path / "depth.tiff")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="not a readable image"):
        C.read_rgb(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="no such image file"):
        C.read_rgb(tmp_path / "missing.png")


def test_camera_topic_follows_image_transport_naming():
    from vg_ros.nodes.topics import camera_topic
    assert camera_topic("/cam/image_raw", "raw") == "/cam/image_raw"
    assert camera_topic("/cam/image_raw", "compressed") == "/cam/image_raw/compressed"
    assert camera_topic("/cam/image_raw/compressed", "compressed") == "/cam/image_raw/compressed"
    assert camera_topic("/cameras/{name}/image_raw", "compressed") == "/cameras/{name}/image_raw/compressed"
    with pytest.raises(ValueError, match="image_transport = 'theora'"):
        camera_topic("/cam/image_raw", "theora")


@pytest.mark.parametrize("flavor", FLAVORS)
def test_camera_info_keeps_the_distortion_model_and_refuses_unknown_ones(flavor):
    K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    fisheye = CameraModel("f", 320, 240, K, np.eye(4), "f", np.array([0.1, -0.02, 0.003, -0.001]), "equidistant")
    msg = C.camera_model_to_info(fisheye, 0, flavor)
    assert msg.distortion_model == "equidistant"
    back = C.camera_info_to_model(msg)
    assert back.distortion_model == "equidistant" and back.distorted
    np.testing.assert_array_equal(back.distortion, fisheye.distortion)
    assert back.scaled(160, 120).distortion_model == "equidistant"
    msg.distortion_model = "double_sphere"
    with pytest.raises(ValueError, match="distortion_model 'double_sphere' is not supported"):
        C.camera_info_to_model(msg)
    msg.distortion_model = "rational_polynomial"
    with pytest.raises(ValueError, match="'rational_polynomial': 4 coefficients, expected 8"):
        C.camera_info_to_model(msg)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_camera_info_binning_roi_and_rectified_images(flavor):
    """As image_geometry: the region of interest (full-resolution pixels) then the binning shrink the image
    and move K with it, so a point lands where the published image shows it; `rectified` takes P and no
    distortion (image_rect topics)."""
    K = np.array([[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]])
    cam = CameraModel("c", 1600, 900, K, np.eye(4), "c", distortion=np.array([0.1, -0.05, 0, 0, 0]))
    point = np.array([[0.3, -0.2, 5.0]])   # in the optical frame
    u, v = (K @ point[0])[:2] / point[0, 2]
    msg = C.camera_model_to_info(cam, 0, flavor)
    msg.binning_x = msg.binning_y = 2
    binned = C.camera_info_to_model(msg)
    assert (binned.width, binned.height) == (800, 450) and binned.distorted
    np.testing.assert_allclose((binned.K @ point[0])[:2] / point[0, 2], [u / 2, v / 2])
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 400, 200, 800, 450
    cropped = C.camera_info_to_model(msg)
    assert (cropped.width, cropped.height) == (400, 225)
    np.testing.assert_allclose((cropped.K @ point[0])[:2] / point[0, 2], [(u - 400) / 2, (v - 200) / 2])
    msg.roi.width = 1300   # 400 + 1300 > 1600
    with pytest.raises(ValueError, match="^roi: 1300x450 at \\(400, 200\\) does not fit the 1600x900 sensor"):
        C.camera_info_to_model(msg)
    rect = C.camera_model_to_info(cam, 0, flavor)
    P = np.zeros((3, 4))
    P[:, :3] = [[900.0, 0, 790], [0, 900.0, 455], [0, 0, 1]]
    rect.p = P.reshape(-1).copy()
    rectified = C.camera_info_to_model(rect, rectified=True)
    np.testing.assert_allclose(rectified.K, P[:, :3])
    assert not rectified.distorted and rectified.distortion.size == 0
    np.testing.assert_allclose(C.camera_info_to_model(rect).K, K)   # the raw image: K and its distortion


def test_grounding_reads_a_binned_camera_info_for_the_binned_image():
    """A binned camera's images are smaller than its CameraInfo's sensor size: its intrinsics still count
    (they were passed over for the rig's, the size not matching)."""
    from vg_ros.grounding.messages import image_camera
    from vg_ros.nodes.inputs import DropCounter
    from vg_ros.types import Rig
    K = np.array([[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]])
    msg = C.camera_model_to_info(CameraModel("c", 1600, 900, K, np.eye(4), "cam_front_optical"), 0)
    msg.binning_x = msg.binning_y = 2
    image = C.array_to_image(np.zeros((450, 800, 3), np.uint8), "rgb8", frame_id="cam_front_optical")
    drops = DropCounter()
    camera = image_camera(image, 800, 450, msg, Rig.load("default"), drops)
    np.testing.assert_allclose(camera.K, [[500.0, 0, 400], [0, 500.0, 225], [0, 0, 1]])
    assert drops.total == 0
