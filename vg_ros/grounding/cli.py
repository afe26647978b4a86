"""`vg-ros ground IMAGE "the red car left of the bus"`: ground one command in one image file.

Prints the box (x0 y0 x1 y1 pixels), score, found, mask area (pixels) and seconds; `--json` prints one
JSON object with keys box, score, found, mask_area, seconds and presence (the presence head's P(the
command's referent is in the image); null for weights without one); `--png OUT.png` writes an overlay
(mask tinted, box drawn; red box = under the score or presence threshold, i.e. "not found").
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def overlay(image: np.ndarray, result) -> np.ndarray:
    """The image with the mask tinted green and the box drawn (green found, red not found)."""
    out = image.astype(np.float32).copy()
    if result.found and result.mask.any():
        out[result.mask] = 0.5 * out[result.mask] + 0.5 * np.array([0, 255, 0], np.float32)
    out = out.astype(np.uint8)
    x0, y0, x1, y1 = [int(round(v)) for v in result.box]
    H, W = out.shape[:2]
    x0, x1 = np.clip([x0, x1], 0, W - 1)
    y0, y1 = np.clip([y0, y1], 0, H - 1)
    colour = np.array([0, 255, 0] if result.found else [255, 0, 0], np.uint8)
    for t in range(2):
        out[np.clip(y0 + t, 0, H - 1), x0:x1 + 1] = colour
        out[np.clip(y1 - t, 0, H - 1), x0:x1 + 1] = colour
        out[y0:y1 + 1, np.clip(x0 + t, 0, W - 1)] = colour
        out[y0:y1 + 1, np.clip(x1 - t, 0, W - 1)] = colour
    return out


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError, image_output_path
    from vg_ros.convert import read_rgb

    ap = argparse.ArgumentParser(prog="vg-ros ground", description=__doc__.split("\n")[0])
    ap.add_argument("image", help="an image file (PNG, JPEG, ...)")
    ap.add_argument("command", help='the referring expression, e.g. "the red car left of the bus"')
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--png", default="", help="write an overlay PNG here")
    ap.add_argument("--weights", default="default", help="safetensors file, or 'default'")
    ap.add_argument("--config", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--score-threshold", type=float, default=None, help="override the found threshold")
    ap.add_argument("--presence-threshold", type=float, default=None,
                    help="override the presence head's found threshold (weights with a presence head)")
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    args = ap.parse_args(argv)

    if args.png:
        image_output_path(args.png)
    try:
        image = read_rgb(args.image)
        from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
        from vg_ros.types import CameraFrame, CameraModel

        cfg = GroundingConfig(model=args.config)
        for name in ("score_threshold", "presence_threshold"):
            if getattr(args, name) is not None:
                cfg = cfg.replace(**{name: getattr(args, name)})
        pipe = GroundingPipeline(cfg, weights=args.weights, device=args.device)
        pipe.set_command(args.command)
        H, W = image.shape[:2]
        camera = CameraModel("image", W, H, np.array([[W, 0, W / 2], [0, W, H / 2], [0, 0, 1.0]]), np.eye(4))
        result = pipe.infer(CameraFrame(camera, image), 0)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    record = {"box": [round(float(v), 1) for v in result.box], "score": round(result.score, 4),
              "found": bool(result.found), "mask_area": int(result.mask.sum()), "seconds": round(result.seconds, 4),
              "presence": round(result.presence, 4) if np.isfinite(result.presence) else None}
    if args.png:
        from PIL import Image
        try:
            Image.fromarray(overlay(image, result)).save(args.png)
        except (OSError, ValueError) as exc:
            raise UserError(f"--png {args.png}: {exc}") from exc
    if args.json:
        print(json.dumps(record, allow_nan=False))
    else:
        x0, y0, x1, y1 = record["box"]
        state = "found" if result.found else "NOT FOUND (score or presence under threshold)"
        presence = "" if record["presence"] is None else f"  presence {record['presence']:.3f}"
        print(f"{state}: box {x0} {y0} {x1} {y1}  score {record['score']:.3f}{presence}  "
              f"mask area {record['mask_area']} px  "
              f"{record['seconds'] * 1000:.1f} ms" + (f"  overlay {args.png}" if args.png else ""))
    sys.stdout.flush()
    return 0
