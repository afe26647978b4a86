"""numpy <-> ROS 2 messages, duck-typed: one converter serves rclpy messages and `rosbags` messages.

Readers (`image_to_array`, `pointcloud2_to_structured`, ...) only read fields by name, so they accept an
rclpy message, a `rosbags` message, or anything with the same attributes. Builders take
`flavor="rclpy"` (default; classes from the installed `*_msgs` Python packages) or `flavor="rosbags"`
(classes from `vg_ros.bag.typestore()`) and return a message of that flavor.

Times are integer nanoseconds; poses are 4x4 matrices `T_a_b` (see `vg_ros.types`); quaternions (x, y, z, w).
Every malformed message raises one `ValueError` that names the wrong field; nothing is silently truncated.
All conversions are vectorised numpy (clouds have 100k+ points).
"""
from __future__ import annotations

import array
import importlib
from typing import Any

import numpy as np

from vg_ros.geometry import R_to_quat, quat_to_R
from vg_ros.types import CameraModel, Expression, GridSpec, LidarScan, ns_to_stamp, stamp_to_ns

FLAVORS = ("rclpy", "rosbags")


# ----------------------------------------------------------------------------------------------------------
# message classes of either flavor

def _msg_class(msgtype: str, flavor: str):
    """The class of `msgtype` ("pkg/msg/Name") in `flavor`."""
    if flavor == "rclpy":
        pkg, _, name = msgtype.split("/")
        try:
            return getattr(importlib.import_module(f"{pkg}.msg"), name)
        except (ImportError, AttributeError):
            raise ValueError(f"message type {msgtype!r} has no rclpy class here (custom types need a built ROS "
                             f"workspace; use flavor='rosbags')") from None
    if flavor == "rosbags":
        from vg_ros.bag import typestore
        try:
            return typestore().types[msgtype]
        except KeyError:
            raise ValueError(f"message type {msgtype!r} is not in the rosbags typestore") from None
    raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")


def _new(msgtype: str, flavor: str, **fields: Any):
    """A message of `msgtype` with `fields` (rosbags classes need every field; rclpy takes kwargs)."""
    return _msg_class(msgtype, flavor)(**fields)


def _bytes_field(data: np.ndarray | bytes, flavor: str, dtype=np.uint8):
    """A uint8[] / int8[] field value: bytes / array('b') for rclpy (fast paths), a numpy array for rosbags."""
    raw = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if flavor == "rclpy":
        return raw if np.dtype(dtype) == np.uint8 else array.array("b", raw)
    return np.frombuffer(raw, dtype=dtype).copy()


def _float_array(values, n: int | None, flavor: str, field_name: str):
    """A float64[] / float64[n] field: numpy for fixed-size and rosbags, array('d') for rclpy sequences."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if n is not None and arr.size != n:
        raise ValueError(f"{field_name}: expected {n} values, got {arr.size}")
    if flavor == "rclpy" and n is None:
        return array.array("d", arr.tobytes())
    return arr.copy()


def _as_u8(data, field_name: str = "data") -> np.ndarray:
    """A message's uint8[] `data` (bytes, array.array, memoryview, numpy, list) as a flat uint8 view."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, array.array):
        return np.frombuffer(data, dtype=np.uint8) if data.itemsize == 1 else np.frombuffer(data.tobytes(), np.uint8)
    try:
        return np.asarray(data, dtype=np.int16).astype(np.uint8)  # list of ints (slow path, rare)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}: not a byte sequence ({type(data).__name__})") from None


# ----------------------------------------------------------------------------------------------------------
# time and header

def make_time(ns: int, flavor: str = "rclpy"):
    """builtin_interfaces/Time from integer nanoseconds (>= 0)."""
    if int(ns) < 0:
        raise ValueError(f"stamp: negative time {ns} ns")
    sec, nanosec = ns_to_stamp(int(ns))
    return _new("builtin_interfaces/msg/Time", flavor, sec=sec, nanosec=nanosec)


def make_header(stamp_ns: int = 0, frame_id: str = "", flavor: str = "rclpy"):
    """std_msgs/Header."""
    return _new("std_msgs/msg/Header", flavor, stamp=make_time(stamp_ns, flavor), frame_id=str(frame_id))


def time_to_ns(t) -> int:
    """builtin_interfaces/Time -> ns (rclpy and rosbags messages alike)."""
    return stamp_to_ns(t.sec, getattr(t, "nanosec", getattr(t, "nsec", 0)))


def stamp_of(msg) -> int:
    """msg.header.stamp in integer nanoseconds."""
    return time_to_ns(msg.header.stamp)


# ----------------------------------------------------------------------------------------------------------
# sensor_msgs/Image

# encoding -> (numpy dtype char, channels)
IMAGE_ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3), "bgr8": ("u1", 3), "rgba8": ("u1", 4), "bgra8": ("u1", 4), "mono8": ("u1", 1),
    "rgb16": ("u2", 3), "bgr16": ("u2", 3), "rgba16": ("u2", 4), "bgra16": ("u2", 4), "mono16": ("u2", 1),
    # packed 4:2:2 (two bytes a pixel): "yuv422" is UYVY (ROS's name), "yuv422_yuy2" YUYV
    "yuv422": ("u1", 2), "yuv422_yuy2": ("u1", 2),
}
# raw sensor mosaics: the 2x2 pattern from the top-left pixel, row by row -> OpenCV's demosaicing code
# (OpenCV names a pattern by the second row's second and third pixels: ROS rggb is OpenCV's BG)
BAYER_CODES = {"rggb": "COLOR_BayerBG2RGB", "bggr": "COLOR_BayerRG2RGB", "gbrg": "COLOR_BayerGR2RGB",
               "grbg": "COLOR_BayerGB2RGB"}
