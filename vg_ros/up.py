"""`vg-ros up`: the three perception nodes with `config/perception.yaml`, where `ros2 launch` is absent.

One OS process per node, watched by a `Supervisor`. Why processes and not one process with a
multi-threaded executor: a node that dies (a segfault in a native library, the OOM killer, an
unhandled error) takes only itself down and the others keep publishing; the three pipelines run in
parallel instead of sharing one GIL and one torch thread pool; and it is what `ros2 launch` does, so
behaviour (parameters, names, logs) is the same on a robot and here. The cost is importing torch once
per node.

Each node gets `--ros-args --params-file CONFIG -r __node:=NAME` (and `-r __ns:=/NS` with `--namespace`) plus
`-p rig:=` / `device:=` / `use_sim_time:=` overrides; parameters are never spelled a second time here. The
node reads its section of CONFIG itself too (`VG_ROS_CONFIG`), keyed by its name, so the file applies in a
namespace as well, where rcl would match its plain `occupancy_node:` keys to /occupancy_node only.
When a node exits the supervisor logs which one, how (exit code or signal), after how long, and its last
log lines, and keeps the others running. By default it restarts nothing; with `--respawn` (the launch
file's `respawn:=true`) it starts a crashed node again after `--respawn-delay` seconds, at most
`--max-respawns` times, but never one that failed its setup (exit code 2: a bad parameter or checkpoint, which a restart cannot mend).
With `--no-autostart` the nodes wait unconfigured for `vg-ros lifecycle startup NODE` (or any lifecycle
manager); a node taken through the shutdown transition exits with code 0.
`vg-ros up` ends when every node has exited for good or on Ctrl-C (SIGINT to each node, then SIGTERM, then
SIGKILL after a grace period).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from vg_ros import stop_signals

# capability -> (node name = console_scripts executable, module with `main`)
NODES: dict[str, tuple[str, str]] = {
    "occupancy": ("occupancy_node", "vg_ros.nodes.occupancy_node"),
    "registration": ("registration_node", "vg_ros.nodes.registration_node"),
    "grounding": ("grounding_node", "vg_ros.nodes.grounding_node"),
}


@dataclass
class NodeSpec:
    """One supervised process: `name` for logs, the full `argv`, extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def node_spec(capability: str, *, config: str | Path | None = None, rig: str | None = None,
              device: str | None = None, use_sim_time: bool | None = None, threads: int | None = None,
              namespace: str | None = None, extra_ros_args: list[str] | None = None) -> NodeSpec:
    """The command line that runs `capability`'s node the way `ros2 run vg_ros <node>` would; `namespace`
    puts the node and its (relative) data topics under it."""
    from vg_ros.nodes.topics import normalize_namespace
    if capability not in NODES:
        raise ValueError(f"nodes: unknown node {capability!r}; choose from {sorted(NODES)}")
    name, module = NODES[capability]
    ros_args = ["--ros-args", "-r", f"__node:={name}"]
    namespace = normalize_namespace(namespace) if namespace is not None else "/"
    if namespace != "/":
        ros_args += ["-r", f"__ns:={namespace}"]
    env: dict[str, str] = {}
    if config is not None:
        ros_args += ["--params-file", str(config)]
        env["VG_ROS_CONFIG"] = str(config)
    if rig is not None:
        ros_args += ["-p", f"rig:={rig}"]
    if device is not None:
        ros_args += ["-p", f"device:={device}"]
    if use_sim_time is not None:
        ros_args += ["-p", f"use_sim_time:={'true' if use_sim_time else 'false'}"]
    ros_args += list(extra_ros_args or [])
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    # SIGINT's default action until run_node installs its handlers: a node stopped while it still imports
    # (`vg-ros up` stopped within its first seconds, or a respawn) ends by the signal, not with a
    # KeyboardInterrupt traceback from deep inside numpy or torch in the log
    code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); from {module} import main; "
            "sys.exit(main())")
    return NodeSpec(name, [sys.executable, "-u", "-c", code, *ros_args], env)


