"""The three vg_ros perception nodes with config/perception.yaml, for a ROS 2 Jazzy install.

    ros2 launch vg_ros perception.launch.py                       # all three nodes, default rig, device auto
    ros2 launch vg_ros perception.launch.py nodes:=registration,grounding device:=cpu
    ros2 launch vg_ros perception.launch.py bag:=drive.mcap rate:=0.5        # plays the bag with --clock
    ros2 launch vg_ros perception.launch.py remappings:=/lidar/points:=/velodyne_points
    ros2 launch vg_ros perception.launch.py rviz:=true                        # and RViz with config/perception.rviz
    ros2 launch vg_ros perception.launch.py namespace:=robot1                 # nodes and topics under /robot1

Launch arguments: config (params file), rig (name or YAML path), device (cpu | cuda | auto), nodes
(comma list of occupancy, registration, grounding), use_sim_time (true | false; forced true when a
bag is played), remappings (';'- or ','-separated FROM:=TO pairs, applied to every node), namespace (the nodes
and their data topics: /robot1/lidar/points, ...; /tf and /diagnostics stay global),
bag (a rosbag2 to play with `ros2 bag play --clock`; with a namespace, with `vg-ros play --namespace`, which
publishes its data topics under it), rate (its playback rate), bag_delay (seconds before it plays, default
15: the nodes load their models and subscribe first, else the bag's first seconds play to nobody), threads (OpenMP / MKL
threads per node, torch's pool; 0: CPU cores / nodes, at least 1, so the nodes do not oversubscribe the cores),
rviz (true: also start rviz2 with config/perception.rviz), respawn (true: a node that dies is started
again after 2 s, as `vg-ros up --respawn`), autostart (false: the nodes wait unconfigured for a lifecycle
manager, e.g. Nav2's lifecycle_manager with their names in node_names and bond_timeout 0.0, or
`ros2 lifecycle set`).
Without a ROS install, `vg-ros up` runs the same nodes with the same YAML (and the same threads rule).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, LogInfo, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "vg_ros"
# capability -> executable (console_scripts in setup.py) and node name (section in perception.yaml)
NODES = {
    "occupancy": "occupancy_node",
    "registration": "registration_node",
    "grounding": "grounding_node",
}
DEVICES = ("cpu", "cuda", "auto")


def parse_remappings(text):
    """'/a:=/b;/c:=/d' (or ',' separated) -> [('/a', '/b'), ('/c', '/d')]. Bad pairs raise ValueError."""
    pairs = []
    for item in text.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        src, sep, dst = item.partition(":=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"remappings: {item!r} is not FROM:=TO")
        pairs.append((src.strip(), dst.strip()))
    return pairs


def parse_nodes(text):
    """'occupancy,registration' -> ['occupancy', 'registration'] (a '_node' suffix is accepted)."""
    chosen = []
    for item in text.split(","):
        item = item.strip()
        if item.endswith("_node"):
            item = item[: -len("_node")]
        if not item:
            continue
        if item not in NODES:
            raise ValueError(f"nodes: unknown node {item!r}; choose from {', '.join(NODES)}")
        if item not in chosen:
            chosen.append(item)
    if not chosen:
        raise ValueError("nodes: choose at least one of " + ", ".join(NODES))
    return chosen


def thread_env(text, n_nodes, cpu_count=None):
    """The `threads` argument -> environment of each node: OMP_NUM_THREADS (torch's intra-op pool) and
    MKL_NUM_THREADS; '0': CPU cores / nodes, at least 1 (as `vg-ros up`). numpy's OpenBLAS runs on one thread in
    every node regardless (`vg_ros.nodes.process.limit_blas_threads`). ValueError for anything but a whole number
    >= 0."""
    try:
        threads = int(str(text).strip())
    except ValueError:
        raise ValueError(f"threads: {text!r} is not a whole number") from None
    if threads < 0:
        raise ValueError(f"threads: {threads} must be >= 0 (0: cores / nodes)")
    threads = threads or max(1, (cpu_count or os.cpu_count() or 1) // max(1, n_nodes))
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def namespace_of(text):
    """The namespace argument -> '/robot1' ('' or '/' -> '/'); ValueError for a name ROS would refuse."""
    tokens = [t for t in str(text).strip().split("/") if t]
    for token in tokens:
        if not (token[0].isalpha() or token[0] == "_") or not token.isascii() \
                or not all(c.isalnum() or c == "_" for c in token):
            raise ValueError(f"namespace: {text!r}: {token!r} is not a valid ROS name token")
    return "/" + "/".join(tokens)


def namespaced_view(view, namespace):
    """A copy of the RViz config `view` whose display topics (absolute, as the nodes publish them without a
    namespace) are moved under `namespace`; the frames and /tf stay. Returns the copy's path."""
    import tempfile
    with open(view) as f:
        lines = f.read().splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith("Value: /") and i and lines[i - 1].strip() == "Topic:":
            line = line.replace("Value: /", f"Value: {namespace}/", 1)
        out.append(line)
    handle, path = tempfile.mkstemp(prefix="vg_ros_", suffix=".rviz")   # one small file per launch, in /tmp
    with os.fdopen(handle, "w") as f:
        f.writelines(out)
    return path


def bag_delay(text):
    """The bag_delay argument (seconds before the bag plays, so the nodes have loaded their models and
    subscribed: a bag started with them would play its first seconds to nobody) -> the seconds; ValueError
    for anything but a number >= 0."""
    try:
        seconds = float(str(text).strip())
    except ValueError:
        raise ValueError(f"bag_delay: {text!r} is not a number of seconds") from None
    if not seconds >= 0:
        raise ValueError(f"bag_delay: {seconds} must be >= 0")
    return seconds


def _is_true(text):
    return str(text).strip().lower() in ("true", "1", "yes", "on")


def launch_setup(context, *args, **kwargs):
    """Builds the actions once the launch arguments are known."""
    value = {name: LaunchConfiguration(name).perform(context)
             for name in ("config", "rig", "device", "nodes", "use_sim_time", "remappings", "namespace",
                          "bag", "rate", "bag_delay", "threads", "rviz", "respawn", "autostart")}
    if value["device"] not in DEVICES:
        raise ValueError(f"device: {value['device']!r} must be one of {', '.join(DEVICES)}")
    bag = value["bag"].strip()
    use_sim_time = _is_true(value["use_sim_time"]) or bool(bag)
    overrides = {"rig": value["rig"], "device": value["device"], "use_sim_time": use_sim_time,
                 "autostart": _is_true(value["autostart"])}
    remappings = parse_remappings(value["remappings"])
    # Fast DDS profile with 100 ms reliable heartbeats (config/fastdds_profiles.xml says why), unless the
    # user chose a profiles file
    env = {}
    if not (os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE") or os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")):
        profiles = os.path.join(get_package_share_directory(PACKAGE), "config", "fastdds_profiles.xml")
        env = {"FASTRTPS_DEFAULT_PROFILES_FILE": profiles, "FASTDDS_DEFAULT_PROFILES_FILE": profiles}
    chosen = parse_nodes(value["nodes"])
    env.update(thread_env(value["threads"], len(chosen)))
    # each node also reads its own section of the file (as under `vg-ros up`): rcl applies a params file's
    # plain `occupancy_node:` keys to /occupancy_node only, so in a namespace the file would not apply otherwise
    env["VG_ROS_CONFIG"] = value["config"]
    namespace = namespace_of(value["namespace"])
    actions = [LogInfo(msg=f"vg_ros: nodes {value['nodes']} with {value['config']}, rig {value['rig']}, "
                           f"device {value['device']}, use_sim_time {use_sim_time}")]
    for capability in chosen:
        executable = NODES[capability]
        actions.append(Node(
            package=PACKAGE,
            executable=executable,
            name=executable,
            namespace=namespace,
            parameters=[value["config"], overrides],
            remappings=remappings,
            output="screen",
            emulate_tty=True,
            additional_env=env,
            respawn=_is_true(value["respawn"]),
            respawn_delay=2.0,
        ))
    if _is_true(value["rviz"]):
        view = os.path.join(get_package_share_directory(PACKAGE), "config", "perception.rviz")
        if namespace != "/":
            view = namespaced_view(view, namespace)
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", arguments=["-d", view],
                            parameters=[{"use_sim_time": use_sim_time}], output="screen"))
    # ros2 bag play refuses --delay 0 (it wants a positive number); vg-ros play then waits its 1 s for discovery
    seconds = bag_delay(value["bag_delay"]) if bag else 0.0
    delay = ["--delay", str(seconds)] if seconds > 0 else []
    if bag and namespace != "/":
        # ros2 bag play keeps the bag's recorded names; vg-ros play publishes every topic but /clock, /tf and
        # /tf_static under the namespace, where the nodes read them (and /clock itself)
        actions.append(ExecuteProcess(
            cmd=["ros2", "run", PACKAGE, "vg-ros", "play", bag, "--rate", value["rate"], "--namespace", namespace,
                 *delay],
            output="screen",
            additional_env=env,
        ))
    elif bag:
        actions.append(ExecuteProcess(
            cmd=["ros2", "bag", "play", bag, "--clock", "--rate", value["rate"], *delay],
            output="screen",
        ))
    return actions