YUV422_CODES = {"yuv422": "COLOR_YUV2RGB_UYVY", "yuv422_yuy2": "COLOR_YUV2RGB_YUY2"}
for _pattern in BAYER_CODES:
    IMAGE_ENCODINGS[f"bayer_{_pattern}8"] = ("u1", 1)
    IMAGE_ENCODINGS[f"bayer_{_pattern}16"] = ("u2", 1)
# what image_to_rgb converts
COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC3", "8UC1", "rgb16", "bgr16", "rgba16", "bgra16",
                    "mono16", *YUV422_CODES, *(f"bayer_{p}{bits}" for p in BAYER_CODES for bits in (8, 16)))
for _bits, _kind in ((8, "U"), (8, "S"), (16, "U"), (16, "S"), (32, "S"), (32, "F"), (64, "F")):
    for _c in (1, 2, 3, 4):
        _char = {"U": "u", "S": "i", "F": "f"}[_kind] + str(_bits // 8)
        IMAGE_ENCODINGS[f"{_bits}{_kind}C{_c}"] = (_char, _c)
DEPTH_ENCODINGS = ("16UC1", "32FC1")


def _encoding_info(encoding: str) -> tuple[np.dtype, int]:
    try:
        char, channels = IMAGE_ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"encoding: unknown image encoding {encoding!r} "
                         f"(known: rgb8, bgr8, rgba8, bgra8, mono8, mono16, 16UC1, 32FC1, ...)") from None
    return np.dtype(char), channels