def threads_per_node(requested: int, n_nodes: int, cpu_count: int | None = None) -> int:
    """`--threads`: the requested count, or with 0 CPU cores / nodes, at least 1 (the launch file's `threads`
    argument follows the same rule: `thread_env` there, checked against this in test_launch.py)."""
    return requested or max(1, (cpu_count or os.cpu_count() or 1) // max(1, n_nodes))


def signal_name(signum: int) -> str:
    """'SIGKILL' for 9; a number `signal.Signals` has no member for (a real-time signal, `kill -35 PID`)
    as 'SIGRTMIN+1' or 'signal 35': the death report must never raise, or `vg-ros up` dies with a traceback
    and stops every other node."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        rtmin, rtmax = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
        if rtmin is not None and rtmax is not None and rtmin < signum < rtmax:
            return f"SIGRTMIN+{signum - rtmin}"
        return f"signal {signum}"


# A node's exit code for a setup failure (`vg_ros.nodes.process.run_node`): restarting cannot help.
SETUP_FAILURE = 2


def _print_line(line: str) -> None:
    """The supervisor's default log: stdout, and nothing once stdout is gone (`vg-ros up | head`): a death
    report must not raise in the watch loop, which would then stop every node."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


class Supervisor:
    """Starts `specs` as child processes, relays their output prefixed by name, reports deaths.

    `poll()` returns the nodes that exited since the last call (and logs each once), and starts again
    those due for a respawn; `alive()` lists those running, `pending()` those waiting to be started again;
    `stop()` ends all. With `respawn` a node that exits (other than with `SETUP_FAILURE`) is started again
    `respawn_delay_s` later, at most `max_respawns` times (`respawns[name]` counts them). `log` receives
    every line (default: print to stdout); `tail[name]` keeps each node's last lines for the death report."""

    def __init__(self, specs: list[NodeSpec], *, env: dict[str, str] | None = None,
                 log: Callable[[str], None] | None = None, log_dir: str | Path | None = None,
                 tail_lines: int = 15, respawn: bool = False, respawn_delay_s: float = 2.0,
                 max_respawns: int = 5) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"nodes: names repeat: {names}")
        if not respawn_delay_s >= 0 or max_respawns < 0:
            raise ValueError(f"respawn delay {respawn_delay_s} s and max respawns {max_respawns} must be >= 0")
        self.respawn, self.respawn_delay_s, self.max_respawns = respawn, float(respawn_delay_s), int(max_respawns)
        self.respawns: dict[str, int] = {n: 0 for n in names}
        self._due: dict[str, float] = {}   # name -> monotonic time of its next start
        self.specs = {s.name: s for s in specs}
        self.env = dict(os.environ if env is None else env)
        self.log = log or _print_line
        self.log_dir = Path(log_dir) if log_dir else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.exit_codes: dict[str, int] = {}
        self.tail: dict[str, collections.deque[str]] = {n: collections.deque(maxlen=tail_lines) for n in names}
        self.lines: dict[str, list[str]] = {n: [] for n in names}
        self._threads: list[threading.Thread] = []
        self._reported: set[str] = set()
        self._files: list[TextIO] = []

    def start(self) -> None:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.specs:
            self._launch(name)

    def _launch(self, name: str) -> None:
        spec = self.specs[name]
        # VG_ROS_PARENT_PID: the node stops (SIGTERM) when we die, even by SIGKILL (run_node: PR_SET_PDEATHSIG)
        env = {**self.env, **spec.env, "PYTHONUNBUFFERED": "1", "VG_ROS_PARENT_PID": str(os.getpid())}
        # start_new_session: Ctrl-C in the terminal reaches only us; we stop the nodes in order.
        proc = subprocess.Popen(spec.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        self.procs[name] = proc
        self.tail[name].clear()   # a respawned node's death report shows its own last lines
        self.started_at[name] = time.monotonic()
        self._reported.discard(name)
        mode = "a" if self.respawns[name] else "w"   # a respawned node appends to its log
        sink = open(self.log_dir / f"{name}.log", mode) if self.log_dir else None  # noqa: SIM115
        if sink:
            self._files.append(sink)
        thread = threading.Thread(target=self._relay, args=(name, proc, sink), daemon=True)
        thread.start()
        self._threads.append(thread)
        again = f", respawn {self.respawns[name]} of {self.max_respawns}" if self.respawns[name] else ""
        self.log(f"[up] started {name} (pid {proc.pid}{again})")

    def _relay(self, name: str, proc: subprocess.Popen, sink: TextIO | None) -> None:
        """Relay `proc`'s output until it ends. The pipe is always drained to its end: when our own output
        went away (`vg-ros up | head`, a `tee` that ended, a full disk under --log-dir) this thread used to die
        with the write's exception, and the node then blocked for ever in its next log call once the pipe's
        64 KB had filled (its callbacks with it, and a stop request too, until the SIGKILL)."""
        assert proc.stdout is not None
        relay = True
        for line in proc.stdout:
            line = line.rstrip("\n")
            self.tail[name].append(line)
            self.lines[name].append(line)
            if sink:
                try:
                    sink.write(line + "\n")
                    sink.flush()
                except (OSError, ValueError):   # no room, or closed: the node's own output goes on
                    sink = None
            if relay:
                try:
                    self.log(f"[{name}] {line}")
                except (OSError, ValueError):   # BrokenPipeError, a closed stdout: keep draining, drop the lines
                    relay = False

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def pending(self) -> list[str]:
        """Nodes that died and are waiting to be started again."""
        return sorted(self._due)

    def poll(self) -> list[tuple[str, int]]:
        """(name, returncode) of nodes that exited since the last poll, each logged once; starts again
        those whose respawn is due."""
        now = time.monotonic()
        for name in [n for n, at in self._due.items() if at <= now]:
            del self._due[name]
            self._launch(name)
        died = []
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or name in self._reported:
                continue
            self._reported.add(name)
            self.exit_codes[name] = code
            died.append((name, code))
            ran = time.monotonic() - self.started_at[name]
            how = f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"
            if code == 0:   # it ended on its own: a lifecycle shutdown, not a crash
                fate = "not restarted: it shut down cleanly"
            elif not self.respawn:
                fate = "not restarted"
            elif code == SETUP_FAILURE:
                fate = "not restarted: its setup failed (a restart cannot mend a bad parameter or checkpoint)"
            elif self.respawns[name] >= self.max_respawns:
                fate = f"not restarted: respawned {self.respawns[name]} times already (--max-respawns)"
            else:
                self.respawns[name] += 1
                self._due[name] = time.monotonic() + self.respawn_delay_s
                fate = (f"restarting in {self.respawn_delay_s:g} s (respawn {self.respawns[name]} of "
                        f"{self.max_respawns})")
            time.sleep(0.1)  # let the relay thread catch the last lines
            last = "\n".join(f"    {line}" for line in list(self.tail[name])[-8:])
            others = ", ".join(self.alive()) or "none"
            self.log(f"[up] {name} {'exited' if code == 0 else 'DIED'} ({how}) after {ran:.1f} s; {fate}. "
                     f"Still running: {others}."
                     + (f" Its last lines:\n{last}" if last else ""))
        return died

    def stop(self, grace_s: float = 10.0) -> dict[str, int]:
        """SIGINT every node, then SIGTERM, then SIGKILL, `grace_s` apart. Returns exit codes."""
        self._due.clear()   # no respawn while stopping
        self.respawn = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            running = [p for p in self.procs.values() if p.poll() is None]
            if not running:
                break
            for proc in running:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in running):
                time.sleep(0.05)
        for thread in self._threads:
            thread.join(timeout=2.0)
        for sink in self._files:
            sink.close()
        self._files.clear()
        codes = {}
        for name, proc in self.procs.items():
            codes[name] = proc.returncode if proc.returncode is not None else proc.wait()
            self._reported.add(name)
        self.exit_codes.update(codes)
        return codes

    def __enter__(self) -> "Supervisor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_nodes(values: list[str] | None) -> list[str]:
    """`--nodes occupancy registration` or `--nodes occupancy,registration` -> capability names."""
    if not values:
        return list(NODES)
    chosen: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip().removesuffix("_node")
            if not item:
                continue
            if item not in NODES:
                raise ValueError(f"--nodes: unknown node {item!r}; choose from {', '.join(NODES)}")
            if item not in chosen:
                chosen.append(item)
    if not chosen:
        raise ValueError(f"--nodes {' '.join(values)!r}: choose at least one of {', '.join(NODES)}")
    return chosen


