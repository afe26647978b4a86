"""rosbag2 reading (mcap and sqlite3) and mcap writing through `rosbags`, no ROS install needed.

* `typestore()`: the ROS 2 Jazzy types plus this package's `msg/*.msg` as `vg_ros/msg/<Name>`.
* `BagReader(path)`: topics, counts, time span, and deserialised messages (rosbags flavor; `vg_ros.convert`
  reads them). `path` is a rosbag2 directory or a single `.mcap` / `.db3` file.
* `BagWriter(path)`: an mcap rosbag2 *directory* named `path` (so `--out drive.mcap` makes the directory
  `drive.mcap/` holding `drive.mcap.mcap` and `metadata.yaml`, as `ros2 bag record -o drive.mcap` would).
  Accepts rosbags messages and rclpy messages (serialised with rclpy, same CDR bytes).
* `info_main(argv)`: `vg-ros info BAG [--json]`.
"""
from __future__ import annotations

import argparse
import functools
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MSG_PACKAGE = "vg_ros"


def msg_dir() -> Path:
    """Where this package's `.msg` files live: `msg/` of the source tree, else the installed share dir."""
    src = Path(__file__).resolve().parent.parent / "msg"
    if src.is_dir():
        return src
    try:  # installed by colcon
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory(MSG_PACKAGE)) / "msg"
    except Exception:  # noqa: BLE001 - any failure means "not installed that way"
        return src


@functools.lru_cache(maxsize=1)
def typestore():
    """rosbags Typestore: ROS 2 Jazzy + every `msg/*.msg` of this package as `vg_ros/msg/<Name>`. Cached."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore
    store = get_typestore(Stores.ROS2_JAZZY)
    types: dict = {}
    for path in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{MSG_PACKAGE}/msg/{path.stem}"))
    if types:
        store.register(types)
    return store


def normalise_msgtype(msgtype: str) -> str:
    """"sensor_msgs/Image" or "sensor_msgs/msg/Image" -> "sensor_msgs/msg/Image"."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    if len(parts) == 3:
        return msgtype
    raise ValueError(f"msgtype: {msgtype!r} is not 'pkg/msg/Name'")


