"""`vg-ros demo`: a simulated drive through the three live nodes over real DDS, scored, with a report.

    vg-ros demo [--seconds 6] [--seed 1] [--out demo_out] [--rate 0.25] [--offline]

1. simulate a drive into `OUT/drive.mcap` (`vg-ros sim`);
2. start the three nodes as processes (`vg-ros up`'s supervisor; `use_sim_time`, one thread each);
3. play the bag into them (`vg-ros play`'s Player, with /clock) at `--rate` — slower than real time so a
   2-core CPU keeps up — while recording what they publish into `OUT/live.mcap`;
4. score the recording against the bag's ground truth (the same `score_bags` as `vg-ros replay`), run
   `vg-ros replay` on the same bag for comparison (unless `--no-replay`), and write `OUT/report/index.html`
   with PNGs; print a summary table: live scores, replay scores, end-to-end latency, and drops (frames an
   output is missing for, and each node's own drop counters).

`--offline` skips DDS entirely and reports the replay. DDS stays on this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST; `./run demo` also runs it in a private network namespace).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from vg_ros.replay import (
    PIPELINES, SECTIONS, format_summary, merge_scores, output_topics, public, replay, score_bags,
)
from vg_ros.ros_compat import use_dds_profiles
from vg_ros.up import NODES

NODE_NAMES = {cap: name for cap, (name, _) in NODES.items()}

def _log(text: str) -> None:
    print(text, flush=True)


def simulate(out: Path, seed: int, seconds: float) -> Path:
    from vg_ros.sim.cli import write_bag
    bag = out / "drive.mcap"
    _log(f"[demo] 1/4 simulating {seconds:g} s of drive (seed {seed}) into {bag}")
    t0 = time.monotonic()
    stats = write_bag(bag, seed, seconds, overwrite=True, progress=True, lidar_labels=False)
    _log(f"[demo]     {stats.frames} frames, {stats.commands} command(s) in {time.monotonic() - t0:.0f} s")
    return bag


def _percentiles(values: list[float]) -> dict:
    from vg_ros.replay import latency_ms
    return latency_ms([v / 1000.0 for v in values])


class LiveRun:
    """Nodes as processes, a player and a recorder in this process; see the module docstring."""

    def __init__(self, bag: Path, out: Path, *, rate: float, device: str, nodes: list[str],
                 config: str | None, startup_timeout_s: float, log_dir: Path,
                 during_play: Callable[[Any, int], None] | None = None, quiet: bool = False,
                 lossless: bool = True, queue_depth: int | None = None) -> None:
        """`during_play(supervisor, messages_published)` is called after every published message (tests
        use it to kill a node mid-run). `lossless`: sensor topics reliable on both sides and node queues
        `queue_depth` deep (default: every frame of the bag, at most 300), so a slow node works off a
        backlog instead of losing frames (what scoring
        against replay wants; a robot would keep the best-effort default and take the freshest frame)."""
        self.bag, self.out, self.rate, self.device = bag, out, rate, device
        self.nodes = nodes
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir
        self.during_play = during_play
        self.lossless = lossless
        self.topics = output_topics(config)
        self.expected = expected_frames(bag, self.topics)
        self.queue_depth = int(queue_depth or min(300, max(30, max(self.expected.values(), default=0) + 5)))
        sections = {SECTIONS[c] for c in nodes}
        self.outputs = [t for name, sec in self.topics.items() if name in sections for k, t in sec.items()
                        if k in ("grid", "voxels", "odometry", "pose", "mask", "box", "position")]
        self.diagnostics: dict[str, dict] = {}
        self.supervisor: Any = None
        self.recorder: Any = None
        self.player: Any = None

    def run(self) -> dict:
        from vg_ros.config import default_config_path
        from vg_ros.playback import Player, Recorder, _RosProcess
        from vg_ros.up import NODES, Supervisor, node_spec

        config = Path(self.config) if self.config else default_config_path()
        qos_args = ["-p", "sensor_reliability:=reliable", "-p", f"qos_depth:={self.queue_depth}"] if self.lossless else []
        # With a backlog the executor drains the six camera queues unevenly; the default 0.5 s wait for a
        # late camera would then split sets that are all queued. Lossless runs wait longer (stamp time).
        extra = {"occupancy": ["-p", "missing_camera_timeout:=5.0"]} if self.lossless else {}
        specs = [node_spec(c, config=config.resolve(), device=self.device, use_sim_time=True, threads=1,
                           extra_ros_args=qos_args + extra.get(c, [])) for c in self.nodes]
        node_logs: list[str] = []

        def on_line(line: str) -> None:
            node_logs.append(line)
            if line.startswith("[up]") and ("DIED" in line):
                _log(line)

        sup = Supervisor(specs, log=on_line, log_dir=self.log_dir)
        self.supervisor = sup
        ros = _RosProcess("vg_ros_demo", use_sim_time=False)
        live_bag = self.out / "live.mcap"
        recorder = None
        summary: dict = {"published": {}}
        info: dict[str, Any] = {}
        try:
            player = self.player = Player(ros.node, self.bag, rate=self.rate, track_stamps=True,
                                          reliable_sensors=self.lossless)
            recorder = self.recorder = Recorder(ros.node, live_bag, self.outputs, overwrite=True,
                                                track_stamps=True)
            from std_msgs.msg import String
            for capability in self.nodes:
                name = NODES[capability][0]
                ros.node.create_subscription(String, f"/{name}/diagnostics",
                                             lambda m, n=name: self.diagnostics.__setitem__(n, json.loads(m.data)), 10)
            _log(f"[demo] 2/4 starting {', '.join(s.name for s in specs)} (logs in {self.log_dir})")
            sup.start()
            ready = self._wait_ready(sup, recorder, player, ros.stop)
            info["ready_s"] = ready
            missing = recorder.poll()
            if missing:
                _log(f"[demo]     no publisher yet on {missing}; recording what arrives")
            _log(f"[demo] 3/4 playing {player.duration_s:.1f} s of sensor data at {self.rate}x into the nodes")
            bar = _bar(sum(_bag_counts(self.bag, player.topics).values()), "play")
            published = [0]

            def progress(n: int) -> None:
                bar.update(n)
                published[0] += n
                if self.during_play is not None:
                    self.during_play(sup, published[0])
            t_play = time.monotonic()
            summary = player.run(ros.stop, progress=progress)
            bar.close()
            info["play_wall_s"] = time.monotonic() - t_play
            self._drain(recorder, sup, ros.stop)
            sup.poll()
            time.sleep(1.2)  # one more diagnostics period
        finally:
            codes = sup.stop(grace_s=10.0)
            rec_summary = recorder.close() if recorder is not None else {"counts": {}}
            ros.close()
        info["exit_codes"] = codes
        info["sections"] = [SECTIONS[c] for c in self.nodes]
        info["died"] = {n: c for n, c in sup.exit_codes.items() if c not in (0, -2)}
        info["published"] = summary["published"]
        info["skipped_topics"] = player.skipped
        info["received"] = rec_summary["counts"]
        info["latency_ms"] = self._latency(player, recorder)
        info["diagnostics"] = self.diagnostics
        info["last_lines"] = {n: (list(sup.tail[n]) or [""])[-1][-300:] for n in sup.specs}
        info["live_bag"] = str(live_bag)
        return info

    def _wait_ready(self, sup: Any, recorder: Any, player: Any, stop: threading.Event) -> float:
        t0 = time.monotonic()
        deadline = t0 + self.startup_timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            sup.poll()
            active = [n for n in sup.specs if any("active on" in line for line in sup.lines[n])]
            alive = sup.alive()
            if all(n in active or n not in alive for n in sup.specs):
                break
            time.sleep(0.2)
        not_ready = [n for n in sup.alive() if not any("active on" in line for line in sup.lines[n])]
        if not_ready:
            _log(f"[demo]     still loading after {self.startup_timeout_s:.0f} s: {not_ready}; starting anyway")
        for name in sup.specs:
            if name not in sup.alive():
                last = " | ".join(list(sup.tail[name])[-2:])
                _log(f"[demo]     {name} is not running ({last[:300]})")
        if not sup.alive():
            return time.monotonic() - t0
        # DDS discovery both ways: the nodes' subscriptions must see our publishers, and we theirs
        inputs = [t for sec in self.topics.values() for t in sec["inputs"] if t in player.topics]
        player.wait_for_subscribers(inputs, timeout_s=10.0)
        end = time.monotonic() + 5.0
        while recorder.poll() and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1.0)
        ready = time.monotonic() - t0
        _log(f"[demo]     nodes ready after {ready:.0f} s: {', '.join(sup.alive()) or 'none'}")
        return ready

    def _drain(self, recorder: Any, sup: Any, stop: threading.Event, limit_s: float = 120.0) -> None:
        """After playback, let the nodes work off their queues: wait until every running node answered
        every expected frame, or no output arrived for `quiet` seconds (a few times the slowest latency
        seen so far, at least 5 s), at most `limit_s`."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end and not stop.is_set():
            recorder.poll()
            sup.poll()
            running = {SECTIONS[c] for c in self.nodes if NODE_NAMES[c] in sup.alive()}
            if all(recorder.counts.get(self.topics[sec]["primary"], 0) >= self.expected.get(sec, 0)
                   for sec in running):
                return
            slowest = max((p.get("p99") or 0.0 for p in self._latency(self.player, recorder).values()), default=0.0)
            quiet = max(5.0, 3.0 * slowest / 1000.0)
            if time.monotonic() - recorder.last_receive_wall > quiet:
                return
            time.sleep(0.25)

    def _latency(self, player: Any, recorder: Any) -> dict:
        """End-to-end wall latency per section: output received - last input published with that stamp."""
        sent: dict[tuple[str, int], int] = player.publish_wall_ns
        per: dict[str, list[float]] = {}
        for section, sec in self.topics.items():
            for (topic, stamp), received in recorder.receive_wall_ns.items():
                if topic != sec["primary"]:
                    continue
                times = [sent[(t, stamp)] for t in sec["inputs"] if (t, stamp) in sent]
                if times:
                    per.setdefault(section, []).append((received - max(times)) / 1e6)
        return {k: _percentiles(v) for k, v in per.items()}