def main(argv: list[str]) -> int:
    """`vg-ros up [--config config/perception.yaml] [--rig NAME] [--nodes ...] [--device D]`."""
    from vg_ros.cli import UserError
    from vg_ros.config import default_config_path
    from vg_ros.nodes.topics import normalize_namespace
    from vg_ros.types import Rig

    parser = argparse.ArgumentParser(prog="vg-ros up", description=(
        "Run the perception nodes, one process each, with one YAML of ROS parameters (what "
        "`ros2 launch vg_ros perception.launch.py` does on a ROS install). A node that dies is reported "
        "and (unless --respawn) not restarted; the others keep running. Ctrl-C stops all."))
    parser.add_argument("--config", default=None, help="ROS 2 params file (default: config/perception.yaml)")
    parser.add_argument("--rig", default=None, help="rig name or YAML path (default: the config's, else 'default')")
    parser.add_argument("--nodes", nargs="+", help=f"which nodes (default all): {' '.join(NODES)}")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="compute device for every node")
    parser.add_argument("--use-sim-time", action="store_true", help="nodes follow /clock (e.g. from vg-ros play)")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help="put the nodes and their data topics under this namespace (/NS/lidar/points, ...; "
                             "`vg-ros play --namespace NS` plays a bag into it)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP/MKL threads per node (default: cores / nodes, at least 1)")
    parser.add_argument("--no-autostart", action="store_true",
                        help="leave the nodes unconfigured for a lifecycle manager (`vg-ros lifecycle startup NODE`)")
    parser.add_argument("--log-dir", default=None, help="also write each node's output to DIR/<node>.log")
    parser.add_argument("--respawn", action="store_true",
                        help="start a crashed node again (never one whose setup failed: exit code 2)")
    parser.add_argument("--respawn-delay", type=float, default=2.0, help="seconds before a respawn (default 2)")
    parser.add_argument("--max-respawns", type=int, default=5, help="respawns per node at most (default 5)")
    args = parser.parse_args(argv)
    try:
        chosen = parse_nodes(args.nodes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    config = Path(args.config) if args.config else default_config_path()
    if not config.is_file():
        raise UserError(f"--config {config}: no such file")
    from vg_ros.config import NODE_NAMES, unknown_sections
    try:
        stray = unknown_sections(config)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if stray:
        print(f"[up] WARNING: {config}: section(s) {stray} match no node ({', '.join(NODE_NAMES)} or /**): "
              "a misspelt node name leaves that node on its defaults", flush=True)
    if args.rig is not None:
        try:
            Rig.load(args.rig)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0")
    if args.namespace is not None:
        try:
            normalize_namespace(args.namespace)
        except ValueError as exc:
            raise UserError(f"--namespace: {exc}") from None
    if not args.respawn_delay >= 0 or args.max_respawns < 0:
        raise UserError(f"--respawn-delay {args.respawn_delay} and --max-respawns {args.max_respawns}: must be >= 0")
    threads = threads_per_node(args.threads, len(chosen))
    specs = [node_spec(c, config=config.resolve(), rig=args.rig, device=args.device,
                       use_sim_time=True if args.use_sim_time else None, threads=threads,
                       namespace=args.namespace,
                       extra_ros_args=["-p", "autostart:=false"] if args.no_autostart else None) for c in chosen]
    stop = threading.Event()
    # SIGHUP: the terminal or the ssh session went away; the nodes (own sessions) would not hear it
    previous = stop_signals.catch_into((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), stop)
    sup = Supervisor(specs, log_dir=args.log_dir, respawn=args.respawn, respawn_delay_s=args.respawn_delay,
                     max_respawns=args.max_respawns)
    print(f"[up] {len(specs)} node(s) with {config}; ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}; "
          f"Ctrl-C to stop", flush=True)
    try:
        sup.start()
        while not stop.is_set():
            sup.poll()
            if not sup.alive() and not sup.pending():
                print("[up] every node has exited", flush=True)
                break
            stop.wait(0.5)
    finally:
        codes = sup.stop()
        stop_signals.restore(previous)
    failed = {n: c for n, c in codes.items() if c not in (0, -signal.SIGINT)}
    print("[up] exit codes: " + ", ".join(f"{n}={c}" for n, c in codes.items()), flush=True)
    return 1 if failed else 0
