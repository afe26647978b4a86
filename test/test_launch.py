"""launch/perception.launch.py without ROS's launch installed (parsed, and executed against small
stand-ins of the launch API), config/perception.yaml against each node's parameters, and `vg-ros up`'s
supervisor: a killed node is reported, not restarted, and the others keep publishing."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import signal
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import yaml

from ros_helpers import ros_session
from vg_ros import ros_compat
from vg_ros.up import NODES, NodeSpec, Supervisor, node_spec, parse_nodes, threads_per_node

REPO = Path(__file__).resolve().parent.parent
LAUNCH_FILE = REPO / "launch" / "perception.launch.py"
EXPECTED_ARGS = {"config", "rig", "device", "nodes", "use_sim_time", "remappings", "namespace", "bag", "rate",
                 "bag_delay", "threads", "rviz", "respawn", "autostart"}


def console_scripts() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return dict(e.replace(" ", "").split("=", 1) for e in entries)
    raise AssertionError("setup.py has no console_scripts")


# ------------------------------------------------------------------------------- static structure


def test_launch_file_structure_by_ast():
    tree = ast.parse(LAUNCH_FILE.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"os", "tempfile", "ament_index_python.packages", "launch", "launch.actions",
                        "launch.substitutions", "launch_ros.actions"}, imported
    declared = {c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call)
                and getattr(c.func, "id", None) == "DeclareLaunchArgument"}
    assert declared == EXPECTED_ARGS
    nodes_literal = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                         and getattr(n.targets[0], "id", None) == "NODES")
    assert nodes_literal == {cap: name for cap, (name, _) in NODES.items()}, "launch file and vg-ros up disagree"
    scripts = console_scripts()
    for cap, (executable, module) in NODES.items():
        assert scripts.get(executable) == f"{module}:main", f"{executable} is not a console script of {module}:main"
    assert "generate_launch_description" in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}


def node_class(capability: str):
    """The node class of `capability`: the PerceptionNode subclass its module defines."""
    from vg_ros.nodes.base import PerceptionNode
    module = importlib.import_module(NODES[capability][1])
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, PerceptionNode)
               and v is not PerceptionNode and v.__module__ == module.__name__]
    assert len(classes) == 1, f"{module.__name__} should define one PerceptionNode subclass, has {classes}"
    return classes[0]


@pytest.mark.parametrize("capability", list(NODES))
def test_yaml_section_matches_the_node_and_its_pipeline_config(capability):
    import dataclasses

    from vg_ros.nodes.base import COMMON_PARAMS
    if importlib.util.find_spec(NODES[capability][1]) is None:
        pytest.skip(f"{NODES[capability][1]} is not in this checkout yet")
    cls = node_class(capability)
    name = NODES[capability][0]
    assert cls.default_node_name == name
    data = yaml.safe_load((REPO / "config" / "perception.yaml").read_text())
    assert name in data, f"config/perception.yaml has no section {name}"
    params = data[name].get("ros__parameters") or {}
    known = set(COMMON_PARAMS) | set(cls.node_params) | {"use_sim_time"}
    if cls.config_cls is not None:
        known |= {f.name for f in dataclasses.fields(cls.config_cls)}
        from vg_ros.config import split_params
        cfg_values, _ = split_params(params, cls.config_cls)
        cls.config_cls.from_dict(cfg_values)  # every pipeline value validates (range, type)
    assert set(params) <= known, f"{name}: keys no parameter declares: {sorted(set(params) - known)}"
    assert not set(cls.node_params) & set(COMMON_PARAMS), "a node redeclares a common parameter"


def test_rviz_view_shows_what_the_nodes_publish():
    """config/perception.rviz: valid YAML, installed by setup.py, every display's topic a default output
    topic of a node (so a renamed topic cannot leave the view silently empty), every node shown."""
    from vg_ros.nodes.topics import global_topic
    view = yaml.safe_load((REPO / "config" / "perception.rviz").read_text())
    displays = view["Visualization Manager"]["Displays"]
    shown = {d["Topic"]["Value"] for d in displays if "Topic" in d}
    outputs = {}
    for capability in NODES:
        cls = node_class(capability)
        outputs.update({global_topic(default): capability for key, (default, _) in cls.node_params.items()
                        if key.endswith("_topic") and key not in ("points_topic", "image_topic", "command_topic",
                                                                  "camera_info_topic")})
    assert shown <= set(outputs), sorted(shown - set(outputs))
    assert {outputs[t] for t in shown} == set(NODES)
    assert all(d["Class"].startswith("rviz_default_plugins/") for d in displays)
    assert view["Visualization Manager"]["Global Options"]["Fixed Frame"] == "odom"
    assert 'glob("config/*.rviz")' in (REPO / "setup.py").read_text()


# ----------------------------------------------------------------------- executed against stand-ins


class Recorded:
    """Stands in for a launch action/substitution class: keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    def perform(self, context):
        return context.launch_configurations[self.args[0]]