class BagReader:
    """Read a rosbag2 (directory, or a single .mcap / .db3 file). Use as a context manager.

    `.topics` {topic: (msgtype, count)} for topics with messages (`.empty_topics` lists the rest);
    `.start_ns`, `.end_ns`, `.duration_s`, `.message_count`, `.storage` ("mcap" | "sqlite3");
    `.messages(topics=None)` yields (topic, msgtype, log_time_ns, msg) in log-time order.
    Raises ValueError when `path` is not a readable bag."""

    def __init__(self, path: str | Path):
        from rosbags.rosbag2 import Reader
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"bag {str(self.path)!r} does not exist")
        if self.path.is_dir() and not (self.path / "metadata.yaml").exists():
            raise ValueError(f"{str(self.path)!r} is a directory without metadata.yaml, not a rosbag2")
        if self.path.is_file() and self.path.suffix not in (".mcap", ".db3"):
            raise ValueError(f"{str(self.path)!r} is not a rosbag2 (a directory, or a .mcap / .db3 file)")
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except Exception as exc:  # noqa: BLE001 - rosbags raises several types for "not a bag"
            hint = ""
            if "magic" in str(exc).lower() and self.storage == "mcap":   # a recorder that never closed its file
                hint = " (an unfinished recording? `mcap recover IN -o OUT` from the mcap CLI repairs one)"
            raise ValueError(f"{str(self.path)!r} is not a readable rosbag2: {exc}{hint}") from None
        self._store = typestore()

    def __enter__(self) -> "BagReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._reader.is_open:
            self._reader.close()

    @property
    def storage(self) -> str:
        if self.path.is_dir():
            meta = self.path / "metadata.yaml"
            import yaml
            try:
                return str(yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]["storage_identifier"])
            except Exception:  # noqa: BLE001
                return "unknown"
        return {".mcap": "mcap", ".db3": "sqlite3"}.get(self.path.suffix, "unknown")

    @property
    def topics(self) -> dict[str, tuple[str, int]]:
        return {name: (info.msgtype, int(info.msgcount)) for name, info in sorted(self._reader.topics.items())
                if info.msgcount > 0}

    @property
    def latched_topics(self) -> set[str]:
        """Topics recorded from publishers that all offered transient-local durability (rosbag2's
        `offered_qos_profiles`): a player re-offers them so, for late joiners (RViz's map, a node that
        starts or respawns after the command was sent)."""
        offered: dict[str, list[bool]] = {}
        for conn in self._reader.connections:
            profiles = getattr(getattr(conn, "ext", None), "offered_qos_profiles", None) or []
            for qos in profiles if isinstance(profiles, list) else []:
                durability = getattr(qos, "durability", None)
                offered.setdefault(conn.topic, []).append(getattr(durability, "name", "") == "TRANSIENT_LOCAL")
        return {topic for topic, latched in offered.items() if latched and all(latched)}

    @property
    def empty_topics(self) -> dict[str, str]:
        return {name: info.msgtype for name, info in sorted(self._reader.topics.items()) if info.msgcount == 0}

    @property
    def message_count(self) -> int:
        return int(self._reader.message_count)

    @property
    def start_ns(self) -> int:
        return int(self._reader.start_time) if self.message_count else 0

    @property
    def end_ns(self) -> int:
        return int(self._reader.end_time) if self.message_count else 0

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9 if self.message_count else 0.0

    def _ensure_type(self, conn) -> None:
        """Register a type the bag defines but our typestore lacks (from the bag's own msgdef)."""
        if conn.msgtype in self._store.types:
            return
        from rosbags.typesys import get_types_from_msg
        text = conn.msgdef.data if conn.msgdef else ""
        if not text:
            raise ValueError(f"topic {conn.topic!r}: type {conn.msgtype!r} unknown and the bag has no definition")
        types: dict = {}
        chunks = text.split("=" * 80 + "\n")
        types.update(get_types_from_msg(chunks[0], conn.msgtype))
        for chunk in chunks[1:]:
            header, _, body = chunk.partition("\n")
            if header.startswith("MSG: "):
                name = normalise_msgtype(header[5:].strip())
                if name not in self._store.types:
                    types.update(get_types_from_msg(body, name))
        self._store.register(types)

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[tuple[str, str, int, Any]]:
        """(topic, msgtype, log_time_ns, msg) for `topics` (all when None). Unknown topics raise ValueError."""
        conns = self._reader.connections
        if topics is not None:
            wanted = set(topics)
            known = {c.topic for c in conns}
            if missing := sorted(wanted - known):
                raise ValueError(f"topics: {missing} not in bag {str(self.path)!r} (has {sorted(known)})")
            conns = [c for c in conns if c.topic in wanted]
            if not conns:
                return
        for conn in conns:
            self._ensure_type(conn)
        for conn, t_ns, raw in self._reader.messages(connections=conns):
            yield conn.topic, conn.msgtype, int(t_ns), self._store.deserialize_cdr(raw, conn.msgtype)


def _latched_qos():
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, zero, zero,
               QosLiveliness.AUTOMATIC, zero, False)


