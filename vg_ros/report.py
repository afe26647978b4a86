"""The report folder of `vg-ros replay --report` and `vg-ros demo`: `index.html` plus PNGs.

    bev.png          BEV of semantic occupancy, predicted vs ground truth, for a few frames over time
                     (top-most occupied class per column, camera-visible area only; light blue = not seen)
    trajectory.png   odometry vs ground truth in the ground plane (aligned as ATE aligns it)
    grounding.png    the command camera's image with the command text, GT box (green), predicted box and
                     mask (red), for a few frames
    result.json      the numbers the page shows

Drawing uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from vg_ros.types import FREE_CLASS, OCC_CLASSES, OCC_PALETTE


UNSEEN_RGB = (205, 222, 245)  # light blue: no palette class uses it


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bev_image(semantics: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """semantics (X, Y, Z) -> RGB (Y, X, 3) uint8 seen from above, x (forward) to the right, y (left) up:
    the class of the highest occupied voxel of each column; free = white; columns never visible = UNSEEN_RGB."""
    sem = np.asarray(semantics)
    occupied = sem != FREE_CLASS
    if visible is not None:
        occupied &= np.asarray(visible, bool)
    z_top = np.where(occupied.any(axis=2), sem.shape[2] - 1 - np.argmax(occupied[:, :, ::-1], axis=2), -1)
    top = np.take_along_axis(sem, np.clip(z_top, 0, None)[:, :, None], axis=2)[:, :, 0]
    rgb = np.full(sem.shape[:2] + (3,), 255, np.uint8)
    has = z_top >= 0
    rgb[has] = OCC_PALETTE[top[has]]
    if visible is not None:
        rgb[~np.asarray(visible, bool).any(axis=2)] = UNSEEN_RGB
    # rows = y from high (left) to low, columns = x from back to front
    return np.ascontiguousarray(np.transpose(rgb, (1, 0, 2))[::-1])


def _aligned(est: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """est positions (T, 3) rigidly aligned onto gt (T, 3) (Umeyama, no scale), as `ate` aligns them."""
    if len(est) < 3:
        return est
    mu_e, mu_g = est.mean(0), gt.mean(0)
    U, _, Vt = np.linalg.svd((gt - mu_g).T @ (est - mu_e))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return (est - mu_e) @ (U @ D @ Vt).T + mu_g


def draw_bev(path: Path, frames: list) -> Path | None:
    if not frames:
        return None
    plt = _plt()
    n = len(frames)
    fig, axes = plt.subplots(n, 2, figsize=(7, 3.4 * n), squeeze=False)
    t0 = frames[0][0]
    for row, (stamp, pred, gt, mask, grid) in enumerate(frames):
        for col, (sem, title) in enumerate(((pred, "predicted"), (gt, "ground truth"))):
            ax = axes[row][col]
            ax.imshow(bev_image(sem, mask), extent=(grid.lower[0], grid.upper[0], grid.lower[1], grid.upper[1]),
                      interpolation="nearest")
            ax.plot([0], [0], marker=">", color="black", markersize=6)
            ax.set_title(f"{title}, t = {(stamp - t0) / 1e9:.1f} s", fontsize=9)
            ax.tick_params(labelsize=7)
    present = sorted({int(c) for _, p, g, _, _ in frames for c in np.unique(np.concatenate([p.ravel(), g.ravel()]))
                      if c != FREE_CLASS})
    handles = [plt.Rectangle((0, 0), 1, 1, color=OCC_PALETTE[c] / 255.0) for c in present]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=np.array(UNSEEN_RGB) / 255.0))
    fig.legend(handles, [OCC_CLASSES[c] for c in present] + ["not seen by a camera"], loc="lower center",
               ncol=min(6, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_trajectory(path: Path, traj: tuple | None, section: dict) -> Path | None:
    if not traj:
        return None
    plt = _plt()
    _, est, gt = traj
    p_gt = gt[:, :3, 3]
    p_est = _aligned(est[:, :3, 3], p_gt)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(p_gt[:, 0], p_gt[:, 1], "-", color="black", label="ground truth")
    ax.plot(p_est[:, 0], p_est[:, 1], "--", color="tab:red", label="odometry (aligned)")
    ax.plot(p_gt[0, 0], p_gt[0, 1], "o", color="black")
    ax.set_aspect("equal", adjustable="datalim")
    ate, drift = section.get("ate_m"), section.get("drift_pct")
    ax.set_title(f"ATE {ate:.3f} m, drift {drift:.2f} %" if ate is not None and drift is not None else "odometry",
                 fontsize=10)
    ax.set_xlabel("x (m, odom)")
    ax.set_ylabel("y (m, odom)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _images_at(bag: str | Path, topic: str, stamps: set[int]) -> dict[int, np.ndarray]:
    from vg_ros.bag import BagReader
    from vg_ros.convert import image_to_rgb, stamp_of
    found: dict[int, np.ndarray] = {}
    with BagReader(bag) as reader:
        if topic not in reader.topics:
            return found
        for _, _, _, msg in reader.messages([topic]):
            stamp = stamp_of(msg)
            if stamp in stamps:
                found[stamp] = image_to_rgb(msg)
    return found


def draw_grounding(path: Path, frames: list, in_bag: str | Path, image_topic: str | None) -> Path | None:
    if not frames or not image_topic:
        return None
    plt = _plt()
    images = _images_at(in_bag, image_topic, {f[0] for f in frames})
    frames = [f for f in frames if f[0] in images][:4]
    if not frames:
        return None
    from vg_ros.grounding.metrics import box_iou
    fig, axes = plt.subplots(len(frames), 1, figsize=(7, 4.2 * len(frames)), squeeze=False)
    for ax, (stamp, expr, ok, box, score, mask) in zip(axes[:, 0], frames):
        rgb = images[stamp].astype(np.float32)
        if ok and mask.shape == rgb.shape[:2]:
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
        ax.imshow(rgb.astype(np.uint8))
        x0, y0, x1, y1 = expr.box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=2))
        if ok:
            x0, y0, x1, y1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", linewidth=2))
            verdict = f"IoU {float(box_iou(box, expr.box)):.2f}, score {score:.2f}"
        else:
            verdict = "not found"
        ax.set_title(f"\"{expr.text}\" ({expr.hops}-hop) — {verdict}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, in_bag: str | Path, out_bag: str | Path, result: dict, *,
                 title: str = "vg_ros report", frames: int = 4, extra_html: str = "",
                 topics: dict | None = None) -> Path:
    """Write index.html, the PNGs and result.json into `out_dir`; returns the index path."""
    from vg_ros.replay import format_summary, public, score_bags, summary_rows
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detail = score_bags(in_bag, out_bag, keep_frames=frames, topics=topics)
    pictures = []
    occ = detail.get("occupancy", {})
    if (p := draw_bev(out / "bev.png", occ.get("_frames", []))) is not None:
        pictures.append((p.name, "BEV occupancy, predicted vs ground truth, over time"))
    odo = detail.get("odometry", {})
    if (p := draw_trajectory(out / "trajectory.png", odo.get("_traj"), odo)) is not None:
        pictures.append((p.name, "trajectory vs ground truth"))
    gro = detail.get("grounding", {})
    if (p := draw_grounding(out / "grounding.png", gro.get("_frames", []), in_bag, gro.get("image_topic"))) is not None:
        pictures.append((p.name, "grounding: command, GT box (green), prediction (red)"))
    clean = public(result)
    (out / "result.json").write_text(json.dumps(clean, indent=2, sort_keys=True))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in summary_rows(result))
    figs = "".join(f'<figure><img src="{name}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption>'
                   f"</figure>" for name, cap in pictures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} img{{max-width:100%}} pre{{background:#f6f6f6;padding:1em;overflow:auto}}
figure{{margin:1.5em 0}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>input bag <code>{html.escape(str(in_bag))}</code>, outputs <code>{html.escape(str(out_bag))}</code></p>
<table><tr><th>pipeline</th><th>score</th><th>latency p50/p90/p99</th><th>frames scored/GT</th></tr>{rows}</table>
<pre>{html.escape(format_summary(result, title))}</pre>
{extra_html}
{figs}
<h2>all numbers</h2><pre>{html.escape(json.dumps(clean, indent=2, sort_keys=True))}</pre>
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index
