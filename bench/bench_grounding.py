"""`vg-ros bench grounding`: per-frame latency of VG-LAW with the per-command weight cache vs without.

Cached: `set_command` once, then `infer` per frame (a plain ViT with merged q/k/v weights + heads).
Uncached: `infer_uncached` per frame (tokenizer + MiniLM text encoder + weight generation + the ViT with
low-rank language terms + heads). Configs tiny and base at 224x224 and 448x448, plus tiny at its native
320x176. The frame is a held-out simulated camera image (seed 1000) with a command the simulator wrote
for it. The network's cost does not depend on its weights' values, but the post-processing (the mask's
regions) does: a case at a shipped file's own size runs the shipped weights, the others untrained weights
of their shape with a non-zero Phi. Each path is timed in three blocks of back-to-back calls, the blocks of
the three paths interleaved (`time_calls`): steady state per path, and load changes shared by all.

Several cameras (`--cameras N`, default 6; the node's `extra_image_topics`): the shipped tiny network on the
N camera images of one simulated instant, as one batch (`infer_many`, what the node runs) vs one call per
camera, timed the same way.

    vg-ros bench grounding [--threads 1] [--frames 10] [--cameras 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def time_calls(fns: list, frames: int, warmup: int = 5, rounds: int = 3) -> list[float]:
    """Median seconds per call of each function in `fns` over `frames` timed calls each. The calls come in
    `rounds` blocks per function, the blocks interleaved: inside a block a path runs back to back (its steady
    state: warm caches, as a node running it per frame), and a change of load during the run reaches every
    path alike. Each block starts with `warmup` untimed calls."""
    times: list[list[float]] = [[] for _ in fns]
    for block in range(rounds):
        for fn, spent in zip(fns, times):
            for _ in range(warmup):
                fn()
            for _ in range(frames // rounds + (block < frames % rounds)):
                t0 = time.perf_counter()
                fn()
                spent.append(time.perf_counter() - t0)
    return [float(np.median(spent)) for spent in times]


def simulated_frame(seed: int = 1000) -> tuple:
    """(CameraFrame, short command, long command): the first simulated camera image of `seed` (held out:
    never trained on) with referring expressions of different lengths, and its shortest and longest
    expression. The language side's cost grows with the command, so both ends are timed."""
    from vg_ros.sim import simulate
    from vg_ros.types import CameraFrame, Rig

    rig = Rig.load("default")
    for sim_frame in simulate(seed, 4.0, rig, lidar=False, occupancy=False, expressions=12):
        for camera in rig.cameras:
            texts = sorted({e.text for e in sim_frame.expressions if e.camera == camera.name}, key=len)
            if len(texts) >= 2 and len(texts[-1].split()) > len(texts[0].split()):
                return CameraFrame(camera, sim_frame.images[camera.name], sim_frame.stamp_ns), texts[0], texts[-1]
    raise RuntimeError(f"simulator seed {seed}: no camera image with two commands of different lengths in 4 s")