def image_to_array(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, C) or (H, W) for one channel, in the encoding's native dtype
    (rgb8 (H, W, 3) uint8, mono16/16UC1 (H, W) uint16, 32FC1 (H, W) float32, ...), native byte order.
    Honours row padding in `step` and `is_bigendian`. Always a fresh, writable array."""
    dtype, channels = _encoding_info(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    pixel_bytes = dtype.itemsize * channels
    if step < width * pixel_bytes:
        raise ValueError(f"step: {step} bytes per row is less than width * bytes_per_pixel = "
                         f"{width} * {pixel_bytes} = {width * pixel_bytes} for encoding {msg.encoding!r}")
    buf = _as_u8(msg.data)
    if buf.size != height * step:
        raise ValueError(f"data: {buf.size} bytes, expected height * step = {height} * {step} = {height * step}")
    rows = buf.reshape(height, step)[:, :width * pixel_bytes]
    order = ">" if msg.is_bigendian else "<"
    arr = np.array(rows, copy=True).view(dtype.newbyteorder(order)).reshape(height, width, channels)
    arr = arr.astype(dtype, copy=False)  # native byte order (a no-op unless the message's order differs)
    return arr[:, :, 0] if channels == 1 else arr


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB, from any of `COLOUR_ENCODINGS`: rgb/bgr/rgba/bgra/mono in 8
    or 16 bits (16 bits: the high byte), packed YUV 4:2:2 (yuv422 = UYVY, yuv422_yuy2 = YUYV; even width)
    and raw Bayer mosaics (bayer_rggb8 ... bayer_grbg16, demosaiced bilinearly); a sensor_msgs/CompressedImage
    (jpeg, png: anything with a `format` and no `encoding`) through `compressed_to_rgb`. Raises ValueError
    for depth and other non-colour encodings."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_to_rgb(msg)
    enc = msg.encoding
    if enc not in COLOUR_ENCODINGS:
        if enc not in IMAGE_ENCODINGS:
            _encoding_info(enc)
        raise ValueError(f"encoding: {enc!r} is not a colour image encoding (depth/other); use image_to_array")
    arr = image_to_array(msg)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if enc.startswith(("bayer_", "yuv422")):
        import cv2
        if enc.startswith("yuv422") and arr.shape[1] % 2:
            raise ValueError(f"width: {arr.shape[1]} is odd; {enc!r} packs pixels in pairs")
        code = YUV422_CODES[enc] if enc in YUV422_CODES else BAYER_CODES[enc[len("bayer_"):].rstrip("0123456789")]
        return cv2.cvtColor(arr, getattr(cv2, code))
    if enc in ("rgb8", "rgb16"):
        return arr
    if enc in ("bgr8", "bgr16", "8UC3"):
        return np.ascontiguousarray(arr[:, :, ::-1])
    if enc in ("rgba8", "rgba16"):
        return np.ascontiguousarray(arr[:, :, :3])
    if enc in ("bgra8", "bgra16"):
        return np.ascontiguousarray(arr[:, :, 2::-1])
    return np.repeat(arr[:, :, None], 3, axis=2)


def array_to_image(array_: np.ndarray, encoding: str, *, stamp_ns: int = 0, frame_id: str = "",
                   flavor: str = "rclpy"):
    """(H, W, C) or (H, W) array -> sensor_msgs/Image in `encoding` (dense rows, little-endian).
    The array dtype must match the encoding (e.g. uint8 for rgb8, float32 for 32FC1)."""
    dtype, channels = _encoding_info(encoding)
    arr = np.asarray(array_)
    if arr.ndim == 2 and channels == 1:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise ValueError(f"image: encoding {encoding!r} needs shape (H, W{', ' + str(channels) if channels > 1 else ''})"
                         f", got {arr.shape}")
    if arr.dtype != dtype:
        raise ValueError(f"image: encoding {encoding!r} needs dtype {dtype}, got {arr.dtype}")
    height, width = arr.shape[:2]
    data = np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<")).tobytes()
    return _new("sensor_msgs/msg/Image", flavor, header=make_header(stamp_ns, frame_id, flavor),
                height=height, width=width, encoding=encoding, is_bigendian=0,
                step=width * channels * dtype.itemsize, data=_bytes_field(data, flavor))


# ----------------------------------------------------------------------------------------------------------
# sensor_msgs/CompressedImage

def _compressed_kind(fmt: str) -> str:
    f = fmt.lower()
    if "compresseddepth" in f:
        raise ValueError(f"format: {fmt!r} is a compressedDepth image (depth with a header); not supported")
    if "jpeg" in f or "jpg" in f:
        return "jpeg"
    if "png" in f:
        return "png"
    raise ValueError(f"format: unsupported CompressedImage format {fmt!r} (jpeg or png)")


def compressed_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg, png) -> (H, W, 3) uint8 RGB."""
    import cv2
    _compressed_kind(msg.format)
    buf = _as_u8(msg.data)
    if buf.size == 0:
        raise ValueError("data: CompressedImage has no bytes")
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"data: {buf.size} bytes do not decode as {msg.format!r}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", *, quality: int = 90, stamp_ns: int = 0,
                      frame_id: str = "", flavor: str = "rclpy"):
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage; `fmt` "jpeg" (lossy, `quality` 1-100) or "png"."""
    import cv2
    kind = _compressed_kind(fmt)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if kind == "jpeg" else []
    ok, enc = cv2.imencode(".jpg" if kind == "jpeg" else ".png", bgr, params)
    if not ok:
        raise ValueError(f"rgb: OpenCV could not encode a {rgb.shape} image as {kind}")
    return _new("sensor_msgs/msg/CompressedImage", flavor, header=make_header(stamp_ns, frame_id, flavor),
                format=kind, data=_bytes_field(enc.tobytes(), flavor))


def read_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an image file (PNG, JPEG, ...). 16-bit grey files (PIL modes I;16*) keep
    their high byte, as mono16 messages do (PIL's own conversion would clip them to white); 32-bit integer
    and float files are refused: their range is not a colour's. ValueError when the file cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16"):
                grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if img.mode in ("I", "F"):
                raise ValueError(f"{path}: a {'32-bit integer' if img.mode == 'I' else 'float'} image "
                                 f"(PIL mode {img.mode}), not a colour one")
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ValueError(f"{path}: no such image file") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc


def decode_any_image(msg) -> np.ndarray:
    """Image or CompressedImage -> (H, W, 3) uint8 RGB (`image_to_rgb` takes both)."""
    return image_to_rgb(msg)


# ----------------------------------------------------------------------------------------------------------
# sensor_msgs/CameraInfo

def camera_info_to_model(msg, name: str | None = None, T_base_cam: np.ndarray | None = None, *,
                         rectified: bool = False) -> CameraModel:
    """sensor_msgs/CameraInfo -> CameraModel of the image the camera publishes (K (3, 3) float64, size,
    `distortion` with its `distortion_model`: plumb_bob, rational_polynomial or equidistant; another model or
    a coefficient count the model does not have is a ValueError naming it).

    As image_geometry reads it: the region of interest (`roi`, in full-resolution pixels; all zero = the
    whole sensor) and then the binning (`binning_x/y`, 0 or 1 = none) shrink the image and move K with
    it. `rectified`: the image is the rectified one (`image_rect`, as image_proc or Isaac ROS publish it):
    the intrinsics are P's left 3x3 and there is no distortion left.
    `name` defaults to the header frame_id; `T_base_cam` (4, 4) to identity (look it up in TF)."""
    width, height = int(msg.width), int(msg.height)
    if width <= 0 or height <= 0:
        raise ValueError(f"width/height: camera size {width}x{height} must be positive")
    if rectified:
        P = np.asarray(msg.p, dtype=np.float64).reshape(-1)
        if P.size != 12:
            raise ValueError(f"p: expected 12 values, got {P.size}")
        K = P.reshape(3, 4)[:, :3].copy()
        where = "p"
    else:
        K = np.asarray(msg.k, dtype=np.float64).reshape(-1)
        if K.size != 9:
            raise ValueError(f"k: expected 9 values, got {K.size}")
        K = K.reshape(3, 3).copy()
        where = "k"
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{where}: focal lengths fx={K[0, 0]}, fy={K[1, 1]} must be finite and positive")
    roi = getattr(msg, "roi", None)
    x0, y0 = (int(roi.x_offset), int(roi.y_offset)) if roi is not None else (0, 0)
    roi_w, roi_h = (int(roi.width), int(roi.height)) if roi is not None else (0, 0)
    if roi_w or roi_h or x0 or y0:
        if roi_w <= 0 or roi_h <= 0 or x0 + roi_w > width or y0 + roi_h > height:
            raise ValueError(f"roi: {roi_w}x{roi_h} at ({x0}, {y0}) does not fit the {width}x{height} sensor")
        K[0, 2] -= x0
        K[1, 2] -= y0
        width, height = roi_w, roi_h
    bx, by = max(int(getattr(msg, "binning_x", 0)), 1), max(int(getattr(msg, "binning_y", 0)), 1)
    if bx > 1 or by > 1:
        K[0] /= bx
        K[1] /= by
        width, height = width // bx, height // by
        if width <= 0 or height <= 0:
            raise ValueError(f"binning_x/y: {bx}x{by} leaves no pixel of the {int(msg.width)}x{int(msg.height)} sensor")
    frame_id = str(msg.header.frame_id)
    from vg_ros.geometry import check_distortion
    if rectified:
        model, dist = "", np.zeros(0)
    else:
        model = str(getattr(msg, "distortion_model", "") or "")
        dist = check_distortion(np.asarray(msg.d, dtype=np.float64).reshape(-1).copy(), model)
    T = np.eye(4) if T_base_cam is None else np.asarray(T_base_cam, dtype=np.float64)
    return CameraModel(name=name if name is not None else frame_id, width=width, height=height, K=K,
                       T_base_cam=T, frame_id=frame_id, distortion=dist, distortion_model=model)


def camera_model_to_info(cam: CameraModel, stamp_ns: int = 0, flavor: str = "rclpy"):
    """CameraModel -> sensor_msgs/CameraInfo (frame `cam.frame_id`, R identity, P = [K | 0]). A camera
    without distortion is plumb_bob with five zero coefficients, as image_proc and camera_calibration write
    a pinhole (an empty distortion_model is unset, not "none")."""
    K = np.asarray(cam.K, dtype=np.float64).reshape(3, 3)
    P = np.zeros((3, 4))
    P[:, :3] = K
    d = np.asarray(cam.distortion, dtype=np.float64).reshape(-1)
    if d.size == 0 and not cam.distortion_model:
        d = np.zeros(5)
    model = cam.distortion_model or {4: "plumb_bob", 5: "plumb_bob", 8: "rational_polynomial"}.get(d.size,
                                                                                                 "plumb_bob")
    roi = _new("sensor_msgs/msg/RegionOfInterest", flavor, x_offset=0, y_offset=0, height=0, width=0,
               do_rectify=False)
    return _new("sensor_msgs/msg/CameraInfo", flavor, header=make_header(stamp_ns, cam.frame_id or cam.name, flavor),
                height=int(cam.height), width=int(cam.width), distortion_model=model,
                d=_float_array(d, None, flavor, "d"), k=_float_array(K, 9, flavor, "k"),
                r=_float_array(np.eye(3), 9, flavor, "r"), p=_float_array(P, 12, flavor, "p"),
                binning_x=0, binning_y=0, roi=roi)


# ----------------------------------------------------------------------------------------------------------
# sensor_msgs/PointCloud2

# PointField datatype -> numpy dtype char
POINTFIELD_DTYPES: dict[int, str] = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
_DTYPE_TO_POINTFIELD: dict[str, int] = {v: k for k, v in POINTFIELD_DTYPES.items()}
TIME_FIELD_ALIASES = ("time", "t", "timestamp", "time_offset", "offset_time")
INTENSITY_FIELD_ALIASES = ("intensity", "i", "reflectivity")


def pointcloud2_dtype(msg) -> np.dtype:
    """The structured numpy dtype of one point (itemsize = point_step, byte order of the message)."""
    point_step = int(msg.point_step)
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in msg.fields:
        name = str(f.name)
        if name in names:
            raise ValueError(f"fields: duplicate field name {name!r}")
        if not name:
            raise ValueError("fields: a field has an empty name")
        try:
            char = POINTFIELD_DTYPES[int(f.datatype)]
        except KeyError:
            raise ValueError(f"fields[{name!r}].datatype: unknown PointField datatype {int(f.datatype)} (1-8)") from None
        count = int(f.count)
        if count < 1:
            raise ValueError(f"fields[{name!r}].count: must be >= 1, got {count}")
        base = np.dtype(order + char)
        end = int(f.offset) + base.itemsize * count
        if end > point_step:
            raise ValueError(f"point_step: {point_step} bytes is smaller than field {name!r} "
                             f"(offset {int(f.offset)} + {count} x {base.itemsize} bytes = {end})")
        names.append(name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(int(f.offset))
    if point_step <= 0 and (names or int(msg.width) * int(msg.height) > 0):
        raise ValueError(f"point_step: must be positive, got {point_step}")
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": max(point_step, 1)})


def pointcloud2_to_structured(msg, *, organised: bool = False) -> np.ndarray:
    """sensor_msgs/PointCloud2 -> structured array, one named field per PointField (native byte order;
    `count` > 1 fields are sub-arrays). Shape (H * W,), or (H, W) when `organised`. Any layout: field
    offsets, padding in point_step, padding in row_step, big-endian, all 8 datatypes. NaN points are kept."""
    dtype = pointcloud2_dtype(msg)
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    if row_step < width * point_step:
        raise ValueError(f"row_step: {row_step} is less than width * point_step = {width} * {point_step}")
    buf = _as_u8(msg.data)
    if buf.size != height * row_step:
        raise ValueError(f"data: {buf.size} bytes, expected height * row_step = {height} * {row_step} "
                         f"= {height * row_step}")
    if height * width == 0:
        out = np.zeros((height, width), dtype=dtype)
    else:
        rows = buf.reshape(height, row_step)[:, :width * point_step]
        out = np.array(rows, copy=True).view(dtype).reshape(height, width)
    native = np.dtype({"names": dtype.names,
                       "formats": [dtype.fields[n][0].newbyteorder("=") if dtype.fields[n][0].subdtype is None
                                   else np.dtype((dtype.fields[n][0].subdtype[0].newbyteorder("="),
                                                  dtype.fields[n][0].subdtype[1])) for n in dtype.names],
                       "offsets": [dtype.fields[n][1] for n in dtype.names], "itemsize": dtype.itemsize})
    if native != dtype:
        out = out.astype(native)
    return out if organised else out.reshape(-1)


def _find_field(names, aliases) -> str | None:
    for a in aliases:
        if a in names:
            return a
    return None


def pointcloud2_to_scan(msg, *, drop_invalid: bool = True) -> LidarScan:
    """sensor_msgs/PointCloud2 -> LidarScan: xyz (N, 3) float32; intensity (N,) float32, ring (N,) uint16,
    time (N,) float32 seconds relative to the header stamp, when present. With `drop_invalid`, points with a
    non-finite x, y or z are dropped (whatever `is_dense` claims). Time fields: `time`/`t`/`timestamp`/
    `time_offset`; integers are read as ns, float values > 1e15 as absolute ns, > 1e6 as absolute seconds,
    others as seconds relative to the stamp."""
    cloud = pointcloud2_to_structured(msg)
    names = cloud.dtype.names or ()
    for axis in ("x", "y", "z"):
        if axis not in names:
            raise ValueError(f"fields: PointCloud2 has no {axis!r} field (has {list(names)})")
        if cloud.dtype.fields[axis][0].subdtype is not None:
            raise ValueError(f"fields[{axis!r}].count: must be 1")
    xyz = np.empty((cloud.shape[0], 3), dtype=np.float32)
    xyz[:, 0], xyz[:, 1], xyz[:, 2] = cloud["x"], cloud["y"], cloud["z"]
    keep = None
    if drop_invalid:
        finite = np.isfinite(xyz).all(axis=1)
        if not finite.all():
            keep = finite
            xyz = xyz[keep]
    stamp_ns = stamp_of(msg)

    def column(name):
        if name is None or cloud.dtype.fields[name][0].subdtype is not None:
            return None
        col = cloud[name]
        return col if keep is None else col[keep]

    intensity = column(_find_field(names, INTENSITY_FIELD_ALIASES))
    ring = column(_find_field(names, ("ring",)))
    tname = _find_field(names, TIME_FIELD_ALIASES)
    tcol = column(tname)
    time = None
    if tcol is not None:
        t = tcol.astype(np.float64)
        if np.issubdtype(tcol.dtype, np.integer):
            t = t * 1e-9
            if t.size and np.median(np.abs(t)) > 1e6:  # absolute ns
                t = t - stamp_ns * 1e-9
        elif t.size and np.nanmedian(np.abs(t)) > 1e15:
            t = t * 1e-9 - stamp_ns * 1e-9
        elif t.size and np.nanmedian(np.abs(t)) > 1e6:
            t = t - stamp_ns * 1e-9
        time = t.astype(np.float32)
    return LidarScan(xyz=np.ascontiguousarray(xyz), stamp_ns=stamp_ns, frame_id=str(msg.header.frame_id),
                     intensity=None if intensity is None else intensity.astype(np.float32),
                     ring=None if ring is None else ring.astype(np.uint16), time=time)


def _pointfields(dtype: np.dtype, flavor: str) -> list:
    fields = []
    for name in dtype.names:
        fdt, offset = dtype.fields[name][:2]
        count = 1
        if fdt.subdtype is not None:
            base, shape = fdt.subdtype
            count = int(np.prod(shape))
            fdt = base
        key = fdt.newbyteorder("=").str.lstrip("<>=|")
        if key not in _DTYPE_TO_POINTFIELD:
            raise ValueError(f"fields[{name!r}]: dtype {fdt} has no PointField datatype "
                             f"(int8/16/32, uint8/16/32, float32/64)")
        fields.append(_new("sensor_msgs/msg/PointField", flavor, name=name, offset=int(offset),
                           datatype=_DTYPE_TO_POINTFIELD[key], count=count))
    return fields


def structured_to_pointcloud2(arr: np.ndarray, *, stamp_ns: int = 0, frame_id: str = "", flavor: str = "rclpy"):
    """Structured array (N,) or organised (H, W) -> sensor_msgs/PointCloud2 (little-endian; the dtype's
    offsets and itemsize become offsets and point_step). is_dense is False when x/y/z hold a non-finite value."""
    arr = np.asarray(arr)
    if arr.dtype.names is None:
        raise ValueError(f"arr: expected a structured array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"arr: expected shape (N,) or (H, W), got {arr.shape}")
    dtype = arr.dtype
    le = np.dtype({"names": dtype.names,
                   "formats": [dtype.fields[n][0].newbyteorder("<") if dtype.fields[n][0].subdtype is None
                               else np.dtype((dtype.fields[n][0].subdtype[0].newbyteorder("<"),
                                              dtype.fields[n][0].subdtype[1])) for n in dtype.names],
                   "offsets": [dtype.fields[n][1] for n in dtype.names], "itemsize": dtype.itemsize})
    fields = _pointfields(le, flavor)
    data = np.ascontiguousarray(arr.astype(le) if le != dtype else arr)
    dense = True
    for axis in ("x", "y", "z"):
        if axis in dtype.names and np.issubdtype(dtype.fields[axis][0], np.floating):
            dense = dense and bool(np.isfinite(data[axis]).all())
    height, width = arr.shape
    raw = data.view(np.uint8).reshape(-1) if data.size else np.zeros(0, np.uint8)
    return _new("sensor_msgs/msg/PointCloud2", flavor, header=make_header(stamp_ns, frame_id, flavor),
                height=height, width=width, fields=fields, is_bigendian=False, point_step=le.itemsize,
                row_step=le.itemsize * width, data=_bytes_field(raw, flavor), is_dense=dense)


def xyz_fields_to_pointcloud2(xyz: np.ndarray, extra: dict[str, np.ndarray] | None = None, stamp_ns: int = 0,
                              frame_id: str = "", flavor: str = "rclpy"):
    """xyz (N, 3) -> PointCloud2 with float32 x, y, z plus one field per `extra` entry ((N,) arrays keep
    their dtype, e.g. label uint32, confidence float32). Fields in order, each at an offset aligned to its
    size as in a C struct (x y z label confidence: 20 bytes; a uint8 label would be followed by 3 padding
    bytes), so GPU consumers can read them in place; PCL matches fields by name and type (its `label` is
    uint32)."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz: expected shape (N, 3), got {xyz.shape}")
    n = xyz.shape[0]
    extra = dict(extra or {})
    descr = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    for name, values in extra.items():
        values = np.asarray(values)
        if name in ("x", "y", "z"):
            raise ValueError(f"extra[{name!r}]: clashes with the xyz fields")
        if values.shape != (n,):
            raise ValueError(f"extra[{name!r}]: expected shape ({n},), got {values.shape}")
        descr.append((name, values.dtype.newbyteorder("<")))
    arr = np.zeros(n, dtype=np.dtype(descr, align=True))   # zeros: no stray bytes in the padding
    arr["x"], arr["y"], arr["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    for name, values in extra.items():
        arr[name] = values
    return structured_to_pointcloud2(arr, stamp_ns=stamp_ns, frame_id=frame_id, flavor=flavor)


def scan_to_pointcloud2(scan: LidarScan, flavor: str = "rclpy"):
    """LidarScan -> PointCloud2 with x, y, z (+ intensity float32, ring uint16, time float32 when set)."""
    extra = {}
    if scan.intensity is not None:
        extra["intensity"] = np.asarray(scan.intensity, dtype=np.float32)
    if scan.ring is not None:
        extra["ring"] = np.asarray(scan.ring, dtype=np.uint16)
    if scan.time is not None:
        extra["time"] = np.asarray(scan.time, dtype=np.float32)
    return xyz_fields_to_pointcloud2(np.asarray(scan.xyz, dtype=np.float32), extra, stamp_ns=scan.stamp_ns,
                                     frame_id=scan.frame_id, flavor=flavor)


# ----------------------------------------------------------------------------------------------------------
# geometry_msgs / nav_msgs

def _check_T(T: np.ndarray, name: str = "T") -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"{name}: expected (4, 4), got {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{name}: not finite")
    if not np.allclose(T[3], [0, 0, 0, 1]) or not np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-5):
        raise ValueError(f"{name}: not a rigid transform (rotation not orthonormal or last row not 0 0 0 1)")
    return T