def _bag_counts(bag: Path, topics: list[str]) -> dict[str, int]:
    from vg_ros.bag import BagReader
    with BagReader(bag) as reader:
        return {t: reader.topics[t][1] for t in topics if t in reader.topics}


def _progress_enabled() -> bool:
    """tqdm bars on a terminal (or with VG_ROS_PROGRESS=1), not in logs and tests."""
    return sys.stderr.isatty() or bool(os.environ.get("VG_ROS_PROGRESS"))


def _bar(total: int, desc: str):
    from vg_ros.replay import _progress
    return _progress(total, desc, _progress_enabled())


def expected_frames(bag: Path, topics: dict) -> dict[str, int]:
    """How many outputs each node should produce for the bag: one per camera set / LiDAR scan, and one
    per command-camera image from the first command on."""
    from vg_ros.bag import BagReader
    with BagReader(bag) as reader:
        counts = {t: c for t, (_, c) in reader.topics.items()}
        occ_inputs = topics["occupancy"]["inputs"]
        image = topics["grounding"]["image"]
        first_cmd = None
        images = 0
        wanted = [t for t in ("/command", image) if t in counts]
        for topic, _, log_ns, _ in reader.messages(wanted) if wanted else ():
            if topic == "/command" and first_cmd is None:
                first_cmd = log_ns
            elif topic == image and first_cmd is not None:
                images += 1
    return {"occupancy": max((counts.get(t, 0) for t in occ_inputs), default=0),
            "odometry": counts.get(topics["odometry"]["inputs"][0], 0), "grounding": images}