def stub_launch_modules(monkeypatch):
    classes = {name: type(name, (Recorded,), {}) for name in
               ("LaunchDescription", "DeclareLaunchArgument", "ExecuteProcess", "LogInfo", "OpaqueFunction", "Node")}
    mods = {
        "launch": {"LaunchDescription": classes["LaunchDescription"]},
        "launch.actions": {k: classes[k] for k in ("DeclareLaunchArgument", "ExecuteProcess", "LogInfo",
                                                    "OpaqueFunction")},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {}, "launch_ros.actions": {"Node": classes["Node"]},
        "ament_index_python.packages": {"get_package_share_directory": lambda pkg: f"/opt/share/{pkg}"},
    }
    for name, attrs in mods.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("perception_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_actions(module, **overrides):
    description = module.generate_launch_description()
    declared = {a.args[0]: a.kwargs["default_value"] for a in description.args[0]
                if type(a).__name__ == "DeclareLaunchArgument"}
    context = types.SimpleNamespace(launch_configurations={**declared, **overrides})
    opaque = description.args[0][-1]
    return declared, opaque.kwargs["function"](context)


def test_launch_description_executed_against_stand_ins(monkeypatch):
    module = stub_launch_modules(monkeypatch)
    declared, actions = launch_actions(module)
    assert set(declared) == EXPECTED_ARGS
    assert declared["config"] == "/opt/share/vg_ros/config/perception.yaml"
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    assert [n.kwargs["executable"] for n in nodes] == ["occupancy_node", "registration_node", "grounding_node"]
    assert all(n.kwargs["name"] == n.kwargs["executable"] and n.kwargs["package"] == "vg_ros" for n in nodes)
    assert nodes[0].kwargs["parameters"] == ["/opt/share/vg_ros/config/perception.yaml",
                                             {"rig": "default", "device": "auto", "use_sim_time": False,
                                              "autostart": True}]
    assert not [a for a in actions if type(a).__name__ == "ExecuteProcess"]
    assert all(n.kwargs["respawn"] is False for n in nodes)
    _, respawning = launch_actions(module, respawn="true")
    assert all(n.kwargs["respawn"] is True and n.kwargs["respawn_delay"] == 2.0
               for n in respawning if type(n).__name__ == "Node")
    _, managed = launch_actions(module, autostart="false")
    assert all(n.kwargs["parameters"][1]["autostart"] is False for n in managed if type(n).__name__ == "Node")
    _, with_rviz = launch_actions(module, rviz="true", bag="/data/drive.mcap")
    rviz = [a for a in with_rviz if type(a).__name__ == "Node" and a.kwargs["package"] == "rviz2"]
    assert len(rviz) == 1 and rviz[0].kwargs["arguments"] == ["-d", "/opt/share/vg_ros/config/perception.rviz"]
    assert rviz[0].kwargs["parameters"] == [{"use_sim_time": True}]   # follows the bag's /clock like the nodes

    _, actions = launch_actions(module, nodes="grounding_node,registration", device="cpu", bag="/data/drive.mcap",
                                rate="0.5", remappings="/lidar/points:=/velodyne_points; /command:=/speech")
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    assert [n.kwargs["executable"] for n in nodes] == ["grounding_node", "registration_node"]
    assert nodes[0].kwargs["parameters"][1] == {"rig": "default", "device": "cpu", "use_sim_time": True,
                                                "autostart": True}
    assert nodes[0].kwargs["remappings"] == [("/lidar/points", "/velodyne_points"), ("/command", "/speech")]
    play = [a for a in actions if type(a).__name__ == "ExecuteProcess"]
    assert play[0].kwargs["cmd"] == ["ros2", "bag", "play", "/data/drive.mcap", "--clock", "--rate", "0.5",
                                     "--delay", "15.0"]

    assert all(n.kwargs["namespace"] == "/" and n.kwargs["additional_env"]["VG_ROS_CONFIG"] ==
               "/opt/share/vg_ros/config/perception.yaml" for n in nodes)

    with pytest.raises(ValueError, match="nodes: unknown node 'lidar'"):
        launch_actions(module, nodes="lidar")
    with pytest.raises(ValueError, match="device"):
        launch_actions(module, device="gpu")
    with pytest.raises(ValueError, match="FROM:=TO"):
        launch_actions(module, remappings="/a=/b")
    with pytest.raises(ValueError, match="bag_delay"):
        launch_actions(module, bag="/data/drive.mcap", bag_delay="-1")
    _, prompt = launch_actions(module, bag="/data/drive.mcap", bag_delay="0")
    assert "--delay" not in [a for a in prompt if type(a).__name__ == "ExecuteProcess"][0].kwargs["cmd"]


def test_launch_namespace_moves_nodes_topics_and_the_rviz_view(monkeypatch, tmp_path):
    """namespace:=robot1: every node in /robot1 (its relative data topics follow), each node told where
    its YAML is (rcl would not apply plain `occupancy_node:` keys in a namespace), RViz shown a copy of the
    view with /robot1/... topics, the bag played by `vg-ros play --namespace` (`ros2 bag play` would keep
    the bag's names); the launch file's namespace rule is `normalize_namespace`'s."""
    from vg_ros.nodes.topics import normalize_namespace
    module = stub_launch_modules(monkeypatch)
    view = tmp_path / "config" / "perception.rviz"   # the installed share directory
    view.parent.mkdir()
    view.write_text((REPO / "config" / "perception.rviz").read_text())
    monkeypatch.setattr(module, "get_package_share_directory", lambda pkg: str(tmp_path))
    _, actions = launch_actions(module, namespace="robot1/", rviz="true", bag="/data/drive.mcap")
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    ours = [n for n in nodes if n.kwargs["package"] == "vg_ros"]
    assert len(ours) == 3 and all(n.kwargs["namespace"] == "/robot1" for n in ours)
    assert all(n.kwargs["additional_env"]["VG_ROS_CONFIG"] == n.kwargs["parameters"][0] for n in ours)
    rviz_view = Path(next(n for n in nodes if n.kwargs["package"] == "rviz2").kwargs["arguments"][1])
    original = yaml.safe_load(view.read_text())["Visualization Manager"]
    moved = yaml.safe_load(rviz_view.read_text())["Visualization Manager"]
    assert [d["Topic"]["Value"] for d in moved["Displays"] if "Topic" in d] == \
        ["/robot1" + d["Topic"]["Value"] for d in original["Displays"] if "Topic" in d]
    assert moved["Global Options"] == original["Global Options"]   # frames (and /tf) stay
    rviz_view.unlink()
    play = [a for a in actions if type(a).__name__ == "ExecuteProcess"]
    assert [p.kwargs["cmd"] for p in play] == [["ros2", "run", "vg_ros", "vg-ros", "play", "/data/drive.mcap",
                                                "--rate", "1.0", "--namespace", "/robot1", "--delay", "15.0"]]
    for text in ("", "/", "robot1", "/fleet/robot_1/", "_r"):
        assert module.namespace_of(text) == normalize_namespace(text)
    for bad in ("robot-1", "1robot", "/a//b c", "rob\u00f6t"):
        with pytest.raises(ValueError, match="not a valid ROS name token"):
            module.namespace_of(bad)
        with pytest.raises(ValueError, match="not a valid ROS name token"):
            normalize_namespace(bad)


@pytest.mark.skipif(not (ros_compat.HAVE_LAUNCH and ros_compat.HAVE_LAUNCH_ROS),
                    reason="ROS 2 launch/launch_ros are not pip-installable; the stand-in test covers the logic")
def test_launch_description_with_real_launch():
    spec = importlib.util.spec_from_file_location("perception_launch_real", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.generate_launch_description().entities) == len(EXPECTED_ARGS) + 1


# --------------------------------------------------------------------------------------- vg-ros up


def test_up_command_lines_and_arguments(tmp_path):
    from vg_ros.cli import UserError
    from vg_ros.up import main
    spec = node_spec("registration", config=tmp_path / "p.yaml", rig="default", device="cpu", use_sim_time=True,
                     threads=1)
    argv = spec.argv
    assert spec.name == "registration_node" and "vg_ros.nodes.registration_node" in argv[3]
    ros_args = argv[argv.index("--ros-args"):]
    assert ros_args == ["--ros-args", "-r", "__node:=registration_node", "--params-file", str(tmp_path / "p.yaml"),
                        "-p", "rig:=default", "-p", "device:=cpu", "-p", "use_sim_time:=true"]
    assert spec.env["VG_ROS_CONFIG"] == str(tmp_path / "p.yaml") and spec.env["OMP_NUM_THREADS"] == "1"
    spaced = node_spec("grounding", config=tmp_path / "p.yaml", namespace="fleet/robot1").argv
    assert spaced[spaced.index("--ros-args"):][:5] == ["--ros-args", "-r", "__node:=grounding_node", "-r",
                                                       "__ns:=/fleet/robot1"]
    assert "__ns:=/" not in " ".join(node_spec("grounding", namespace="/").argv)
    assert parse_nodes(["occupancy,grounding_node"]) == ["occupancy", "grounding"]
    assert parse_nodes(None) == list(NODES)
    with pytest.raises(UserError, match="unknown node 'radar'"):
        main(["--nodes", "radar"])
    with pytest.raises(UserError, match="no such file"):
        main(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match="unknown rig"):
        main(["--rig", "no_such_rig"])
    with pytest.raises(UserError, match="--respawn-delay"):
        main(["--respawn", "--respawn-delay", "-1"])
    with pytest.raises(UserError, match="--namespace"):
        main(["--namespace", "robot-1"])


HEARTBEAT_NODE = textwrap.dedent("""
    import sys
    from std_msgs.msg import String
    from vg_ros.nodes.base import PerceptionNode
    from vg_ros.nodes.process import run_node

    class Heartbeat(PerceptionNode):
        default_node_name = sys.argv[1]
        def start(self):
            self.pub = self.create_publisher(String, "/hb/" + self.get_name(), 10)
            self.create_timer(0.05, lambda: self.pub.publish(String(data=self.get_name())))

    sys.exit(run_node(Heartbeat, args=[]))
""")


def test_supervisor_reports_a_killed_node_restarts_nothing_and_the_others_keep_publishing(tmp_path):
    from std_msgs.msg import String
    script = tmp_path / "heartbeat.py"
    script.write_text(HEARTBEAT_NODE)
    names = ["alpha", "beta", "gamma"]
    lines: list[str] = []
    sup = Supervisor([NodeSpec(n, [sys.executable, "-u", str(script), n]) for n in names], log=lines.append,
                     log_dir=tmp_path / "logs")
    beats = {n: 0 for n in names}
    with ros_session(75) as ros:   # 64 and 65 are test_playback's (DOMAIN + 2, + 3)
        listener = ros.node("listener")
        for n in names:
            listener.create_subscription(String, f"/hb/{n}", lambda m: beats.__setitem__(m.data, beats[m.data] + 1), 10)
        sup.env["ROS_DOMAIN_ID"] = "75"
        sup.start()
        try:
            assert ros.spin_until(lambda: all(beats.values()), timeout=30.0), (beats, lines)
            pids = {n: p.pid for n, p in sup.procs.items()}
            sup.procs["beta"].send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 10
            died: list = []
            while not died and time.monotonic() < deadline:
                died = sup.poll()
                ros.spin_for(0.1)
            assert died == [("beta", -signal.SIGKILL)]
            before = dict(beats)
            # 20 Hz each: a loaded machine may need more than the nominal 0.3 s for six more beats of both
            assert ros.spin_until(lambda: beats["alpha"] > before["alpha"] + 5 and beats["gamma"] > before["gamma"] + 5,
                                  timeout=20.0), (before, beats, lines)
            assert beats["beta"] == before["beta"]                       # nobody restarted it
            assert sup.alive() == ["alpha", "gamma"] and {n: p.pid for n, p in sup.procs.items()} == pids
            assert sup.poll() == []                                       # reported once
        finally:
            codes = sup.stop()
    report = [line for line in lines if "DIED" in line]
    assert len(report) == 1 and "beta DIED (killed by SIGKILL)" in report[0] and "not restarted" in report[0]
    assert "Still running: alpha, gamma" in report[0]
    assert codes == {"alpha": 0, "beta": -signal.SIGKILL, "gamma": 0}   # the others stop cleanly on SIGINT
    assert "stopping:" in (tmp_path / "logs" / "alpha.log").read_text()


def test_nodes_get_the_fast_dds_profile_unless_the_user_chose_one(monkeypatch, tmp_path):
    from vg_ros import ros_compat
    module = stub_launch_modules(monkeypatch)
    for var in ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE"):
        monkeypatch.delenv(var, raising=False)
    _, actions = launch_actions(module)
    profile_vars = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")
    env = [a for a in actions if type(a).__name__ == "Node"][0].kwargs["additional_env"]
    assert {k: env[k] for k in profile_vars} == {var: "/opt/share/vg_ros/config/fastdds_profiles.xml"
                                                 for var in profile_vars}
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/etc/mine.xml")
    _, actions = launch_actions(module)
    assert not set(profile_vars) & set([a for a in actions if type(a).__name__ == "Node"][0].kwargs["additional_env"])

    # the same rule for every node (run_node) and the demo's player (vg_ros.ros_compat.use_dds_profiles)
    environ: dict[str, str] = {}
    assert ros_compat.use_dds_profiles(environ) == str(ros_compat.DDS_PROFILES)
    assert environ["FASTRTPS_DEFAULT_PROFILES_FILE"] == environ["FASTDDS_DEFAULT_PROFILES_FILE"]
    assert "<heartbeatPeriod>" in ros_compat.DDS_PROFILES.read_text()
    mine = {"FASTRTPS_DEFAULT_PROFILES_FILE": "/etc/mine.xml"}
    assert ros_compat.use_dds_profiles(mine) == "/etc/mine.xml" and len(mine) == 1


def test_launch_threads_argument_caps_each_nodes_pools_as_vg_ros_up_does(monkeypatch):
    """threads:=N gives every node OMP_NUM_THREADS = MKL_NUM_THREADS = N (torch's pool); 0 (the default) is CPU cores / nodes, at least 1, the rule of `vg-ros up --threads`;
    anything else is refused with the argument's name."""
    module = stub_launch_modules(monkeypatch)
    assert module.thread_env("0", 3, cpu_count=8) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert module.thread_env("0", 3, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    assert module.thread_env(" 5 ", 3)["MKL_NUM_THREADS"] == "5"
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ValueError, match="threads"):
            module.thread_env(bad, 3)
    for n_nodes in (1, 2, 3):   # the rule and the variables of `vg-ros up --threads`
        for cpus in (1, 2, 8, 16):
            for requested in (0, 5):
                threads = threads_per_node(requested, n_nodes, cpu_count=cpus)
                env = module.thread_env(str(requested), n_nodes, cpu_count=cpus)
                assert env == {k: v for k, v in node_spec("grounding", threads=threads).env.items() if k in env}
                assert set(env) == set(node_spec("grounding", threads=threads).env)
    _, actions = launch_actions(module, threads="3", nodes="registration,grounding")
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    assert len(nodes) == 2 and all(n.kwargs["additional_env"]["OMP_NUM_THREADS"] == "3" for n in nodes)
    monkeypatch.setattr(module.os, "cpu_count", lambda: 4)
    _, actions = launch_actions(module, nodes="registration,grounding")
    assert {n.kwargs["additional_env"]["OMP_NUM_THREADS"] for n in actions if type(n).__name__ == "Node"} == {"2"}
    with pytest.raises(ValueError, match="threads"):
        launch_actions(module, threads="-2")


def test_supervisor_respawns_a_crashed_node_but_not_a_failed_setup_nor_past_the_limit(tmp_path):
    from std_msgs.msg import String
    script = tmp_path / "heartbeat.py"
    script.write_text(HEARTBEAT_NODE)
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('bad parameter', flush=True)\nsys.exit(2)\n")
    lines: list[str] = []
    sup = Supervisor([NodeSpec("alpha", [sys.executable, "-u", str(script), "alpha"]),
                      NodeSpec("broken", [sys.executable, "-u", str(broken)])],
                     log=lines.append, respawn=True, respawn_delay_s=0.5, max_respawns=1)
    beats: list[float] = []
    with ros_session(76) as ros:
        ros.node("listener").create_subscription(String, "/hb/alpha", lambda m: beats.append(time.monotonic()), 10)
        sup.env["ROS_DOMAIN_ID"] = "76"
        sup.start()

        def wait_for_death(name):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                died = sup.poll()
                if died:
                    return died
                ros.spin_for(0.1)
            raise AssertionError(f"{name} did not die: {lines}")

        try:
            assert wait_for_death("broken") == [("broken", 2)]              # setup failure: left dead
            assert ros.spin_until(lambda: beats, timeout=30.0), lines
            first_pid = sup.procs["alpha"].pid
            sup.procs["alpha"].send_signal(signal.SIGKILL)
            assert wait_for_death("alpha") == [("alpha", -signal.SIGKILL)]
            assert sup.pending() == ["alpha"] and sup.alive() == []
            killed_at = time.monotonic()
            assert ros.spin_until(lambda: (sup.poll() or True) and beats[-1] > killed_at + 0.5, timeout=30.0), lines
            assert sup.procs["alpha"].pid != first_pid and sup.respawns == {"alpha": 1, "broken": 0}
            sup.procs["alpha"].send_signal(signal.SIGKILL)                 # the limit (1) is reached
            assert wait_for_death("alpha") == [("alpha", -signal.SIGKILL)]
            assert sup.pending() == [] and sup.alive() == []
        finally:
            sup.stop()
    deaths = [line for line in lines if "DIED" in line]
    assert "broken DIED (exit code 2)" in deaths[0] and "its setup failed" in deaths[0] and "bad parameter" in deaths[0]
    assert "restarting in 0.5 s (respawn 1 of 1)" in deaths[1]
    assert "not restarted: respawned 1 times already" in deaths[2]
    assert any("started alpha" in line and "respawn 1 of 1" in line for line in lines)


def test_supervisor_reports_a_node_killed_by_a_real_time_signal_and_keeps_the_others(tmp_path):
    """A node killed by a signal `signal.Signals` has no member for (`kill -35 PID`, SIGRTMIN+1) made the
    death report raise ValueError: `vg-ros up` died with a traceback and stopped every other node."""
    if not hasattr(signal, "SIGRTMIN"):
        pytest.skip("no real-time signals here")
    rt = signal.SIGRTMIN + 1
    lines: list[str] = []
    sup = Supervisor([NodeSpec("victim", [sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(rt)})"]),
                      NodeSpec("other", [sys.executable, "-c", "import time; time.sleep(60)"])], log=lines.append)
    sup.start()
    try:
        deadline, died = time.monotonic() + 10, []
        while not died and time.monotonic() < deadline:
            died = sup.poll()
            time.sleep(0.05)
        assert died == [("victim", -int(rt))], lines
        assert sup.alive() == ["other"]
        assert any("victim DIED (killed by SIGRTMIN+1)" in line and "Still running: other" in line for line in lines)
    finally:
        sup.stop(grace_s=2.0)


def test_supervisor_keeps_draining_a_nodes_output_after_its_own_output_broke(tmp_path):
    """`vg-ros up | head`: once the reader had gone, the relay thread died of the BrokenPipeError and the node
    blocked for ever in a log call as soon as its pipe's 64 KB had filled."""
    def broken(line: str) -> None:
        if "started" not in line:
            raise BrokenPipeError(32, "Broken pipe")
    chatty = "for i in range(20000): print('diagnostics ' + 'x' * 90)"
    sup = Supervisor([NodeSpec("chatty", [sys.executable, "-c", chatty])], log=broken, log_dir=tmp_path)
    sup.start()
    try:
        deadline = time.monotonic() + 15
        while sup.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.alive() == [], "the node blocked on its full stdout pipe"
        assert sup.procs["chatty"].returncode == 0
    finally:
        sup.stop(grace_s=1.0)
    assert len((tmp_path / "chatty.log").read_text().splitlines()) == 20000