def _vec_quat_to_T(p, q) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = quat_to_R(np.array([q.x, q.y, q.z, q.w], dtype=np.float64))
    T[:3, 3] = (p.x, p.y, p.z)
    if not np.all(np.isfinite(T[:3, 3])):
        raise ValueError(f"position: not finite ({T[:3, 3]})")
    return T


def pose_to_matrix(msg) -> np.ndarray:
    """geometry_msgs/Pose -> (4, 4)."""
    return _vec_quat_to_T(msg.position, msg.orientation)


def transform_to_matrix(msg) -> np.ndarray:
    """geometry_msgs/Transform -> (4, 4)."""
    return _vec_quat_to_T(msg.translation, msg.rotation)


def _quat_msg(R, flavor):
    q = R_to_quat(R)
    return _new("geometry_msgs/msg/Quaternion", flavor, x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))


def matrix_to_pose(T: np.ndarray, flavor: str = "rclpy"):
    """(4, 4) -> geometry_msgs/Pose."""
    T = _check_T(T)
    p = _new("geometry_msgs/msg/Point", flavor, x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3]))
    return _new("geometry_msgs/msg/Pose", flavor, position=p, orientation=_quat_msg(T[:3, :3], flavor))


def matrix_to_transform(T: np.ndarray, flavor: str = "rclpy"):
    """(4, 4) -> geometry_msgs/Transform."""
    T = _check_T(T)
    v = _new("geometry_msgs/msg/Vector3", flavor, x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3]))
    return _new("geometry_msgs/msg/Transform", flavor, translation=v, rotation=_quat_msg(T[:3, :3], flavor))