def camera_set(seed: int = 1000, cameras: int = 6) -> list:
    """The first `cameras` camera images of the first simulated instant of `seed`, as CameraFrames."""
    from vg_ros.sim import simulate
    from vg_ros.types import CameraFrame, Rig

    rig = Rig.load("default")
    if not 1 <= cameras <= len(rig.cameras):
        raise ValueError(f"--cameras {cameras}: the default rig has {len(rig.cameras)} cameras")
    sim_frame = next(iter(simulate(seed, 0.1, rig, lidar=False, occupancy=False, expressions=0)))
    return [CameraFrame(c, sim_frame.images[c.name], sim_frame.stamp_ns) for c in rig.cameras[:cameras]]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vg-ros bench grounding", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--frames", type=int, default=10, help="timed frames per case (base uses a third)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--cases", default="tiny@320x176,tiny@224x224,tiny@448x448,base@224x224,base@448x448",
                    help="comma list of config@WxH")
    ap.add_argument("--weights", default="",
                    help="a .safetensors for the cases of its config and size (default: the shipped file), e.g. "
                         "vg_ros/weights/grounding_vglaw_tiny_presence.safetensors")
    ap.add_argument("--cameras", type=int, default=6, help="cameras of one instant for the batch row (0: none)")
    ap.add_argument("--json", dest="json_out", default="")
    args = ap.parse_args(argv)
    if not 0 <= args.cameras <= 6:
        ap.error(f"--cameras {args.cameras}: must be in [0, 6] (the default rig's cameras)")
    if args.weights and not Path(args.weights).is_file():
        ap.error(f"--weights {args.weights}: no such file")
    if args.frames < 1:
        ap.error(f"--frames {args.frames}: must be >= 1")
    cases = []
    for case in args.cases.split(","):   # all of them before the first is timed
        try:
            name, size = case.split("@")
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            ap.error(f"--cases: {case!r} is not config@WxH, e.g. tiny@320x176")
        from vg_ros.grounding.model import spec_by_name
        try:
            spec_by_name(name, img_h=height, img_w=width)
        except (ValueError, KeyError) as exc:
            ap.error(f"--cases: {case!r}: {exc}")
        cases.append((case, name, width, height))
    torch.set_num_threads(max(1, args.threads))

    from vg_ros.grounding.model import VGLAW, spec_by_name
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline, default_weights_path
    from vg_ros.grounding.text import TextEncoder

    encoder = TextEncoder()
    frame, short, long = simulated_frame()
    rows = []
    print(f"VG-LAW per-frame latency, {args.device}, {torch.get_num_threads()} threads, median of frames; "
          f"a {frame.image.shape[1]}x{frame.image.shape[0]} simulated image")
    print(f"uncached short: {short!r}; uncached long: {long!r} (cached: the frame cost does not depend on it)")
    print(f"{'case':>16} {'weights':>9} {'params':>8} {'cached ms':>10} {'uncached ms':>19} {'speed-up':>15}")
    print(f"{'':>16} {'':>9} {'':>8} {'':>10} {'short':>9} {'long':>9} {'short':>7} {'long':>7}")
    for case, name, width, height in cases:
        shipped = Path(args.weights) if args.weights else default_weights_path(name)
        pipe = GroundingPipeline(GroundingConfig(model=name), weights=shipped if shipped.exists() else None,
                                 device=args.device, text_encoder=encoder)
        weights = "given" if args.weights else "shipped"
        # the file's own depth (a network grown by `--depth`), at this case's size
        spec = spec_by_name(name, img_h=height, img_w=width, presence_head=pipe.spec.presence_head,
                            depth=pipe.spec.depth)
        if not shipped.exists() or pipe.spec != spec:   # no shipped file of this shape: time an untrained one
            torch.manual_seed(0)
            pipe.model = VGLAW(spec).to(pipe.device).for_inference()
            for layer in pipe.model.weight_generator.phi:  # non-zero Phi, as after training
                torch.nn.init.normal_(layer.weight, std=0.02)
            weights = "untrained"
        pipe.set_command(short)
        frames = max(3, args.frames // 3) if name == "base" else args.frames
        warmup = 1 if name == "base" else 3   # untimed calls at the start of each block
        cached, uncached_short, uncached_long = time_calls(
            [lambda: pipe.infer(frame, 1), lambda: pipe.infer_uncached(frame, short, 1),
             lambda: pipe.infer_uncached(frame, long, 1)], frames, warmup)
        params = sum(p.numel() for p in pipe.model.parameters()) / 1e6
        rows.append({"case": case, "weights": weights, "params_m": params, "cached_ms": cached * 1e3,
                     "uncached_ms": uncached_short * 1e3, "uncached_long_ms": uncached_long * 1e3,
                     "speedup": uncached_short / cached, "speedup_long": uncached_long / cached})
        print(f"{case:>16} {weights:>9} {params:7.1f}M {cached * 1e3:10.1f} {uncached_short * 1e3:9.1f} "
              f"{uncached_long * 1e3:9.1f} {uncached_short / cached:6.2f}x {uncached_long / cached:6.2f}x", flush=True)
    t0 = time.perf_counter()
    for _ in range(5):
        pipe.set_command(long)
    print(f"set_command (text encoder + weight generation + merge, {rows[-1]['case']}): "
          f"{(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")
    if args.cameras:
        pipe = GroundingPipeline(GroundingConfig(model="tiny"), weights="default", device=args.device,
                                 text_encoder=encoder)
        pipe.set_command(short)
        frames = camera_set(cameras=args.cameras)
        batched, one_by_one = time_calls([lambda: pipe.infer_many(frames),
                                          lambda: [pipe.infer(f) for f in frames]], args.frames, 3)
        rows.append({"case": f"tiny@{pipe.spec.img_w}x{pipe.spec.img_h} x{len(frames)} cameras",
                     "batched_ms": batched * 1e3, "one_by_one_ms": one_by_one * 1e3,
                     "speedup": one_by_one / batched})
        print(f"{len(frames)} cameras of one instant (shipped tiny): one batch {batched * 1e3:.1f} ms, one by one "
              f"{one_by_one * 1e3:.1f} ms ({one_by_one / batched:.2f}x)")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
