"""What the three perception nodes share: `PerceptionNode`, a lifecycle node with parameters from one YAML,
counted drops, stamp checks, approximate-time sync and periodic diagnostics.

A node subclasses `PerceptionNode`, names its pipeline config dataclass and its own parameters, and
overrides the hooks of the ROS 2 managed-node lifecycle it runs through (`check_parameters` and `load` on
configure, `start` on activate, `stop` on deactivate, `unload` on cleanup):

    class RegistrationNode(PerceptionNode):
        default_node_name = "registration_node"
        config_cls = OdometryConfig
        node_params = {"points_topic": ("lidar/points", "input PointCloud2")}

        def load(self):                  # load the model; raise to fail with a clear ERROR log
            self.odometry = LidarOdometry(self.cfg)

        def start(self):                 # what it creates here is destroyed again on deactivate
            self.subscribe(PointCloud2, self.params["points_topic"], self.on_points, self.sensor_qos())

    main = node_main(RegistrationNode)   # vg_ros.nodes.process: init, spin, a clean stop

Beside it: the input checks every node applies (drops, stamps, sync, buffers), ROS-free, in
`vg_ros.nodes.inputs`; QoS profiles in `vg_ros.nodes.qos`; topic names (transports, namespaces, CameraInfo
siblings) in `vg_ros.nodes.topics`; extrinsics from TF or the rig in `vg_ros.nodes.extrinsics`; the node
process (`run_node`, `node_main`) in `vg_ros.nodes.process`.
Times are integer nanoseconds throughout.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from vg_ros import ros_compat
from vg_ros.config import PipelineConfig, declare_ros_parameters, default_config_path, load_section, split_params
from vg_ros.convert import stamp_of
from vg_ros.nodes.extrinsics import TfOrRig
from vg_ros.nodes.inputs import ApproxTimeSync, DropCounter, StampGuard
from vg_ros.nodes.qos import RELIABILITIES, command_qos, describe_qos, latched_qos, output_qos, sensor_qos

if ros_compat.HAVE_RCLPY:
    from rclpy.lifecycle import LifecycleNode as _RosNode
    from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.qos import QoSProfile
else:  # replay and tests of the ROS-free helpers still import this module
    _RosNode = object  # type: ignore[assignment,misc]

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'auto' -> 'cpu' or 'cuda'. Asking for CUDA where there is none is a ValueError."""
    if device not in DEVICES:
        raise ValueError(f"device = {device!r}: must be one of {list(DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise ValueError("device = 'cuda' but torch sees no CUDA device here; use device:=cpu or auto")
    return "cpu"


# ------------------------------------------------------------------------------------------- node

# Parameters every perception node has, beside its pipeline's config and its own topics.
COMMON_PARAMS: dict[str, tuple[Any, str]] = {
    "device": ("auto", "compute device: cpu | cuda | auto (cuda when available)"),
    "rig": ("default", "rig name (config/rig_<name>.yaml) or path: extrinsics when TF has none"),
    "weights": ("default", "checkpoint: 'default' (shipped in vg_ros/weights) or a .safetensors path"),
    "base_frame": ("base_link", "the vehicle frame outputs are expressed in"),
    "qos_depth": (5, "queue depth of sensor subscriptions"),
    "sensor_reliability": ("best_effort", "sensor subscriptions: best_effort (accepts any publisher) | reliable"),
    "max_stamp_age": (0.0, "drop inputs older than this many seconds by the node clock (sim time aware); 0 = off"),
    "time_jump_reset": (1.0, "stamps jumping back more than this many seconds, twice in order on a topic (a looped "
                             "or restarted bag), reset the node's state instead of being dropped for ever; a lone "
                             "stamp this far ahead is dropped; 0 = off"),
    "diagnostics_period": (5.0, "seconds between drop/throughput reports on ~/diagnostics; 0 = off"),
    "autostart": (True, "configure and activate at start; false: stay unconfigured until a lifecycle manager "
                        "(or `ros2 lifecycle set`) drives the node through configure / activate"),
    "input_silence_warn": (10.0, "a sensor input with a matched publisher but no message for this many seconds "
                                 "(wall time) makes the diagnostics a WARN naming it; 0 = off"),
}


class TransitionFailed(RuntimeError):
    """A lifecycle transition failed; the message is the ERROR line the node already logged."""


class PerceptionNode(_RosNode):  # type: ignore[misc,valid-type]
    """Base of the perception nodes: parameters, QoS, drops, stamp checks, sync, extrinsics.

    Subclasses set `default_node_name`, `config_cls` (a PipelineConfig dataclass or None) and
    `node_params` ({name: (default, description)}), then override the hooks of the managed-node lifecycle
    (an rclpy LifecycleNode: `~/change_state`, `~/get_state`, ... as `ros2 lifecycle` and Nav2's
    lifecycle_manager use them): `check_parameters` (read parameters, no heavy work; also run on every
    `ros2 param set`) and `load` (the model) on configure, `start` (publishers, subscriptions, timers)
    on activate, `stop` on deactivate (what `start` created is destroyed by the base), `unload` on cleanup.
    With `autostart` (default) `run_node` configures and activates the node itself.

    Parameter values, lowest to highest priority: the dataclass / `node_params` defaults, this node's
    section of `config/perception.yaml` (`config_path`, else $VG_ROS_CONFIG), then ROS overrides (`--params-file`, `-p`,
    launch). After construction: `self.cfg` (the validated pipeline config), `self.params` (node and
    common parameters by name), `self.drops`, `self.stamps` (a StampGuard).
    """

    default_node_name: str = "perception_node"
    config_cls: type[PipelineConfig] | None = None
    node_params: dict[str, tuple[Any, str]] = {}
    # What `ros2 param set` may change while the node runs (pipeline fields and node parameters the node
    # reads per message); every other parameter is read at start, and a change is refused with a reason
    # instead of being accepted and silently ignored.
    live_params: frozenset[str] = frozenset()
    COMMON_LIVE = frozenset({"max_stamp_age", "time_jump_reset", "input_silence_warn"})
    # read while the node is built: not even an unconfigured node takes a new value
    CONSTRUCTION_PARAMS = frozenset({"diagnostics_period", "autostart"})

    def __init__(self, node_name: str | None = None, *, config_path: str | Path | None = None,
                 **node_kwargs: Any) -> None:
        ros_compat.require_rclpy(type(self).__name__)
        name = node_name or self.default_node_name
        super().__init__(name, **node_kwargs)
        self.drops = DropCounter(self.get_logger())
        # `vg-ros up --config X` hands its file to every node through VG_ROS_CONFIG.
        config_path = config_path or os.environ.get("VG_ROS_CONFIG") or None
        self.config_path = Path(config_path) if config_path else default_config_path()
        file_values: dict = {}
        if self.config_path.exists():
            file_values = load_section(self.config_path, name)
        elif config_path is not None:
            raise ValueError(f"config file {self.config_path} does not exist")
        self.cfg: PipelineConfig | None = None
        if self.config_cls is not None:
            cfg_values, rest = split_params(file_values, self.config_cls)
            self.cfg = declare_ros_parameters(self, self.config_cls.from_dict(cfg_values))
        else:
            rest = dict(file_values)
        specs = {**COMMON_PARAMS, **self.node_params}
        unknown = sorted(set(rest) - set(specs) - {"use_sim_time"})
        if unknown:
            self.get_logger().warning(f"{self.config_path}: ignoring unknown parameter(s) {unknown} for {name}")
        self.params: dict[str, Any] = {}
        from rcl_interfaces.msg import ParameterDescriptor
        cfg_fields = set(config_fields(self.config_cls)) if self.config_cls is not None else set()
        for key, (default, description) in specs.items():
            if key in cfg_fields:  # e.g. `device`, `weights` in the pipeline's own config: declared once, there
                self.params[key] = getattr(self.cfg, key)
                continue
            value = _as_declared(default, rest.get(key, default))
            if isinstance(value, list) and not value:
                # an empty list has no ROS type of its own (rclpy would make it a byte array, refusing the
                # strings a launch file or `-p` gives): a string array, unset until given
                from rcl_interfaces.msg import ParameterType
                from rclpy.parameter import Parameter
                declared = self.declare_parameter(key, Parameter.Type.STRING_ARRAY, ParameterDescriptor(
                    description=description, type=ParameterType.PARAMETER_STRING_ARRAY))
                self.params[key] = list(declared.value or [])
                continue
            self.params[key] = self.declare_parameter(key, value, ParameterDescriptor(description=description)).value
        self._validate_common()
        self.stamps = StampGuard(self.drops, float(self.params["max_stamp_age"]),
                                 jump_back_s=float(self.params["time_jump_reset"]), on_jump=self._on_time_jump)
        self._syncs: list[ApproxTimeSync] = []
        # messages that reached each subscription, before any check: an input that stops arriving (a
        # publisher gone, a DDS transport that stopped delivering) shows here, not as a drop
        self.received: collections.Counter[str] = collections.Counter()
        # messages a lone publisher sent that never reached the callback, from the gaps in its publication
        # sequence numbers: the subscription's queue overflowed while the node was busy (keep-last depth), or
        # the transport lost them; a count, not a drop of ours, and no fault when the node is slower than a
        # sensor (it then works on the newest message)
        self.missed: collections.Counter[str] = collections.Counter()
        self._received_lock = threading.Lock()
        # watched inputs: topic -> (subscriptions, wall time of the last message or of the subscribing)
        self._watched: dict[str, tuple[list, float]] = {}
        self.device = "cpu"
        self._extrinsics: TfOrRig | None = None
        self._diag_pub = self._status_pub = None
        self._diag_before: tuple[float, dict] = (time.monotonic(), self.drops.snapshot())
        period = float(self.params["diagnostics_period"])
        if period > 0:
            from diagnostic_msgs.msg import DiagnosticArray
            from std_msgs.msg import String
            self._diag_pub = self.create_publisher(String, "~/diagnostics", output_qos(1))
            # the standard aggregate topic: rqt_robot_monitor and diagnostic_aggregator read it
            self._status_pub = self.create_publisher(DiagnosticArray, "/diagnostics", output_qos(10))
            # wall time, not the node clock: under use_sim_time a stopped /clock must not silence the report
            from rclpy.clock import Clock, ClockType
            self._diag_timer = self.create_timer(period, self.publish_diagnostics,
                                                 clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.activated = False
        self.loaded = False
        self.transition_error: str | None = None   # the last failed transition's one-line reason
        self._transition_exc: Exception | None = None
        self._started: dict[str, list] = {}          # what `start` created: destroyed on deactivate
        self.add_on_set_parameters_callback(self._on_set_parameters)
        service = getattr(self, "_service_change_state", None)
        if service is not None:
            service.callback = self._refuse_impossible(service.callback)

    def _refuse_impossible(self, handle: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """The ChangeState service, answering success=False with a WARN line for a transition the current
        state has no edge for. rclpy answers that for a label, but a transition given by id (Nav2's
        lifecycle_manager sends ids) raises inside the service callback, which ends the process."""
        def change_state(request: Any, response: Any) -> Any:
            state = self.lifecycle_state()
            try:
                return handle(request, response)
            except _rclpy.RCLError as exc:
                transition = request.transition.label or f"id {request.transition.id}"
                self.get_logger().warning(f"lifecycle: transition {transition} refused in state {state}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else 'no such edge'}")
                response.success = False
                return response
        return change_state

    def _validate_common(self) -> None:
        p = self.params
        if p["device"] not in DEVICES:
            raise ValueError(f"{self.get_name()}.device = {p['device']!r}: must be one of {list(DEVICES)}")
        if p["sensor_reliability"] not in RELIABILITIES:
            raise ValueError(f"{self.get_name()}.sensor_reliability = {p['sensor_reliability']!r}: "
                             f"must be one of {list(RELIABILITIES)}")
        if not isinstance(p["qos_depth"], int) or not 1 <= p["qos_depth"] <= 1000:
            raise ValueError(f"{self.get_name()}.qos_depth = {p['qos_depth']!r}: must be an int in [1, 1000]")
        for key in ("max_stamp_age", "time_jump_reset", "diagnostics_period", "input_silence_warn"):
            if not isinstance(p[key], (int, float)) or not 0 <= p[key] <= 1e9:   # inf, NaN: refused
                raise ValueError(f"{self.get_name()}.{key} = {p[key]!r}: must be a number in [0, 1e9] (0 = off)")

    # -- lifecycle: a ROS 2 managed node (unconfigured -configure-> inactive -activate-> active, and back
    # with deactivate / cleanup; shutdown from any of them to finalized)

    def lifecycle_state(self) -> str:
        """'unconfigured', 'inactive', 'active' or 'finalized' (or a transition's label while one runs)."""
        return str(self._state_machine.current_state[1])

    def configure(self) -> None:
        """The configure transition (as `ros2 lifecycle set <node> configure`); TransitionFailed if it fails."""
        self._trigger(self.trigger_configure)

    def activate(self) -> None:
        self._trigger(self.trigger_activate)

    def deactivate(self) -> None:
        self._trigger(self.trigger_deactivate)

    def cleanup(self) -> None:
        self._trigger(self.trigger_cleanup)

    def _trigger(self, transition: Callable[[], Any]) -> None:
        """Run a transition here; raise what failed it (already logged as `transition_error`), or
        TransitionFailed when the current state has no such transition."""
        state = self.lifecycle_state()
        try:
            result = transition()
        except _rclpy.RCLError as exc:
            raise TransitionFailed(f"{self.get_name()}: {transition.__name__.removeprefix('trigger_')} "
                                   f"not possible in state {state}") from exc
        if result != TransitionCallbackReturn.SUCCESS:
            exc, self._transition_exc = self._transition_exc, None
            raise exc if exc is not None else TransitionFailed(
                self.transition_error or f"{self.get_name()}: transition refused in state {self.lifecycle_state()}")

    def finish(self) -> None:
        """End of the process: shut down from whatever state the node is in (deactivating and unloading
        on the way) and log the drop and receive summary."""
        state = self.lifecycle_state()
        if state != "finalized":
            try:
                self.trigger_shutdown()
            except _rclpy.RCLError:   # still in a transition (one that never returned): free nothing under it
                self.get_logger().warning(f"shutdown not possible while {state}: leaving the node as it is")
        with self._received_lock:
            received = " ".join(f"{t}={n}" for t, n in sorted(self.received.items())) or "nothing"
            missed = " ".join(f"{t}={n}" for t, n in sorted(self.missed.items()))
        self.get_logger().info(f"stopping: {self.drops.summary()}; received: {received}"
                               + (f"; missed (never reached the callback): {missed}" if missed else ""))

    def _transition(self, name: str, work: Callable[[], None]) -> "TransitionCallbackReturn":
        """Run one transition's work: SUCCESS, or FAILURE (the state machine goes back to where it was)
        with one ERROR line naming the reason, kept in `transition_error`."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - a failed transition is reported, the node stays up
            self.transition_error = f"{self.get_name()}: {name} failed: {type(exc).__name__}: {exc}"
            self._transition_exc = exc
            self.get_logger().error(self.transition_error)
            return TransitionCallbackReturn.FAILURE
        self.transition_error = self._transition_exc = None
        return TransitionCallbackReturn.SUCCESS

    # rclpy's transition callbacks (LifecycleNode): each runs the hooks below through `_transition`

    def on_configure(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            if self._extrinsics is not None and \
                    self._extrinsics.source != (str(self.params["rig"]), str(self.params["base_frame"])):
                self._extrinsics.close()   # `rig` / `base_frame` changed while unconfigured: built again on use
                self._extrinsics = None
            self.device = resolve_device(self.params["device"])
            self.check_parameters()
            self.load()
            self.loaded = True
        return self._transition("configure", work)

    def on_activate(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            before = self._entities()
            had_extrinsics = self._extrinsics is not None
            try:
                self.start()
            except Exception:
                self._destroy_new(before, had_extrinsics)
                raise
            self._started = {"before": before, "had_extrinsics": had_extrinsics}
            self.activated = True
            self.get_logger().info(f"active on {self.device}; optional ROS pieces missing here: "
                                   f"{', '.join(ros_compat.missing()) or 'none'}")
        return self._transition("activate", work)

    def on_deactivate(self, state: Any) -> "TransitionCallbackReturn":
        return self._transition("deactivate", self._deactivate)

    def on_cleanup(self, state: Any) -> "TransitionCallbackReturn":
        return self._transition("cleanup", self._unload)

    def on_shutdown(self, state: Any) -> "TransitionCallbackReturn":
        def work() -> None:
            if self.activated:
                self._deactivate()
            if self.loaded:
                self._unload()
        return self._transition("shutdown", work)

    def on_error(self, state: Any) -> "TransitionCallbackReturn":
        """Only reached if a transition raised past `_transition` (it does not): free everything, unconfigured."""
        return self.on_shutdown(state)

    def _deactivate(self) -> None:
        self._destroy_new(self._started.get("before", self._entities()), self._started.get("had_extrinsics", True))
        self.stop()
        self._started = {}
        self.activated = False   # after `stop`: a failed deactivate leaves the node active, as it says
        self.get_logger().info(f"deactivated: {self.drops.summary()}")

    def _unload(self) -> None:
        self.unload()
        self.loaded = False

    def _entities(self) -> dict[str, list]:
        return {"subscriptions": list(self.subscriptions), "publishers": list(self.publishers),
                "timers": list(self.timers), "syncs": list(self._syncs), "watched": list(self._watched)}

    def _destroy_new(self, before: dict[str, list], had_extrinsics: bool) -> None:
        """Destroy the subscriptions, publishers and timers created since `before` (what `start` made),
        so a node activated again creates them once, and an inactive node neither takes nor sends anything."""
        def new(kind: str) -> list:
            old = {id(x) for x in before[kind]}
            # not rclpy's own /clock subscription, made when use_sim_time is set while active: destroyed,
            # its TimeSource would keep the dead one and the node clock would stop
            return [x for x in getattr(self, kind) if id(x) not in old and
                    not (kind == "subscriptions" and getattr(x, "topic_name", "") == "/clock")]
        for sub in new("subscriptions"):
            self.destroy_subscription(sub)
        for pub in new("publishers"):
            self.destroy_publisher(pub)
        for timer in new("timers"):
            self.destroy_timer(timer)
        self._syncs[:] = [s for s in self._syncs if any(s is o for o in before["syncs"])]
        with self._received_lock:
            for topic in set(self._watched) - set(before["watched"]):
                del self._watched[topic]
        if not had_extrinsics:   # its TF subscriptions went with the rest: built again on first use
            self._extrinsics = None

    # hooks for the nodes

    def check_parameters(self) -> None:
        """Read parameters into attributes; raise ValueError for a bad one. No model loading here (it also
        validates every `ros2 param set`)."""

    def load(self) -> None:
        """Load the model (configure). Raise to fail the transition with a clear ERROR line."""

    def start(self) -> None:
        """Create publishers, subscriptions and timers (activate). Raise to fail with a clear ERROR line."""

    def stop(self) -> None:
        """Deactivate: the subscriptions, publishers and timers `start` created are already destroyed."""

    def unload(self) -> None:
        """Free the model (cleanup, shutdown)."""

    def on_parameters_changed(self, names: set[str]) -> None:
        """`self.cfg` / `self.params` now hold new values for `names` (all in `live_params`): hand them to
        the pipeline where it keeps its own copy."""

    def _on_set_parameters(self, parameters: list) -> Any:
        """Validate and apply `ros2 param set` changes through the checks they met at start (the pipeline
        config's own, `_validate_common`, the node's `check_parameters`). An unconfigured node takes any
        parameter but those read while it is built (the next configure reads them); a configured one only
        its `live_params`, the rest refused with a reason (the value stays as it was). Declarations and
        use_sim_time pass through."""
        from rcl_interfaces.msg import SetParametersResult

        changes = {p.name: p.value for p in parameters if p.name != "use_sim_time" and self.has_parameter(p.name)}
        if not changes:
            return SetParametersResult(successful=True)
        live = self.live_params | self.COMMON_LIVE
        unconfigured = self.lifecycle_state() == "unconfigured"
        fixed = sorted(set(changes) & self.CONSTRUCTION_PARAMS) if unconfigured else sorted(set(changes) - live)
        if fixed:
            when = "the node is built; restart it" if unconfigured else \
                "the node is configured; clean it up (`ros2 lifecycle set <node> cleanup`) or restart it"
            return SetParametersResult(successful=False, reason=(
                f"{', '.join(fixed)}: read when {when} to change {'it' if len(fixed) == 1 else 'them'} "
                f"(changeable while configured: {', '.join(sorted(live))})"))
        fields = set(config_fields(self.config_cls)) if self.config_cls is not None else set()
        specs = {**COMMON_PARAMS, **self.node_params}
        node_values = {k: _as_declared(specs[k][0], v) for k, v in changes.items() if k not in fields}
        # the node's values go through the checks they met at start (`_validate_common`, `check_parameters`)
        started_with = self.params
        self.params = {**started_with, **node_values}
        try:
            cfg = self.cfg.replace(**{k: v for k, v in changes.items() if k in fields}) if fields & set(changes) \
                else self.cfg
            self._validate_common()
            self.check_parameters()
        except (TypeError, ValueError) as exc:
            self.params = started_with
            return SetParametersResult(successful=False, reason=str(exc))
        self.cfg = cfg
        self.stamps.max_age_ns = int(float(self.params["max_stamp_age"]) * 1e9)
        self.stamps.jump_back_ns = int(float(self.params["time_jump_reset"]) * 1e9)
        if self.loaded:   # an unconfigured node reads them when it is configured
            self.on_parameters_changed(set(changes))
        self.get_logger().info("parameters changed: " + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items())))
        return SetParametersResult(successful=True)

    def on_time_jump(self) -> None:
        """The inputs' time went back (a looped or restarted bag): forget state built on the old time
        (the stamp checks and the synchronisers are already reset)."""

    def _on_time_jump(self, topic: str, seconds_back: float) -> None:
        for sync in self._syncs:
            sync.reset()
        self.on_time_jump()
        self.get_logger().warning(f"{topic}: stamps went back {seconds_back:.3f} s (a looped or restarted source): "
                                  f"state reset ({self.stamps.jumps} reset(s) so far)")

    # -- QoS and subscriptions

    def sensor_qos(self) -> "QoSProfile":
        return sensor_qos(int(self.params["qos_depth"]), str(self.params["sensor_reliability"]))

    def command_qos(self) -> "QoSProfile":
        return command_qos()

    def latched_qos(self) -> "QoSProfile":
        return latched_qos()

    def output_qos(self) -> "QoSProfile":
        return output_qos()

    def subscribe(self, msg_type: type, topic: str, callback: Callable[..., None], qos: "QoSProfile",
                  *, guard_stamps: bool = True, callback_group: Any = None,
                  seen_samples: collections.deque | None = None, count_missed: bool = True,
                  incompatible_note: str | None = None, watch: bool = True):
        """A subscription that logs what it expects, reports QoS mismatches, and (by default) passes
        only messages whose header stamp the StampGuard accepts. Exceptions in `callback` are caught,
        logged once per reason and counted as `callback_error`: the node keeps running. `callback_group`
        (None: the node's default, mutually exclusive with every other default callback) lets a cheap
        control input run beside a long sensor callback on the multi-threaded executor. `seen_samples`:
        shared by twin subscriptions of one topic (a transient-local and a volatile one both match a
        transient-local publisher), it holds the samples (source timestamp, publication sequence number)
        already taken, so each sample is counted and handled once; `count_missed` False on all but the twin
        that matches every publisher, so a lost sample is counted once and a sample the twin took first is
        not counted as lost.
        `incompatible_note`: an incompatible publisher is expected (another subscription serves it), so
        it is logged at INFO with this note instead of as an ERROR. Every message that arrives is counted
        (`received`); `watch` (sensor streams; not a command sent once) also reports the topic in the
        diagnostics when a publisher is matched but nothing came for `input_silence_warn` seconds."""
        from rclpy.event_handler import SubscriptionEventCallbacks

        type_name = f"{msg_type.__module__.split('.')[0]}/{msg_type.__name__}"
        # counted, watched and logged under the name it resolves to (namespace and remapping applied)
        topic = self.resolve_topic_name(topic)
        self.get_logger().info(f"subscribing {topic} [{type_name}] QoS {describe_qos(qos)}")

        def on_incompatible(event: Any) -> None:
            if incompatible_note is not None:
                self.get_logger().info(f"{topic}: a publisher's QoS does not match {describe_qos(qos)}; "
                                       f"{incompatible_note}")
                return
            self.get_logger().error(
                f"{topic}: a publisher's QoS is incompatible with this subscription ({describe_qos(qos)}); "
                f"policy {getattr(event, 'last_policy_kind', '?')}: nothing will be received from it")

        sequence = {"last": None}   # the lone publisher's last publication sequence number seen here
        created: list = []

        def guarded(msg: Any, info: Any) -> None:
            with self._received_lock:
                if count_missed:   # every sample this subscription sees, the twin's first included
                    self._count_missed(topic, info, sequence, created)
                if seen_samples is not None and isinstance(info, dict) and info.get("source_timestamp"):
                    sample = (info["source_timestamp"], info.get("publication_sequence_number"))
                    if sample in seen_samples:   # the twin subscription took it
                        return
                    seen_samples.append(sample)
                self.received[topic] += 1
                if topic in self._watched:
                    self._watched[topic] = (self._watched[topic][0], time.monotonic())
            if guard_stamps and hasattr(msg, "header"):
                if not self.stamps.accept(topic, stamp_of(msg), self.now_ns()):
                    return
            self.call_safely(callback, msg, where=topic)

        # rclpy passes the message info (sequence numbers) to a callback that cannot take the message alone
        sub = self.create_subscription(msg_type, topic, lambda msg, info: guarded(msg, info), qos,
                                       callback_group=callback_group,
                                       event_callbacks=SubscriptionEventCallbacks(incompatible_qos=on_incompatible))
        created.append(sub)
        if watch:
            with self._received_lock:
                subs, since = self._watched.get(topic, ([], time.monotonic()))
                self._watched[topic] = (subs + [sub], since)
        return sub

    def _count_missed(self, topic: str, info: Any, sequence: dict, created: list) -> None:
        """Add the gap between this message's publication sequence number and the last one seen on the
        subscription to `missed[topic]`, while exactly one publisher is matched (rclpy's message info carries
        no publisher id, so two publishers' numbers would interleave). The first message after a change of
        publishers sets the baseline; a number that goes back (a publisher started again) too."""
        number = info.get("publication_sequence_number") if isinstance(info, dict) else None
        try:
            publishers = created[0].get_publisher_count() if created else 0
        except Exception:  # noqa: BLE001 - destroyed by a deactivate while this message was in flight
            publishers = 0
        if number is None or publishers != 1:
            sequence["last"] = None
            return
        last = sequence["last"]
        if last is not None and number > last + 1:
            self.missed[topic] += number - last - 1
        sequence["last"] = number

    def silent_inputs(self, now: float | None = None) -> dict[str, dict]:
        """{topic: {"seconds", "publishers"}} of the watched inputs with at least one matched publisher and
        no message for `input_silence_warn` s of wall time (since the subscription when none came yet): a
        sensor that stopped, or a transport that stopped delivering (docs/bringup.md)."""
        limit = float(self.params["input_silence_warn"])
        if limit <= 0:
            return {}
        now = time.monotonic() if now is None else now
        with self._received_lock:
            watched = dict(self._watched)
        silent = {}
        for topic, (subs, last) in watched.items():
            publishers = max(sub.get_publisher_count() for sub in subs)
            if publishers and now - last >= limit:
                silent[topic] = {"seconds": round(now - last, 1), "publishers": publishers}
        return silent

    def synchronized(self, specs: Sequence[tuple[type, str]], callback: Callable[..., None], *,
                     slop_s: float = 0.05, queue_size: int = 10, qos: "QoSProfile | None" = None,
                     partial_timeout_s: float | None = None, min_topics: int | None = None):
        """Subscribe `specs` [(msg_type, topic)] and call `callback(*msgs)` with approximately
        synchronised sets. message_filters is used when it imports and no partial sets are asked for;
        otherwise ApproxTimeSync (same policy, plus partial sets with None after `partial_timeout_s`)."""
        qos = qos or self.sensor_qos()
        topics = [self.resolve_topic_name(topic) for _, topic in specs]   # as the drops and logs name them
        if ros_compat.HAVE_MESSAGE_FILTERS and partial_timeout_s is None:
            mf = ros_compat.message_filters
            subs = [mf.Subscriber(self, msg_type, topic, qos_profile=qos) for msg_type, topic in specs]
            sync = mf.ApproximateTimeSynchronizer(subs, queue_size, slop_s)
            sync.registerCallback(lambda *msgs: self.call_safely(callback, *msgs, where="synchronised set"))
            self.get_logger().info(f"synchronising {topics} with message_filters (slop {slop_s} s)")
            return sync
        sync = ApproxTimeSync(len(specs), lambda *msgs: self.call_safely(callback, *msgs, where="synchronised set"),
                              slop_s=slop_s, queue_size=queue_size, partial_timeout_s=partial_timeout_s,
                              min_topics=min_topics or len(specs), drops=self.drops, names=topics)
        self._syncs.append(sync)
        for index, (msg_type, topic) in enumerate(specs):
            self.subscribe(msg_type, topic, lambda msg, i=index: sync.add(i, msg), qos)
        if partial_timeout_s is not None:
            self.create_timer(max(partial_timeout_s / 2, 0.05), lambda: sync.flush(self.now_ns()))
        self.get_logger().info(f"synchronising {topics} (slop {slop_s} s, queue {queue_size}"
                               + (f", partial sets after {partial_timeout_s} s)" if partial_timeout_s else ")"))
        return sync

    def call_safely(self, callback: Callable[..., None], *args: Any, where: str = "") -> None:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the callback boundary: log, count, keep running
            reason = f"{type(exc).__name__}"
            stamp = ""
            first = next((a for a in args if a is not None and hasattr(a, "header")), None)
            if first is not None:
                stamp = f" stamp {stamp_of(first)}"
            self.drops.drop(f"callback_error:{reason}", f"in {where}{stamp}: {exc}")

    # -- time, extrinsics, diagnostics

    def now_ns(self) -> int:
        """The node clock in ns (sim time under use_sim_time; 0 before the first /clock)."""
        return int(self.get_clock().now().nanoseconds)

    @property
    def extrinsics(self) -> TfOrRig:
        """TfOrRig for this node's `rig` and `base_frame` parameters (created on first use)."""
        if self._extrinsics is None:
            self._extrinsics = TfOrRig(str(self.params["rig"]), str(self.params["base_frame"]), node=self)
        return self._extrinsics

    def diagnostics(self) -> dict:
        with self._received_lock:
            received, missed = dict(self.received), dict(self.missed)
        return {"node": self.get_name(), "state": self.lifecycle_state(), "stamp_ns": self.now_ns(),
                "time_jump_resets": self.stamps.jumps, "received": received, "missed": missed,
                "silent": self.silent_inputs(), **self.drops.snapshot()}

    def publish_diagnostics(self) -> None:
        """~/diagnostics (the JSON counts) and one DiagnosticStatus on /diagnostics for the last period."""
        if self._diag_pub is None:
            return
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        from std_msgs.msg import String
        info = self.diagnostics()
        self._diag_pub.publish(String(data=json.dumps(info, sort_keys=True)))
        now = time.monotonic()
        then, before = self._diag_before
        self._diag_before = (now, {"drops": info["drops"], "processed": info["processed"]})
        level, message, values = diagnostic_status(info, before, now - then)
        if info["state"] != "active":   # a managed node held inactive or unconfigured: waiting, not failing
            level, message = DIAG_OK, f"{info['state']} (lifecycle): not processing inputs"
        status = DiagnosticStatus(level=bytes([level]), name=f"vg_ros: {self.get_fully_qualified_name()}",
                                  message=message, hardware_id=self.device,
                                  values=[KeyValue(key=k, value=v) for k, v in
                                          values + [("time_jump_resets", str(info["time_jump_resets"])),
                                                    ("lifecycle_state", info["state"])]])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(array)
        if info["drops"] != before["drops"]:   # a period with drops; an idle node stays quiet
            self.get_logger().info(f"diagnostics: {message}; since start: {self.drops.summary()}")


# ROS diagnostic levels (diagnostic_msgs/DiagnosticStatus)
DIAG_OK, DIAG_WARN, DIAG_ERROR = 0, 1, 2
# drops that mean waiting for something, not failing: never an ERROR on their own
WAITING_REASONS = frozenset({"no_command"})


def diagnostic_status(now: dict, before: dict | None, period_s: float) -> tuple[int, str, list[tuple[str, str]]]:
    """(level, message, [(key, value)]) of one node over a period, from two `DropCounter.snapshot()`s
    `period_s` apart (`before` None: since the start). OK: inputs processed, none dropped. WARN: some
    dropped, a waiting reason (`WAITING_REASONS`), no input at all, or a silent input (`now["silent"]`:
    matched publisher, no message; named in the message). ERROR: a callback raised, or inputs came and every
    one was dropped. The values are the totals since the start and the period's rate."""
    before = before or {"drops": {}, "processed": {}}
    done = sum(now["processed"].values()) - sum(before["processed"].values())
    dropped = {k: v - before["drops"].get(k, 0) for k, v in now["drops"].items() if v > before["drops"].get(k, 0)}
    period = f"{period_s:.1f} s"
    rate = done / period_s if period_s > 0 else 0.0
    why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    if not done and not dropped:
        level, message = DIAG_WARN, f"no input in {period}"
    elif not dropped:
        level, message = DIAG_OK, f"{done} processed in {period} ({rate:.1f} Hz)"
    else:
        failing = any(k.startswith("callback_error") for k in dropped) or \
            (not done and not set(dropped) <= WAITING_REASONS)
        level = DIAG_ERROR if failing else DIAG_WARN
        message = f"{done} processed, {sum(dropped.values())} dropped in {period}: {why}"
    silent = now.get("silent") or {}
    if silent:
        level = max(level, DIAG_WARN)
        message += "; silent: " + ", ".join(f"{t} (nothing for {v['seconds']:.0f} s, {v['publishers']} publisher"
                                           f"{'s' if v['publishers'] != 1 else ''})" for t, v in sorted(silent.items()))
    values = [("rate_hz", f"{rate:.2f}"), ("period_s", f"{period_s:.2f}")]
    values += [(f"processed/{k}", str(v)) for k, v in sorted(now["processed"].items())]
    values += [(f"dropped/{k}", str(v)) for k, v in sorted(now["drops"].items())]
    values += [(f"received/{k}", str(v)) for k, v in sorted(now.get("received", {}).items())]
    values += [(f"missed/{k}", str(v)) for k, v in sorted(now.get("missed", {}).items())]
    return level, message, values


def _as_declared(default: Any, value: Any) -> Any:
    """`value` as the type of its parameter's `default`: an int where a float is declared (YAML's `1`, `ros2
    param set ... 1`) becomes a float, so the parameter keeps its declared type."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_fields(cfg_cls: type[PipelineConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_cls)]