def pose_stamped_to_matrix(msg) -> np.ndarray:
    """geometry_msgs/PoseStamped -> (4, 4) (stamp: `stamp_of(msg)`, frame: msg.header.frame_id)."""
    return pose_to_matrix(msg.pose)


def matrix_to_pose_stamped(T: np.ndarray, stamp_ns: int = 0, frame_id: str = "", flavor: str = "rclpy"):
    """(4, 4) -> geometry_msgs/PoseStamped."""
    return _new("geometry_msgs/msg/PoseStamped", flavor, header=make_header(stamp_ns, frame_id, flavor),
                pose=matrix_to_pose(T, flavor))


def transform_stamped_to_matrix(msg) -> np.ndarray:
    """geometry_msgs/TransformStamped -> T_parent_child (4, 4)."""
    return transform_to_matrix(msg.transform)


def matrix_to_transform_stamped(T: np.ndarray, stamp_ns: int = 0, parent: str = "", child: str = "",
                                flavor: str = "rclpy"):
    """T_parent_child (4, 4) -> geometry_msgs/TransformStamped (header.frame_id parent, child_frame_id child)."""
    return _new("geometry_msgs/msg/TransformStamped", flavor, header=make_header(stamp_ns, parent, flavor),
                child_frame_id=str(child), transform=matrix_to_transform(T, flavor))


