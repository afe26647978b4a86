"""`vg-ros`: the entry to everything outside ROS. Each command lives in its capability's module and is
imported only when called, so `vg-ros info` never loads torch.

Every command's `main(argv) -> int` parses its own arguments. Expected failures (bad arguments,
unreadable files) raise `UserError` and print one line, no traceback.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from vg_ros import stop_signals

# command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("vg_ros.bag:info_main", "print a rosbag2's topics, types, counts and duration"),
    "sim": ("vg_ros.sim.cli:main", "write a simulated drive as an mcap rosbag2 with ground truth"),
    "register": ("vg_ros.registration.cli:register_main", "register two point clouds (VBReg)"),
    "odometry": ("vg_ros.registration.cli:odometry_main", "LiDAR odometry over a bag's PointCloud2 topic"),
    "occupancy": ("vg_ros.occupancy.cli:main", "semantic occupancy from a folder of camera images + calib.json"),
    "ground": ("vg_ros.grounding.cli:main", "find the target of a command in an image (VG-LAW)"),
    "train": ("vg_ros.cli:train_main", "train a model: registration | occupancy | grounding"),
    "eval": ("vg_ros.cli:eval_main", "score a model on held-out simulated data: registration | occupancy | grounding"),
    "replay": ("vg_ros.replay:main", "run the pipelines over a bag offline, write outputs, score against /gt"),
    "play": ("vg_ros.playback:play_main", "publish a bag's messages over DDS with /clock"),
    "record": ("vg_ros.playback:record_main", "record DDS topics into an mcap bag"),
    "up": ("vg_ros.up:main", "run the three nodes with config/perception.yaml (no ros2 launch needed)"),
    "lifecycle": ("vg_ros.lifecycle:main", "get or change running nodes' lifecycle state: startup, configure, "
                  "activate, deactivate, cleanup, shutdown"),
    "bench": ("vg_ros.cli:bench_main", "run a benchmark in bench/: registration | occupancy | grounding | sim"),
    "demo": ("vg_ros.demo:main", "the demo: simulated drive through the live nodes, scored, with a report"),
    "doctor": ("vg_ros.doctor:main", "check this machine for what the nodes need (DDS, libraries, weights, models)"),
}

CAPABILITIES = ("registration", "occupancy", "grounding")


class UserError(Exception):
    """An expected failure the user can fix: printed as one line, exit code 2."""


def image_output_path(path: str, flag: str = "--png", *, make_folder: bool = False) -> Path:
    """`path` checked before any work is done for it: an image extension PIL can write and a folder to put
    it in (created with `make_folder`). UserError naming `flag` otherwise."""
    from PIL import Image
    out = Path(path)
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if out.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name such as {out / 'out.png'}")
    if out.suffix.lower() not in writable:
        raise UserError(f"{flag} {path}: unknown image extension {out.suffix or '(none)'!r}; use .png or .jpg")
    parent = out.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if not parent.exists():
        if not make_folder:
            raise UserError(f"{flag} {path}: folder {parent} does not exist")
        parent.mkdir(parents=True, exist_ok=True)
    return out


def _call(target: str, argv: list[str]) -> int:
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, func_name)(argv) or 0)


def _capability_main(kind: str, argv: list[str], module_suffix: str) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in CAPABILITIES:
        if argv and argv[0] not in ("-h", "--help"):
            raise UserError(f"vg-ros {kind}: unknown model {argv[0]!r}; choose one of {', '.join(CAPABILITIES)}")
        print(f"usage: vg-ros {kind} {{{','.join(CAPABILITIES)}}} [options]  (--help after the model for its options)")
        return 0 if argv else 2
    return _call(f"vg_ros.{argv[0]}.{module_suffix}:main", argv[1:])


def train_main(argv: list[str]) -> int:
    return _capability_main("train", argv, "train")


def eval_main(argv: list[str]) -> int:
    return _capability_main("eval", argv, "evaluate")


def bench_main(argv: list[str]) -> int:
    names = CAPABILITIES + ("sim",)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: vg-ros bench {{{','.join(names)}}} [options]  (--help after the name for its options)")
        return 0
    if not argv or argv[0] not in names:
        raise UserError(f"vg-ros bench: choose one of {', '.join(names)}")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench").is_dir():
        raise UserError("vg-ros bench: the benchmarks live in the source tree's bench/; run from a checkout")
    sys.path.insert(0, str(root))
    try:
        return _call(f"bench.bench_{argv[0]}:main", argv[1:])
    except ValueError as exc:   # the library's word on a bad input (a seed, a rig, a weights file): one line
        raise UserError(str(exc)) from exc


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vg-ros COMMAND [options]   (vg-ros COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vg-ros: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    stop_signals.unblock()   # Ctrl-C and `kill` stop every command, whatever mask its parent left blocked
    try:
        return _call(COMMANDS[name][0], rest)
    except UserError as exc:
        print(f"vg-ros {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vg-ros {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m vg_ros.cli`: run the imported module's main, so the UserError the subcommands raise (they
    # import vg_ros.cli) is the class caught there, not a twin defined in __main__
    from vg_ros.cli import main as package_main
    sys.exit(package_main())
