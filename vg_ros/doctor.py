"""`vg-ros doctor`: can the nodes run on this machine? One line per check, with the fix when one fails.

    vg-ros doctor [--json] [--config config/perception.yaml] [--skip-models]

Checks, in the order a bring-up meets them: Python and torch (and whether CUDA is there), rclpy and the
RMW, the DDS environment (domain, discovery range), DDS delivering a message to this very process (the
"nodes run but hear nothing" failure: loopback down, shared memory refused in a container), the optional
ROS pieces and their fallbacks, Open3D (which needs Debian's libusb) and small_gicp, the ROS parameters
file (every node's section validates), every shipped checkpoint (readable safetensors with its model
card), and, unless `--skip-models`, the three pipelines built as the nodes build them (the packaged text
encoder included) and run once on a synthetic input. Statuses: ok, warn (works, but look), fail (a node
would not run). Exit code 1 when anything fails, else 0; `--json` prints {"ok", "checks": [{"name",
"status", "detail", "fix"}]}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

OK, WARN, FAIL = "ok", "warn", "fail"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def check_python() -> Check:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", FAIL, version, "Python 3.10 or newer (3.11 is what the ros-jazzy wheels and CI use)")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", FAIL, str(exc), "pip install torch==2.13.0 (CPU; on a CUDA robot its CUDA build)")
    cuda = torch.cuda.is_available()
    where = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if cuda else "no CUDA: the models run on CPU"
    return Check("torch", OK, f"{torch.__version__}; {where}; {torch.get_num_threads()} CPU threads")


def check_rclpy() -> Check:
    from vg_ros import ros_compat
    if not ros_compat.HAVE_RCLPY:
        return Check("rclpy", FAIL, "rclpy does not import: no live nodes (replay and the CLI still work)",
                     "source /opt/ros/jazzy/setup.bash, or pip install ros-jazzy-rclpy ros-jazzy-rmw-fastrtps-cpp")
    rmw = os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp (default)")
    return Check("rclpy", OK, f"imports; RMW {rmw}")


def discovery_scope() -> str:
    """ROS_AUTOMATIC_DISCOVERY_RANGE as the rmw reads it (LOCALHOST for the older ROS_LOCALHOST_ONLY=1)."""
    return os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") or ("LOCALHOST" if os.environ.get("ROS_LOCALHOST_ONLY")
                                                              == "1" else "SUBNET (default)")


def fast_dds() -> bool:
    return os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") == "rmw_fastrtps_cpp"


def check_dds_environment() -> Check:
    from vg_ros import ros_compat
    domain = os.environ.get("ROS_DOMAIN_ID")
    scope = discovery_scope()
    detail = f"ROS_DOMAIN_ID={domain if domain is not None else 'unset (0)'}, discovery {scope}"
    if fast_dds():
        profile = ros_compat.use_dds_profiles(dict(os.environ))   # what a vg_ros process loads (not set here)
        detail += f"; Fast DDS profile {profile or 'none'}"
        if scope == "LOCALHOST":
            # measured with rmw_fastrtps_cpp 8.4 (docs/bringup.md): it adds its own transports here
            detail += ("; the rmw adds its shared memory (512 KB segment) + UDP, a profile's transports go beside "
                       "them, FASTDDS_BUILTIN_TRANSPORTS does not apply")
    if domain is None:
        return Check("dds environment", WARN, detail, "export ROS_DOMAIN_ID=<your robot's id>: domain 0 is "
                     "everybody's default, so other machines' nodes on the network mix with these")
    return Check("dds environment", OK, detail)


SHM_DEFAULT_MB = 0.5   # Fast DDS's own segment, when a profile sets none
SHM_PROCESSES = 8      # three nodes, a player, a recorder, drivers: room for this many segments, else WARN


def profile_segment_mb(profile: str | None) -> float:
    """The largest shared-memory `segment_size` (MB) a Fast DDS profile file sets (the shipped
    config/fastdds_profiles.xml: 4), else Fast DDS's default."""
    import xml.etree.ElementTree as ET
    try:
        sizes = [int(e.text) for e in ET.parse(profile).iter() if e.tag.rsplit("}", 1)[-1] == "segment_size"]
    except (OSError, TypeError, ValueError, ET.ParseError):
        sizes = []
    return max(sizes) / 2**20 if sizes else SHM_DEFAULT_MB