def stamped_pose_to_matrix(msg) -> np.ndarray:
    """A pose as ground truth comes: nav_msgs/Odometry, geometry_msgs/PoseStamped or TransformStamped -> (4, 4).
    ValueError for another message, or a pose that is not finite."""
    if hasattr(msg, "pose") and hasattr(msg.pose, "pose"):
        return odometry_to_matrix(msg)[0]
    if hasattr(msg, "pose"):
        return pose_stamped_to_matrix(msg)
    if hasattr(msg, "transform"):
        return transform_stamped_to_matrix(msg)
    raise ValueError(f"ground-truth message {type(msg).__name__} is not an Odometry / PoseStamped / TransformStamped")


def _cov6(values, name: str) -> np.ndarray:
    cov = np.asarray(values, dtype=np.float64).reshape(-1)
    if cov.size != 36:
        raise ValueError(f"{name}: expected 36 values, got {cov.size}")
    return cov.reshape(6, 6).copy()


def odometry_to_matrix(msg) -> tuple[np.ndarray, np.ndarray]:
    """nav_msgs/Odometry -> (T_frame_child (4, 4), pose covariance (6, 6) over x, y, z, roll, pitch, yaw)."""
    return pose_to_matrix(msg.pose.pose), _cov6(msg.pose.covariance, "pose.covariance")


def odometry_twist(msg) -> tuple[np.ndarray, np.ndarray]:
    """nav_msgs/Odometry -> (twist (6,) vx vy vz wx wy wz in child frame, twist covariance (6, 6))."""
    t = msg.twist.twist
    vec = np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z], dtype=np.float64)
    return vec, _cov6(msg.twist.covariance, "twist.covariance")


