"""How well a grounding network picks the camera a command is about, from a `vg-ros sim --command-camera any` bag.

    python tools/camera_choice.py BAG [--weights W ...] [--every 4] [--json OUT.json]

For every `--every`-th frame whose target is in view (by /gt/grounding), the command is grounded in each of
the rig's cameras (`GroundingPipeline.infer_many`, as the node with `extra_image_topics` does) and printed:
P@0.5 in the command's own camera (what a node told the camera gets), and for each rule of choosing a camera
the share of frames where it picks the command's camera, where it picks a camera that shows the target (the
command's, or another where /gt/grounding_views has it: the target passed into it, or the cameras overlap),
and where its pick's box has IoU >= 0.5 with the target as that camera sees it.
Rules: `score`; `found, score` (found ones first); `presence`, `score x presence` (weights with a presence
head); `found, score x presence` (`best_camera`, the node's rule with camera_evidence_half_life 0); `..., over
the command`: the key summed over the command's frames so far, each earlier one's halved per 0.1 s of stamp
(the node's default rule, `CameraChoice`; use --every 1).
W: "default" or a .safetensors path (several: each in turn, on the same frames).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def choices(bag: str, weights: str, every: int) -> list[dict]:
    """Per scored frame: the command's camera index, each camera's score, presence and found, whether each
    camera shows the target (the command's does; another where /gt/grounding_views has it), and the box IoU of
    each camera's result with the target's box there (0 where the camera does not show it)."""
    from vg_ros.bag import BagReader
    from vg_ros.convert import image_to_rgb, msg_to_expression, stamp_of
    from vg_ros.grounding.metrics import box_iou
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
    from vg_ros.types import CameraFrame, Rig

    rig = Rig.load("default")
    names = [c.name for c in rig.cameras]
    pipe = GroundingPipeline(GroundingConfig(), weights=weights, device="cpu")
    rows: list[dict] = []
    images: dict[str, object] = {}
    seen = command = 0
    views: dict[int, dict[str, object]] = {}   # stamp -> {camera: the target as that camera sees it}
    with BagReader(bag) as src:
        for _, _, _, msg in src.messages(["/gt/grounding_views"]):
            view = msg_to_expression(msg)
            views.setdefault(view.stamp_ns, {})[view.camera] = view
    with BagReader(bag) as src:
        topics = ["/command", "/gt/grounding"] + [f"/cameras/{n}/image_raw" for n in names]
        for topic, _, _, msg in src.messages(topics):
            if topic == "/command":
                pipe.set_command(msg.data)
                command += 1
            elif topic.startswith("/cameras/"):
                images[topic.split("/")[2]] = msg
            else:
                expr = msg_to_expression(msg)
                if not expr.mask.any() or expr.camera not in names:
                    continue
                seen += 1
                if seen % every:
                    continue
                frames = []
                for name in names:
                    rgb = image_to_rgb(images[name])
                    frames.append(CameraFrame(rig.camera(name).scaled(rgb.shape[1], rgb.shape[0]), rgb,
                                              stamp_of(images[name])))
                results = pipe.infer_many(frames)
                true = names.index(expr.camera)
                target = {**views.get(expr.stamp_ns, {}), expr.camera: expr}
                rows.append({"command": command, "camera": true, "stamp": expr.stamp_ns,
                             "score": [r.score for r in results], "presence": [r.presence for r in results],
                             "found": [r.found for r in results], "shows": [n in target for n in names],
                             "iou": [float(box_iou(r.box, target[n].box)) if n in target and r.found else 0.0
                                     for n, r in zip(names, results)]})
    return rows


def over_the_command(rows: list[dict], presence: bool) -> np.ndarray:
    """(frames, cameras): each camera's evidence summed over the command's frames so far, as the node's
    `CameraChoice` (half-life 0.1 s) sums it; `presence` False: the score alone."""
    from vg_ros.grounding.messages import CameraChoice
    from vg_ros.types import GroundingResult

    choice, out = CameraChoice(), []   # the node's default half-life
    for row in rows:
        cameras = [str(i) for i in range(len(row["score"]))]
        results = [GroundingResult(0, "", found=f, score=s, box=np.zeros(4), mask=np.zeros((1, 1), bool),
                                   presence=p if presence else float("nan"))
                   for f, s, p in zip(row["found"], row["score"], row["presence"])]
        choice.choose(row["command"], cameras, results, row["stamp"])
        out.append([choice.sums[c] for c in cameras])
    return np.array(out, dtype=np.float64)


def rule_keys(rows: list[dict]) -> dict[str, np.ndarray]:
    """{rule: (frames, cameras) ranking key} for the rules these results support."""
    score = np.array([r["score"] for r in rows], dtype=np.float64)
    presence = np.array([r["presence"] for r in rows], dtype=np.float64)
    found = np.array([r["found"] for r in rows], dtype=np.float64)
    keys = {"score": score, "found, score": found * 10 + score}
    if np.isfinite(presence).all():
        keys.update({"presence": presence, "score x presence": score * presence,
                     "found, score x presence": found * 10 + score * presence,
                     "score x presence, over the command": over_the_command(rows, presence=True)})
    keys["score, over the command"] = over_the_command(rows, presence=False)
    return keys


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bag")
    ap.add_argument("--weights", nargs="+", default=["default"])
    ap.add_argument("--every", type=int, default=4, help="score every N-th frame whose target is in view")
    ap.add_argument("--json", dest="json_out", default="")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error(f"--every {args.every}: must be >= 1")
    report = {}
    for weights in args.weights:
        rows = choices(args.bag, weights, args.every)
        if not rows:
            print(f"{args.bag}: no frame with a target in view (a `vg-ros sim --command-camera any` bag?)",
                  file=sys.stderr)
            return 1
        true = np.array([r["camera"] for r in rows])
        iou = np.array([r["iou"] for r in rows])
        own = iou[np.arange(len(rows)), true]
        report[weights] = {"frames": len(rows), "own_camera_prec_at_05": float((own >= 0.5).mean()), "rules": {}}
        print(f"{weights}: {len(rows)} frames; P@0.5 in the command's own camera {100 * (own >= 0.5).mean():.1f} %")
        shows = np.array([r["shows"] for r in rows])
        for rule, key in rule_keys(rows).items():
            pick = np.argmax(key, axis=1)
            frame = np.arange(len(rows))
            command_camera, right = pick == true, shows[frame, pick]
            hit = iou[frame, pick] >= 0.5
            report[weights]["rules"][rule] = {"command_camera": float(command_camera.mean()),
                                              "right_camera": float(right.mean()), "prec_at_05": float(hit.mean())}
            print(f"  {rule:>24}: the command's camera {100 * command_camera.mean():5.1f} %, one showing the "
                  f"target {100 * right.mean():5.1f} %, and P@0.5 {100 * hit.mean():5.1f} %")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