def check_shared_memory(path: str = "/dev/shm") -> Check:
    """Room in /dev/shm for the Fast DDS segments: each ROS process maps one there, of the size the profile a
    vg_ros process loads sets (the shipped one's, which large best-effort clouds need); a container's default
    64 MB holds a few."""
    from vg_ros import ros_compat
    if not fast_dds():
        return Check("shared memory", OK, "not Fast DDS: no vg_ros segment settings")
    segment_mb = profile_segment_mb(ros_compat.use_dds_profiles(dict(os.environ)))
    try:
        stat = os.statvfs(path)
    except OSError as exc:
        return Check("shared memory", WARN, f"{path}: {exc}: Fast DDS falls back to UDP, large best-effort "
                     "messages may not arrive", "run with a /dev/shm (docker: --ipc=host or --shm-size=512m)")
    free_mb = stat.f_bavail * stat.f_frsize / 2**20
    detail = (f"{path} {free_mb:.0f} MB free; each ROS process with the vg_ros profile maps a {segment_mb:g} MB "
              "segment (clouds and camera bursts larger than Fast DDS's default 512 KB need it)")
    if free_mb < segment_mb * SHM_PROCESSES:
        return Check("shared memory", WARN, detail, f"give it at least {segment_mb * SHM_PROCESSES:g} MB "
                     "(docker: --shm-size=512m or --ipc=host)")
    return Check("shared memory", OK, detail)


def check_dds_loopback(timeout_s: float = 5.0) -> Check:
    """A publisher and a subscription in one fresh context: does DDS deliver to this very process?"""
    from vg_ros import ros_compat
    if not ros_compat.HAVE_RCLPY:
        return Check("dds loopback", FAIL, "rclpy missing", "see the rclpy check")
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    ros_compat.use_dds_profiles()
    context = Context()
    rclpy.init(context=context)
    node = None
    try:
        node = rclpy.create_node(f"vg_ros_doctor_{uuid.uuid4().hex[:8]}", context=context)
        topic = f"/vg_ros_doctor/t{uuid.uuid4().hex[:8]}"   # a name token may not start with a digit
        got: list[str] = []
        node.create_subscription(String, topic, lambda m: got.append(m.data), 10)
        pub = node.create_publisher(String, topic, 10)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        start = time.monotonic()
        while not got and time.monotonic() - start < timeout_s:
            if pub.get_subscription_count():
                pub.publish(String(data="ping"))
            executor.spin_once(timeout_sec=0.05)
        seconds = time.monotonic() - start
        executor.shutdown()
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
    if not got:
        transport = ("in a container give it shared memory (--ipc=host, or a larger --shm-size): under LOCALHOST "
                     "discovery the rmw always uses it" if discovery_scope() == "LOCALHOST" else
                     "in a container allow shared memory or use FASTDDS_BUILTIN_TRANSPORTS=UDPv4")
        return Check("dds loopback", FAIL, f"a message to this process did not arrive in {timeout_s:g} s",
                     f"check that the loopback interface is up (ip link set lo up); {transport}")
    return Check("dds loopback", OK, f"a message to this process arrived after {seconds * 1000:.0f} ms")


def check_optional_ros() -> Check:
    from vg_ros import ros_compat
    missing = ros_compat.missing()
    if not missing:
        return Check("optional ROS pieces", OK, "launch, message_filters, tf2_ros, tf2_msgs, cv_bridge all import")
    return Check("optional ROS pieces", OK, "missing, each with its tested fallback: " + "; ".join(missing))


def check_point_cloud_libraries() -> Check:
    try:
        import small_gicp  # noqa: F401
    except ImportError as exc:
        return Check("point-cloud libraries", FAIL, f"small_gicp: {exc}", "pip install small-gicp")
    try:
        import open3d  # noqa: F401
    except (ImportError, OSError) as exc:
        fix = ("sudo apt-get install -y libusb-1.0-0" if "libusb" in str(exc)
               else "pip install open3d-cpu (or open3d)")
        return Check("point-cloud libraries", FAIL, f"open3d: {exc}", fix)
    return Check("point-cloud libraries", OK, f"open3d {open3d.__version__}, small_gicp")


def check_config(config: Path | None) -> Check:
    from vg_ros.config import default_config_path
    from vg_ros.replay import PIPELINES, node_settings
    path = Path(config) if config else default_config_path()
    if not path.is_file():
        return Check("parameters file", FAIL, f"{path}: no such file", "pass --config FILE")
    from vg_ros.config import NODE_NAMES, unknown_sections
    problems = []
    try:
        if stray := unknown_sections(path):
            problems.append(f"section(s) {stray} match no node ({', '.join(NODE_NAMES)} or /**; misspelt?)")
    except Exception as exc:  # noqa: BLE001 - not YAML: node_settings below names it too
        problems.append(f"not a readable parameters file ({exc})")
    for capability in PIPELINES:
        try:
            node_settings(capability, path)   # resolved as the node and replay resolve them
        except Exception as exc:  # noqa: BLE001 - report any reason the section would not load
            problems.append(f"{capability}: {exc}")
    if problems:
        return Check("parameters file", FAIL, f"{path}: " + "; ".join(problems), "fix the values named")
    return Check("parameters file", OK, f"{path}: every node's section validates")


