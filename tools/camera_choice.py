"""How well a grounding network picks the camera a command is about, from a `vg-ros sim --command-camera any` bag.

    python tools/camera_choice.py BAG [--weights W ...] [--every 4] [--refusal] [--json OUT.json]

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
`--refusal` (with --every 1): also the frames whose target the command's camera does not show, and per
threshold what publishing "not found" under the published camera's mean evidence (`CameraChoice`) would
give: P@0.5 where some camera shows the target, the share published where none does (docs/grounding.md).
W: "default" or a .safetensors path (several: each in turn, on the same frames).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def choices(bag: str, weights: str, every: int, all_frames: bool = False) -> list[dict]:
    """Per scored frame: the command's camera index, each camera's score, presence and found, whether each
    camera shows the target (the command's does; another where /gt/grounding_views has it), and the box IoU of
    each camera's result with the target's box there (0 where the camera does not show it). `all_frames`:
    also the frames whose target the command's camera does not show ("visible" False), in another camera
    or in none; `every` then counts all frames."""
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
                visible = bool(expr.mask.any())
                if expr.camera not in names or not (visible or all_frames):
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
                target = {**views.get(expr.stamp_ns, {}), **({expr.camera: expr} if visible else {})}
                rows.append({"command": command, "camera": true, "stamp": expr.stamp_ns, "visible": visible,
                             "score": [r.score for r in results], "presence": [r.presence for r in results],
                             "found": [r.found for r in results], "shows": [n in target for n in names],
                             "iou": [float(box_iou(r.box, target[n].box)) if n in target and r.found else 0.0
                                     for n, r in zip(names, results)]})
    return rows


def node_choice(rows: list[dict], presence: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The node's `CameraChoice` (default half-life) run over the rows in order: per frame each camera's
    evidence summed over the command so far (frames, cameras), the camera it publishes, and that camera's
    weighted mean evidence (`CameraChoice.mean_evidence`). `presence` False: the score alone."""
    from vg_ros.grounding.messages import CameraChoice
    from vg_ros.types import GroundingResult

    choice, sums, picks, means = CameraChoice(), [], [], []
    for row in rows:
        cameras = [str(i) for i in range(len(row["score"]))]
        results = [GroundingResult(0, "", found=f, score=s, box=np.zeros(4), mask=np.zeros((1, 1), bool),
                                   presence=p if presence else float("nan"))
                   for f, s, p in zip(row["found"], row["score"], row["presence"])]
        pick = choice.choose(row["command"], cameras, results, row["stamp"])
        sums.append([choice.sums[c] for c in cameras])
        picks.append(pick)
        means.append(choice.mean_evidence(cameras[pick]))
    return np.array(sums, dtype=np.float64), np.array(picks), np.array(means)


def over_the_command(rows: list[dict], presence: bool) -> np.ndarray:
    """(frames, cameras): each camera's evidence summed over the command's frames so far, as the node's
    `CameraChoice` (half-life 0.1 s) sums it; `presence` False: the score alone."""
    return node_choice(rows, presence)[0]


REFUSAL_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def refusal_report(rows: list[dict], thresholds=REFUSAL_THRESHOLDS) -> dict:
    """For each threshold t: the published camera's result counted as not found when its weighted mean
    evidence is under t. Over the frames whose target some camera shows: P@0.5 of what is published
    (found, in a camera showing it, box IoU >= 0.5); over the frames whose target no camera shows: the share
    still published as found (right: none)."""
    _, pick, mean = node_choice(rows, presence=True)
    frame = np.arange(len(rows))
    found = np.array([r["found"] for r in rows], dtype=bool)[frame, pick]
    shows = np.array([r["shows"] for r in rows], dtype=bool)
    hit = np.array([r["iou"] for r in rows])[frame, pick] >= 0.5
    present = shows.any(axis=1)
    out = {"frames_present": int(present.sum()), "frames_absent": int((~present).sum()), "by_threshold": {}}
    for t in thresholds:
        published = found & (mean >= t)
        out["by_threshold"][f"{t:.2f}"] = {
            "prec_at_05_present": float((published & hit)[present].mean()) if present.any() else float("nan"),
            "found_absent": float(published[~present].mean()) if (~present).any() else float("nan")}
    return out


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
    ap.add_argument("--refusal", action="store_true",
                    help="also every frame of the commands (target in another camera or in none; use --every 1) "
                         "and the published camera's result refused under a mean-evidence threshold")
    args = ap.parse_args(argv)
    if args.every < 1:
        ap.error(f"--every {args.every}: must be >= 1")
    report = {}
    for weights in args.weights:
        every_row = choices(args.bag, weights, args.every, all_frames=args.refusal)
        rows = [r for r in every_row if r["visible"]]
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
        if args.refusal:
            ref = report[weights]["refusal"] = refusal_report(every_row)
            print(f"  refusal under a mean evidence ({ref['frames_present']} frames with the target in a camera, "
                  f"{ref['frames_absent']} in none):")
            for t, row in ref["by_threshold"].items():
                print(f"    {t}: P@0.5 where shown {100 * row['prec_at_05_present']:5.1f} %, "
                      f"found where in no camera {100 * row['found_absent']:5.1f} %")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