def matrix_to_odometry(T: np.ndarray, cov: np.ndarray | None = None, stamp_ns: int = 0, frame_id: str = "odom",
                       child_frame_id: str = "base_link", flavor: str = "rclpy", twist: np.ndarray | None = None,
                       twist_cov: np.ndarray | None = None):
    """T_frame_child (4, 4) + covariance (6, 6) -> nav_msgs/Odometry. `twist` (6,) vx vy vz wx wy wz
    (zeros when None), `twist_cov` (6, 6) (zeros when None)."""
    cov = np.zeros((6, 6)) if cov is None else np.asarray(cov, dtype=np.float64)
    if cov.shape != (6, 6):
        raise ValueError(f"cov: expected (6, 6), got {cov.shape}")
    tw = np.zeros(6) if twist is None else np.asarray(twist, dtype=np.float64).reshape(-1)
    if tw.size != 6:
        raise ValueError(f"twist: expected 6 values, got {tw.size}")
    tcov = np.zeros((6, 6)) if twist_cov is None else np.asarray(twist_cov, dtype=np.float64)
    if tcov.shape != (6, 6):
        raise ValueError(f"twist_cov: expected (6, 6), got {tcov.shape}")
    pose = _new("geometry_msgs/msg/PoseWithCovariance", flavor, pose=matrix_to_pose(T, flavor),
                covariance=_float_array(cov, 36, flavor, "cov"))
    vec3 = "geometry_msgs/msg/Vector3"
    twist_msg = _new("geometry_msgs/msg/Twist", flavor,
                     linear=_new(vec3, flavor, x=float(tw[0]), y=float(tw[1]), z=float(tw[2])),
                     angular=_new(vec3, flavor, x=float(tw[3]), y=float(tw[4]), z=float(tw[5])))
    twc = _new("geometry_msgs/msg/TwistWithCovariance", flavor, twist=twist_msg,
               covariance=_float_array(tcov, 36, flavor, "twist_cov"))
    return _new("nav_msgs/msg/Odometry", flavor, header=make_header(stamp_ns, frame_id, flavor),
                child_frame_id=str(child_frame_id), pose=pose, twist=twc)


# ----------------------------------------------------------------------------------------------------------
# nav_msgs/OccupancyGrid

def occupancy_grid_to_array(msg) -> tuple[np.ndarray, np.ndarray, float]:
    """nav_msgs/OccupancyGrid -> (grid (height, width) int8, row-major from the origin, -1 unknown;
    T_frame_origin (4, 4); resolution metres/cell)."""
    info = msg.info
    width, height = int(info.width), int(info.height)
    resolution = float(info.resolution)
    if not np.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"info.resolution: must be positive, got {resolution}")
    buf = _as_u8(msg.data)
    if buf.size != width * height:
        raise ValueError(f"data: {buf.size} cells, expected info.width * info.height = {width} * {height} "
                         f"= {width * height}")
    grid = buf.view(np.int8).reshape(height, width).copy()
    return grid, pose_to_matrix(info.origin), resolution


def array_to_occupancy_grid(grid: np.ndarray, resolution: float, origin_T: np.ndarray | None = None, *,
                            stamp_ns: int = 0, frame_id: str = "map", flavor: str = "rclpy"):
    """grid (height, width) with values in [-1, 100] (-1 unknown) -> nav_msgs/OccupancyGrid.
    `origin_T` (4, 4): pose of cell (0, 0)'s corner in `frame_id` (identity when None)."""
    grid = np.asarray(grid)
    if grid.ndim != 2:
        raise ValueError(f"grid: expected (height, width), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid: expected an integer dtype, got {grid.dtype}")
    if grid.size and (grid.min() < -1 or grid.max() > 100):
        raise ValueError(f"grid: values must lie in [-1, 100], got [{grid.min()}, {grid.max()}]")
    resolution = float(resolution)
    if not np.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"resolution: must be positive, got {resolution}")
    height, width = grid.shape
    info = _new("nav_msgs/msg/MapMetaData", flavor, map_load_time=make_time(stamp_ns, flavor), resolution=resolution,
                width=width, height=height, origin=matrix_to_pose(np.eye(4) if origin_T is None else origin_T, flavor))
    cells = np.ascontiguousarray(grid, dtype=np.int8).reshape(-1)
    data = array.array("b", cells.tobytes()) if flavor == "rclpy" else cells.copy()
    return _new("nav_msgs/msg/OccupancyGrid", flavor, header=make_header(stamp_ns, frame_id, flavor), info=info,
                data=data)


# ----------------------------------------------------------------------------------------------------------
# ground truth messages (msg/*.msg of this package; rosbags flavor, readers duck-typed)

def _f32_clean(v: float) -> float:
    """A float32 field read back as the shortest decimal that round-trips (0.4f -> 0.4, not 0.4000000059)."""
    return float(str(np.float32(v)))


def voxel_grid_to_msg(semantics: np.ndarray, grid: GridSpec, stamp_ns: int = 0, frame_id: str = "base_link",
                      mask_camera: np.ndarray | None = None, mask_lidar: np.ndarray | None = None,
                      flavor: str = "rosbags"):
    """semantics (X, Y, Z) uint8 class ids -> vg_ros/msg/SemanticVoxelGrid (masks (X, Y, Z) bool/uint8 or None)."""
    sem = np.asarray(semantics)
    shape = tuple(grid.shape)
    if sem.shape != shape:
        raise ValueError(f"semantics: shape {sem.shape} does not match grid shape {shape}")
    if sem.dtype != np.uint8:
        if not np.issubdtype(sem.dtype, np.integer) or (sem.size and (sem.min() < 0 or sem.max() > 255)):
            raise ValueError(f"semantics: expected uint8 class ids, got {sem.dtype}")
    masks = {}
    for name, m in (("mask_camera", mask_camera), ("mask_lidar", mask_lidar)):
        if m is None:
            masks[name] = np.zeros(0, np.uint8)
            continue
        m = np.asarray(m)
        if m.shape != shape:
            raise ValueError(f"{name}: shape {m.shape} does not match grid shape {shape}")
        masks[name] = np.ascontiguousarray(m.astype(np.uint8).reshape(-1))
    origin = _new("geometry_msgs/msg/Point", flavor, x=float(grid.lower[0]), y=float(grid.lower[1]),
                  z=float(grid.lower[2]))
    sem_flat = np.ascontiguousarray(sem.astype(np.uint8).reshape(-1))
    return _new("vg_ros/msg/SemanticVoxelGrid", flavor, header=make_header(stamp_ns, frame_id, flavor), origin=origin,
                resolution=float(grid.voxel_size), size_x=shape[0], size_y=shape[1], size_z=shape[2],
                semantics=_bytes_field(sem_flat, flavor), mask_camera=_bytes_field(masks["mask_camera"], flavor),
                mask_lidar=_bytes_field(masks["mask_lidar"], flavor))


