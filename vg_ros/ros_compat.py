"""The one import seam for ROS pieces a real ROS 2 install has but pip has not.

`launch`, `launch_ros`, `message_filters`, `tf2_ros`, `tf2_msgs` and `cv_bridge` come with a ROS 2
distribution (apt / colcon), not with the `ros-jazzy-*` wheels this package's virtualenv uses. Code
elsewhere never tries these imports itself: it reads a `HAVE_*` flag here and takes the tested path
without the piece when the flag is False:

    HAVE_MESSAGE_FILTERS  False -> vg_ros.nodes.inputs.ApproxTimeSync's own policy (same semantics)
    HAVE_TF2_ROS          False -> extrinsics from /tf_static (if HAVE_TF2_MSGS) else the rig YAML
    HAVE_TF2_MSGS         False -> no live /tf or /tf_static publishing or subscribing; rig YAML only
    HAVE_CV_BRIDGE        False -> vg_ros.convert.array_to_image / image_to_rgb (always used here)
    HAVE_LAUNCH(_ROS)     False -> `vg-ros up` runs the nodes; the launch file is checked by parsing

`rclpy` itself is a hard dependency of the nodes but not of replay/convert; `HAVE_RCLPY` says whether
it imports. `missing()` lists what is absent, for logs and `vg-ros up --help`.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import MutableMapping
from pathlib import Path
from types import ModuleType


def _probe(module_name: str, attribute: str) -> ModuleType | None:
    """The module when it imports *and* has `attribute`, else None.

    The attribute check matters: a checkout with a `launch/` folder on `sys.path` makes `import launch`
    succeed as an empty namespace package, which is not the launch library.
    """
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - ImportError, or a broken install raising anything on import
        return None
    return module if hasattr(module, attribute) else None


rclpy = _probe("rclpy", "init")
launch = _probe("launch", "LaunchDescription")
launch_ros = _probe("launch_ros", "actions")
message_filters = _probe("message_filters", "ApproximateTimeSynchronizer")
tf2_ros = _probe("tf2_ros", "Buffer")
cv_bridge = _probe("cv_bridge", "CvBridge")
_tf2_msgs = _probe("tf2_msgs.msg", "TFMessage")
TFMessage = getattr(_tf2_msgs, "TFMessage", None)

HAVE_RCLPY = rclpy is not None
HAVE_LAUNCH = launch is not None
HAVE_LAUNCH_ROS = launch_ros is not None
HAVE_MESSAGE_FILTERS = message_filters is not None
HAVE_TF2_ROS = tf2_ros is not None
HAVE_TF2_MSGS = TFMessage is not None
HAVE_CV_BRIDGE = cv_bridge is not None

# What each missing piece costs, for one log line at node start.
FALLBACKS: dict[str, str] = {
    "rclpy": "no live nodes, play or record; replay and the CLI still work",
    "launch": "use `vg-ros up` instead of `ros2 launch`",
    "launch_ros": "use `vg-ros up` instead of `ros2 launch`",
    "message_filters": "approximate-time sync by vg_ros.nodes.inputs.ApproxTimeSync",
    "tf2_ros": "extrinsics from /tf_static when tf2_msgs exists, else from the rig YAML",
    "tf2_msgs": "no /tf or /tf_static over DDS; extrinsics from the rig YAML",
    "cv_bridge": "images converted by vg_ros.convert",
}


def available() -> dict[str, bool]:
    """Every optional piece and whether it imports here."""
    return {
        "rclpy": HAVE_RCLPY, "launch": HAVE_LAUNCH, "launch_ros": HAVE_LAUNCH_ROS,
        "message_filters": HAVE_MESSAGE_FILTERS, "tf2_ros": HAVE_TF2_ROS, "tf2_msgs": HAVE_TF2_MSGS,
        "cv_bridge": HAVE_CV_BRIDGE,
    }


def missing() -> list[str]:
    """'name (fallback)' for every optional piece that does not import."""
    return [f"{name} ({FALLBACKS[name]})" for name, ok in available().items() if not ok]


DDS_PROFILES = Path(__file__).resolve().parent.parent / "config" / "fastdds_profiles.xml"
_PROFILE_VARS = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")  # Fast DDS 2.x, 3.x


def ensure_ros_log_dir(environ: MutableMapping[str, str] | None = None) -> str | None:
    """A log directory rclpy can write: rclpy.init fails ("failed to initialize logging") when $HOME is
    unset or read-only (a container under an arbitrary uid) and neither ROS_LOG_DIR nor ROS_HOME is set.
    Then ROS_LOG_DIR is set in `environ` to a folder under the temp directory. Returns it, or None when the
    default (~/.ros/log) or the user's setting stands."""
    environ = os.environ if environ is None else environ
    if environ.get("ROS_LOG_DIR") or environ.get("ROS_HOME"):
        return None
    if home := environ.get("HOME", ""):
        default = Path(home) / ".ros" / "log"
        try:
            default.mkdir(parents=True, exist_ok=True)
            if os.access(default, os.W_OK):
                return None
        except OSError:
            pass
    import tempfile
    folder = Path(tempfile.gettempdir()) / f"vg_ros-ros-log-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    environ["ROS_LOG_DIR"] = str(folder)
    return str(folder)


def use_dds_profiles(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point Fast DDS at config/fastdds_profiles.xml (100 ms reliable heartbeats; see the file) in
    `environ` (default os.environ) unless the user set a profiles file; call before rclpy.init or when
    building a child process's environment. Returns the file in effect, None when there is none. For this
    process's own environment (`environ` None, before its rclpy.init) it also gives rclpy a log directory it
    can write (`ensure_ros_log_dir`)."""
    if environ is None:
        ensure_ros_log_dir()
    environ = os.environ if environ is None else environ
    for var in _PROFILE_VARS:
        if environ.get(var):
            return environ[var]
    if not DDS_PROFILES.is_file():
        return None
    for var in _PROFILE_VARS:
        environ[var] = str(DDS_PROFILES)
    return str(DDS_PROFILES)


def require_rclpy(what: str) -> ModuleType:
    """rclpy, or a RuntimeError saying what needs it and how to get it."""
    if rclpy is None:
        raise RuntimeError(f"{what} needs rclpy: install the ros-jazzy-rclpy wheels (./run does) "
                           "or source a ROS 2 Jazzy install")
    return rclpy