def check_weights(weights_dir: Path = WEIGHTS_DIR) -> Check:
    from vg_ros.checkpoint import _read_safetensors
    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        return Check("checkpoints", FAIL, f"no .safetensors in {weights_dir}", "reinstall vg_ros (the weights ship "
                     "with it) or train them: vg-ros train <model>")
    bad = []
    for path in files:
        try:
            _read_safetensors(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a corrupt file
            bad.append(f"{path.name} unreadable ({str(exc)[:80]})")
            continue
        if not path.with_suffix(".md").is_file():
            bad.append(f"{path.name} has no model card")
    if bad:
        return Check("checkpoints", FAIL, "; ".join(bad), "reinstall vg_ros or retrain the named model "
                     "(its card gives the command)")
    return Check("checkpoints", OK, f"{len(files)} readable, each with its model card, in {weights_dir}")


def check_pipelines() -> Check:
    """The three pipelines as the nodes build them (default weights, CPU), each run once."""
    import numpy as np

    from vg_ros.sim import simulate
    from vg_ros.types import CameraFrame
    timings = []
    try:
        frame = next(iter(simulate(4242, 0.1, occupancy=False, expressions=0)))
        cameras = [CameraFrame(cam, frame.images[cam.name], frame.stamp_ns) for cam in frame.rig.cameras]
        start = time.perf_counter()
        from vg_ros.occupancy.pipeline import OccupancyConfig, OccupancyPipeline
        occupancy = OccupancyPipeline(OccupancyConfig(device="cpu"), weights="default", device="cpu")
        occupancy.infer(cameras, frame.stamp_ns)
        timings.append(f"occupancy {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        from vg_ros.registration.pipeline import RegistrationPipeline
        registration = RegistrationPipeline(weights="default", device="cpu")
        xyz = np.asarray(frame.lidar.xyz)
        registration.register(xyz, xyz)
        timings.append(f"registration {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
        grounding = GroundingPipeline(GroundingConfig(), weights="default", device="cpu")
        grounding.set_command("the red car")
        grounding.infer(cameras[0], frame.stamp_ns)
        timings.append(f"grounding with its text encoder {time.perf_counter() - start:.1f} s")
    except Exception as exc:  # noqa: BLE001 - whatever stops a pipeline is what the user must see
        done = ", ".join(timings) or "none"
        return Check("pipelines", FAIL, f"{type(exc).__name__}: {exc} (built and run before it: {done})",
                     "the message names the missing piece; `./run --help` reinstalls the pinned dependencies")
    return Check("pipelines", OK, "built and run once on a simulated frame: " + ", ".join(timings))


def run_checks(config: Path | None = None, models: bool = True,
               progress: Callable[[Check], None] | None = None) -> list[Check]:
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python), ("torch", check_torch), ("rclpy", check_rclpy),
        ("dds environment", check_dds_environment), ("dds loopback", check_dds_loopback),
        ("shared memory", check_shared_memory),
        ("optional ROS pieces", check_optional_ros), ("point-cloud libraries", check_point_cloud_libraries),
        ("parameters file", lambda: check_config(config)), ("checkpoints", check_weights)]
    if models:
        steps.append(("pipelines", check_pipelines))
    checks = []
    for name, step in steps:
        try:
            check = step()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is itself a finding
            check = Check(name, FAIL, f"the check itself raised {type(exc).__name__}: {exc}")
        checks.append(check)
        if progress is not None:
            progress(check)
    return checks


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vg-ros doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--config", default=None, help="ROS params file to validate (default config/perception.yaml)")
    parser.add_argument("--skip-models", action="store_true", help="do not build and run the three pipelines")
    args = parser.parse_args(argv)

    def show(check: Check) -> None:
        mark = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}[check.status]
        print(f"[{mark}] {check.name}: {check.detail}" + (f"\n         fix: {check.fix}" if check.fix else ""),
              flush=True)

    checks = run_checks(args.config, models=not args.skip_models, progress=None if args.json else show)
    failed = [c.name for c in checks if c.status == FAIL]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, sort_keys=True))
    else:
        print("all checks passed" if not failed else f"{len(failed)} failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0