def comparison_table(live: dict, offline: dict | None) -> str:
    """Live numbers beside replay's, per metric."""
    rows = [("metric", "live (DDS)", "replay", "delta")]
    keys = [("occupancy", "miou", "occupancy mIoU %", 1.0), ("occupancy", "iou", "occupancy IoU %", 1.0),
            ("occupancy", "obstacle_iou", "occupancy obstacle IoU %", 1.0),
            ("odometry", "ate_m", "odometry ATE m", 1.0), ("odometry", "drift_pct", "odometry drift %", 1.0),
            ("grounding", "prec_at_05", "grounding Prec@0.5 %", 100.0), ("grounding", "miou", "grounding mIoU %", 100.0)]
    for section, key, label, scale in keys:
        a = (live.get(section) or {}).get(key)
        b = (offline.get(section) or {}).get(key) if offline else None
        fa = "-" if a is None else f"{a * scale:.3f}"
        fb = "-" if b is None else f"{b * scale:.3f}"
        delta = "-" if a is None or b is None else f"{(a - b) * scale:+.3f}"
        rows.append((label, fa, fb, delta))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def drops_table(live_info: dict, expected: dict[str, int], topics: dict) -> str:
    lines = ["frames answered (live) / expected, and drops (and missed inputs) counted by each node:"]
    for section, sec in topics.items():
        if section not in expected or section not in live_info.get("sections", topics):
            continue
        topic = sec["primary"]
        got = live_info.get("received", {}).get(topic, 0)
        lines.append(f"  {section:<10} {got:>4} / {expected.get(section, 0):<4} ({topic})")
    for node, diag in sorted(live_info.get("diagnostics", {}).items()):
        drops = diag.get("drops") or {}
        text = ", ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "none"
        missed = ", ".join(f"{k}={v}" for k, v in sorted((diag.get("missed") or {}).items()) if v)
        lines.append(f"  {node}: drops {text}" + (f"; missed (never reached the callback: queue full while busy, "
                                                  f"or lost in transport) {missed}" if missed else ""))
    for name, code in (live_info.get("died") or {}).items():
        lines.append(f"  {name} DIED with exit code {code}; see its log")
    lat = live_info.get("latency_ms") or {}
    if lat:
        lines.append("end-to-end latency (input published -> output received, wall ms, p50/p90/p99):")
        for section, p in lat.items():
            lines.append(f"  {section:<10} {p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`vg-ros demo [--seconds S] [--out DIR] [--rate R] [--offline]`."""
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros demo", description=(
        "Simulate a drive, run the three nodes over real DDS on it (localhost only), record and score their "
        "outputs against the ground truth, compare with `vg-ros replay`, and write a report folder."))
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the simulated drive (default 6)")
    parser.add_argument("--seed", type=int, default=1, help="world seed (default 1)")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--rate", type=float, default=0.25,
                        help="playback rate; below 1 so a small CPU keeps up (default 0.25)")
    parser.add_argument("--offline", action="store_true", help="score via `vg-ros replay` only, no DDS")
    parser.add_argument("--no-replay", action="store_true",
                        help="live only: skip the replay comparison (about halves the time)")
    parser.add_argument("--bag", default=None, help="use this bag instead of simulating one")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--nodes", nargs="+", default=list(PIPELINES), choices=PIPELINES, help="which nodes to run")
    parser.add_argument("--config", default=None, help="ROS params file (default config/perception.yaml)")
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for the nodes to load")
    parser.add_argument("--best-effort", action="store_true",
                        help="sensor QoS as on a robot (best effort, shallow queues: a slow node drops frames) "
                             "instead of reliable with a queue as deep as the bag")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON object")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        raise UserError(f"--seconds {args.seconds}: must be > 0")
    if not 0 < args.rate <= 10:
        raise UserError(f"--rate {args.rate}: must be in (0, 10]")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    if not 0 < args.startup_timeout < math.inf:
        raise UserError(f"--startup-timeout {args.startup_timeout}: must be a finite number of seconds > 0")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("")
        (out / ".write_test").unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: not writable ({exc})") from None
    t_start = time.monotonic()
    topics = output_topics(args.config)
    try:
        bag = Path(args.bag) if args.bag else simulate(out, args.seed, args.seconds)
        expected = expected_frames(bag, topics)
    except ValueError as exc:
        raise UserError(str(exc)) from None

    def run_replay(step: str) -> dict:
        _log(f"[demo] {step} replaying the bag offline (same pipelines, no DDS) for comparison")
        return replay(bag, out / "replay.mcap", config=args.config, device=args.device,
                      pipelines=tuple(args.nodes), overwrite=True, progress=_progress_enabled())

    offline = None
    if args.offline:
        offline = result = run_replay("2/2")
        title = "vg-ros demo (offline replay)"
        out_bag = out / "replay.mcap"
        extra = ""
    else:
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        use_dds_profiles()  # before the in-process player's rclpy.init; the node processes inherit it
        live_info = LiveRun(bag, out, rate=args.rate, device=args.device, nodes=list(args.nodes), config=args.config,
                            startup_timeout_s=args.startup_timeout, log_dir=out / "logs",
                            lossless=not args.best_effort).run()
        if not args.no_replay:
            offline = run_replay("4/4")
        out_bag = Path(live_info["live_bag"])
        result = {"sensor_seconds": (offline or {}).get("sensor_seconds"), "rate": args.rate,
                  "wall_seconds": live_info.get("play_wall_s"), "live": public(live_info)}
        if result["sensor_seconds"] is None:
            from vg_ros.bag import BagReader
            with BagReader(bag) as reader:
                result["sensor_seconds"] = reader.duration_s
        result["realtime_factor"] = args.rate
        for name in args.nodes:
            section = SECTIONS[name]
            result[section] = {"latency_ms": live_info["latency_ms"].get(section, {})}
        for name in PIPELINES:
            if name not in args.nodes:
                result[SECTIONS[name]] = {"available": False, "reason": "not requested (--nodes)"}
        merge_scores(result, score_bags(bag, out_bag, topics=topics))
        for name in args.nodes:
            section = SECTIONS[name]
            node = f"{name}_node"
            if node in live_info["died"] and not live_info["received"].get(topics[section]["primary"]):
                last = (live_info.get("last_lines") or {}).get(node, "")
                result[section].update({"available": False,
                                        "reason": f"{node} exited (code {live_info['died'][node]}): {last}"})
        if offline is not None:
            result["replay"] = public(offline)
        title = f"vg-ros demo: live nodes over DDS at {args.rate}x"
        extra = "<h2>live vs replay</h2><pre>" + _esc(comparison_table(result, offline)) + "</pre>" \
                + "<h2>drops and latency</h2><pre>" + _esc(drops_table(live_info, expected, topics)) + "</pre>"
    from vg_ros.report import write_report
    index = write_report(out / "report", bag, out_bag, result, title=title, extra_html=extra, topics=topics)
    result["report"] = str(index)
    result["total_wall_seconds"] = time.monotonic() - t_start
    print()
    print(format_summary(result, title))
    if not args.offline:
        print()
        print(comparison_table(result, offline))
        print()
        print(drops_table(live_info, expected, topics))
    print(f"\nreport: {index}   (total {result['total_wall_seconds']:.0f} s)")
    (out / "result.json").write_text(json.dumps(public(result), indent=2, sort_keys=True))
    if args.json:
        print(json.dumps(public(result), sort_keys=True))
    return 0


def _esc(text: str) -> str:
    import html
    return html.escape(text)