class BagWriter:
    """Write an mcap rosbag2 directory at `path` (see the module docstring for `drive.mcap`).
    Refuses an existing `path` unless `overwrite=True` (then only a rosbag2 directory or a file is removed).

    `.add_topic(topic, msgtype, *, latched=False)`: latched topics (e.g. /tf_static) get a transient-local
    offered QoS so `ros2 bag play` re-offers them to late subscribers. `.write(topic, log_time_ns, msg)`:
    `msg` a rosbags message (its type adds the topic on first use) or an rclpy message (add_topic first)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            if not overwrite:
                raise ValueError(f"output {str(self.path)!r} exists already; --force (overwrite=True) "
                                 f"replaces it")
            if self.path.is_dir():
                if not (self.path / "metadata.yaml").exists() and any(self.path.iterdir()):
                    raise ValueError(f"output {str(self.path)!r} is a non-empty directory that is not a rosbag2; "
                                     f"not removing it")
                shutil.rmtree(self.path)
            else:
                self.path.unlink()
        try:
            if self.path.parent.exists() and not self.path.parent.is_dir():
                raise NotADirectoryError(20, f"{self.path.parent} is a file, not a folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
            self._writer.open()
        except OSError as exc:   # an unwritable place (/proc/x.mcap, a read-only folder, a file as parent)
            raise ValueError(f"cannot write {str(self.path)!r}: {exc.strerror or exc}") from None
        self._store = typestore()
        self._conns: dict[str, Any] = {}
        self._types: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def add_topic(self, topic: str, msgtype: str, *, latched: bool = False) -> None:
        msgtype = normalise_msgtype(msgtype)
        if topic in self._conns:
            if self._types[topic] != msgtype:
                raise ValueError(f"topic {topic!r} already added with type {self._types[topic]!r}, not {msgtype!r}")
            return
        if msgtype not in self._store.types:
            raise ValueError(f"msgtype: {msgtype!r} is not in the typestore (ROS 2 Jazzy + vg_ros/msg)")
        qos = [_latched_qos()] if latched else []
        self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=self._store,
                                                         offered_qos_profiles=qos)
        self._types[topic] = msgtype
        self.counts[topic] = 0

    def write(self, topic: str, log_time_ns: int, msg: Any) -> None:
        if self._writer is None:
            raise ValueError("BagWriter is closed")
        rosbags_type = getattr(type(msg), "__msgtype__", None)
        if topic not in self._conns:
            if rosbags_type is None:
                raise ValueError(f"topic {topic!r}: call add_topic(topic, msgtype) before writing rclpy messages")
            self.add_topic(topic, rosbags_type)
        msgtype = self._types[topic]
        if rosbags_type is not None:
            if rosbags_type != msgtype:
                raise ValueError(f"topic {topic!r} has type {msgtype!r}; got a {rosbags_type!r} message")
            raw = self._store.serialize_cdr(msg, msgtype)
        else:
            from rclpy.serialization import serialize_message
            raw = serialize_message(msg)
        self._writer.write(self._conns[topic], int(log_time_ns), raw)
        self.counts[topic] += 1


def bag_summary(path: str | Path) -> dict:
    """The `vg-ros info --json` object for a bag."""
    with BagReader(path) as bag:
        return {
            "path": str(path), "storage": bag.storage, "duration_s": bag.duration_s, "start_ns": bag.start_ns,
            "end_ns": bag.end_ns, "message_count": bag.message_count,
            "topics": [{"name": n, "type": t, "count": c} for n, (t, c) in bag.topics.items()],
            "empty_topics": [{"name": n, "type": t} for n, t in bag.empty_topics.items()],
        }


def info_main(argv: list[str]) -> int:
    """`vg-ros info BAG [--json]`: topics with messages, their types and counts, duration, storage."""
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros info", description="Print a rosbag2's topics, types, counts "
                                     "and duration (topics with no messages are summarised on one line).")
    parser.add_argument("bag", help="rosbag2 directory, or a .mcap / .db3 file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        summary = bag_summary(args.bag)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"bag:      {summary['path']}")
    print(f"storage:  {summary['storage']}")
    print(f"duration: {summary['duration_s']:.3f} s  ({summary['start_ns']} .. {summary['end_ns']} ns)")
    print(f"messages: {summary['message_count']}")
    topics = summary["topics"]
    if topics:
        wn = max(len(t["name"]) for t in topics)
        wt = max(len(t["type"]) for t in topics)
        print(f"topics:   {len(topics)}")
        for t in topics:
            print(f"  {t['name']:<{wn}}  {t['type']:<{wt}}  {t['count']:>8}")
    else:
        print("topics:   0")
    if summary["empty_topics"]:
        print(f"  (+ {len(summary['empty_topics'])} declared topics with no messages)")
    return 0