def generate_launch_description():
    default_config = os.path.join(get_package_share_directory(PACKAGE), "config", "perception.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("config", default_value=default_config,
                              description="ROS 2 params file for the three nodes"),
        DeclareLaunchArgument("rig", default_value="default",
                              description="rig name (config/rig_<name>.yaml) or path; extrinsics when TF has none"),
        DeclareLaunchArgument("device", default_value="auto", choices=list(DEVICES),
                              description="compute device for the models"),
        DeclareLaunchArgument("nodes", default_value=",".join(NODES),
                              description="comma list of nodes to run: " + ", ".join(NODES)),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"],
                              description="follow /clock (forced true when bag is given)"),
        DeclareLaunchArgument("remappings", default_value="",
                              description="topic remappings FROM:=TO, ';'-separated, applied to every node"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="namespace for the nodes and their data topics (robot1: /robot1/lidar/points)"),
        DeclareLaunchArgument("bag", default_value="",
                              description="a rosbag2 to play into the nodes (ros2 bag play --clock)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate of bag"),
        DeclareLaunchArgument("bag_delay", default_value="15.0",
                              description="seconds before the bag plays: the nodes load their models first"),
        DeclareLaunchArgument("threads", default_value="0",
                              description="OpenMP/MKL (torch) threads per node (0: CPU cores / nodes, at least 1)"),
        DeclareLaunchArgument("rviz", default_value="false", choices=["true", "false"],
                              description="also start rviz2 with config/perception.rviz"),
        DeclareLaunchArgument("respawn", default_value="false", choices=["true", "false"],
                              description="start a node that dies again after 2 s"),
        DeclareLaunchArgument("autostart", default_value="true", choices=["true", "false"],
                              description="configure and activate the (lifecycle) nodes at start; false: a "
                                          "lifecycle manager does"),
        OpaqueFunction(function=launch_setup),
    ])
