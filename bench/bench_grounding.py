"""`vg-ros bench grounding`: per-frame latency of VG-LAW with the per-command weight cache vs without.

Cached: `set_command` once, then `infer` per frame (a plain ViT with merged q/k/v weights + heads).
Uncached: `infer_uncached` per frame (tokenizer + MiniLM text encoder + weight generation + the ViT with
low-rank language terms + heads). Configs tiny and base at 224x224 and 448x448, plus tiny at its native
320x176. Latency does not depend on the weights' values, so untrained weights of each shape are timed.

    vg-ros bench grounding [--threads 2] [--frames 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def time_calls(fn, frames: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vg-ros bench grounding", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--frames", type=int, default=10, help="timed frames per case (base uses a third)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--cases", default="tiny@320x176,tiny@224x224,tiny@448x448,base@224x224,base@448x448",
                    help="comma list of config@WxH")
    ap.add_argument("--json", dest="json_out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    from vg_ros.grounding.model import VGLAW, spec_by_name
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
    from vg_ros.grounding.text import TextEncoder
    from vg_ros.types import CameraFrame, CameraModel

    encoder = TextEncoder()
    command = "the red car to the left of the white bus behind the pedestrian"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (270, 480, 3), dtype=np.uint8)
    camera = CameraModel("CAM_FRONT", 480, 270, np.array([[400.0, 0, 240], [0, 400.0, 135], [0, 0, 1]]), np.eye(4))
    frame = CameraFrame(camera, image, 1)
    rows = []
    print(f"VG-LAW per-frame latency, {args.device}, {torch.get_num_threads()} threads, median of frames")
    print(f"{'case':>16} {'params':>8} {'cached ms':>10} {'uncached ms':>12} {'speed-up':>9}")
    for case in args.cases.split(","):
        name, size = case.split("@")
        width, height = (int(v) for v in size.split("x"))
        spec = spec_by_name(name, img_h=height, img_w=width)
        pipe = GroundingPipeline(GroundingConfig(model=name), weights=None, device=args.device, text_encoder=encoder)
        torch.manual_seed(0)
        pipe.model = VGLAW(spec).to(pipe.device).for_inference()
        for layer in pipe.model.weight_generator.phi:  # non-zero Phi, as after training
            torch.nn.init.normal_(layer.weight, std=0.02)
        pipe.set_command(command)
        frames = max(3, args.frames // 3) if name == "base" else args.frames
        warmup = 2 if name == "base" else 5
        cached = time_calls(lambda: pipe.infer(frame, 1), frames, warmup)
        uncached = time_calls(lambda: pipe.infer_uncached(frame, command, 1), frames, warmup)
        params = sum(p.numel() for p in pipe.model.parameters()) / 1e6
        rows.append({"case": case, "params_m": params, "cached_ms": cached * 1e3, "uncached_ms": uncached * 1e3,
                     "speedup": uncached / cached})
        print(f"{case:>16} {params:7.1f}M {cached * 1e3:10.1f} {uncached * 1e3:12.1f} {uncached / cached:8.2f}x",
              flush=True)
    t0 = time.perf_counter()
    for _ in range(5):
        pipe.set_command(command)
    print(f"set_command (text encoder + weight generation + merge, {rows[-1]['case']}): "
          f"{(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