def msg_to_voxel_grid(msg) -> tuple[np.ndarray, GridSpec, np.ndarray | None, np.ndarray | None]:
    """SemanticVoxelGrid -> (semantics (X, Y, Z) uint8, GridSpec, mask_camera (X, Y, Z) bool or None,
    mask_lidar (X, Y, Z) bool or None)."""
    shape = (int(msg.size_x), int(msg.size_y), int(msg.size_z))
    n = shape[0] * shape[1] * shape[2]
    res = _f32_clean(msg.resolution)
    if not np.isfinite(res) or res <= 0:
        raise ValueError(f"resolution: must be positive, got {res}")
    sem = _as_u8(msg.semantics, "semantics")
    if sem.size != n:
        raise ValueError(f"semantics: {sem.size} values, expected size_x * size_y * size_z = {n}")
    lower = (float(msg.origin.x), float(msg.origin.y), float(msg.origin.z))
    upper = tuple(float(np.round(lo + s * res, 6)) for lo, s in zip(lower, shape))
    grid = GridSpec(lower=lower, upper=upper, voxel_size=res)  # type: ignore[arg-type]
    if tuple(grid.shape) != shape:
        raise ValueError(f"resolution: {res} with sizes {shape} does not give a consistent grid")
    masks = []
    for name in ("mask_camera", "mask_lidar"):
        m = _as_u8(getattr(msg, name), name)
        if m.size == 0:
            masks.append(None)
        elif m.size != n:
            raise ValueError(f"{name}: {m.size} values, expected 0 or {n}")
        else:
            masks.append(m.reshape(shape).astype(bool))
    return sem.reshape(shape).copy(), grid, masks[0], masks[1]


def expression_to_msg(expr: Expression, stamp_ns: int | None = None, frame_id: str = "", flavor: str = "rosbags"):
    """Expression -> vg_ros/msg/GroundingTarget (mask as mono8, 255 on the target). `stamp_ns` defaults to
    expr.stamp_ns."""
    stamp = expr.stamp_ns if stamp_ns is None else stamp_ns
    mask = np.asarray(expr.mask)
    if mask.ndim != 2:
        raise ValueError(f"mask: expected (H, W), got {mask.shape}")
    box = np.asarray(expr.box, dtype=np.float32).reshape(-1)
    if box.size != 4:
        raise ValueError(f"box: expected 4 values, got {box.size}")
    if not 0 <= int(expr.hops) <= 255:
        raise ValueError(f"hops: must fit uint8, got {expr.hops}")
    mask_msg = array_to_image(np.where(mask.astype(bool), 255, 0).astype(np.uint8), "mono8", stamp_ns=stamp,
                              frame_id=frame_id, flavor=flavor)
    return _new("vg_ros/msg/GroundingTarget", flavor, header=make_header(stamp, frame_id, flavor),
                command=str(expr.text), camera=str(expr.camera), instance_id=int(expr.instance_id),
                hops=int(expr.hops), box=box.copy(), mask=mask_msg)


def msg_to_expression(msg) -> Expression:
    """GroundingTarget -> Expression (mask (H, W) bool)."""
    mask = image_to_array(msg.mask)
    if mask.ndim != 2:
        raise ValueError(f"mask.encoding: expected a one-channel mask, got {msg.mask.encoding!r}")
    box = np.asarray(msg.box, dtype=np.float32).reshape(-1)
    if box.size != 4:
        raise ValueError(f"box: expected 4 values, got {box.size}")
    if not np.all(np.isfinite(box)):   # a NaN corner scores every answer a miss
        raise ValueError(f"box: not finite ({box.tolist()})")
    return Expression(text=str(msg.command), camera=str(msg.camera), instance_id=int(msg.instance_id),
                      box=box.astype(np.float64), mask=mask > 0, hops=int(msg.hops), stamp_ns=stamp_of(msg))


# ----------------------------------------------------------------------------------------------------------
# grounding outputs (what grounding_node publishes and `vg-ros replay` writes)

def grounding_to_msgs(result: Any, stamp_ns: int, frame_id: str, flavor: str = "rclpy"):
    """A GroundingResult -> (sensor_msgs/Image mono8 mask, geometry_msgs/PolygonStamped box), both with the
    image's stamp and frame. Found: the mask is 255 on the target and the polygon holds the box corners
    (x0,y0) (x1,y0) (x1,y1) (x0,y1) in pixels with the score in every z. Not found: an all-zero mask of the
    same size and an EMPTY polygon."""
    mask = np.asarray(result.mask, dtype=bool)
    mask_msg = array_to_image(mask.astype(np.uint8) * 255 if result.found else np.zeros(mask.shape, np.uint8),
                              "mono8", stamp_ns=stamp_ns, frame_id=frame_id, flavor=flavor)
    points = []
    if result.found:
        x0, y0, x1, y1 = (float(v) for v in result.box)
        z = float(result.score)
        points = [_new("geometry_msgs/msg/Point32", flavor, x=x, y=y, z=z)
                  for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    box_msg = _new("geometry_msgs/msg/PolygonStamped", flavor, header=make_header(stamp_ns, frame_id, flavor),
                   polygon=_new("geometry_msgs/msg/Polygon", flavor, points=points))
    return mask_msg, box_msg


def point_to_point_stamped(xyz, stamp_ns: int = 0, frame_id: str = "", flavor: str = "rclpy"):
    """(3,) -> geometry_msgs/PointStamped."""
    x, y, z = (float(v) for v in np.asarray(xyz, dtype=np.float64).reshape(3))
    return _new("geometry_msgs/msg/PointStamped", flavor, header=make_header(stamp_ns, frame_id, flavor),
                point=_new("geometry_msgs/msg/Point", flavor, x=x, y=y, z=z))
