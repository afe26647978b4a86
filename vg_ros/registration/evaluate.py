"""`vg-ros eval registration`: the trained VBReg network against the compatibility-only confidence on
held-out simulator pairs (seeds never used in training), both through the same voting search.

Per variant: RR (LiDAR thresholds RE < 5 deg, TE < 0.6 m), median RE / TE, inlier precision / recall /
F1 of the final inlier set, precision of the top-10 % confidences, and seconds per pair. `--full`
runs the whole pipeline (FPFH + search + GICP) on the raw scans instead of the cached correspondence sets.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vg_ros.registration.metrics import THRESHOLDS, inlier_prf, rotation_error_deg, translation_error
from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
from vg_ros.registration.train import HELDOUT_SEEDS, PairSpec, set_config, sim_pairs, sim_sets


def score_sets(pipe: RegistrationPipeline, sets: list[dict], re_max: float, te_max: float) -> dict:
    """Solve every correspondence set with `pipe`; aggregate metrics."""
    re, te, prf, top_precision, seconds = [], [], [], [], []
    for s in sets:
        start = time.perf_counter()
        res = pipe.solve_correspondences(s["src"], s["dst"])
        seconds.append(time.perf_counter() - start)
        re.append(rotation_error_deg(res.transform, s["T_gt"]))
        te.append(translation_error(res.transform, s["T_gt"]))
        labels = s["labels"].astype(bool)
        prf.append(inlier_prf(pipe.last_debug["inlier_mask"], labels))
        conf = pipe.last_debug["confidence"]
        top = np.argsort(-conf, kind="stable")[: max(1, len(conf) // 10)]
        top_precision.append(float(labels[top].mean()))
    return summarise(re, te, prf, top_precision, seconds, re_max, te_max)


def summarise(re, te, prf, top_precision, seconds, re_max, te_max) -> dict:
    re, te = np.asarray(re), np.asarray(te)
    ok = (re < re_max) & (te < te_max)
    prf = np.asarray(prf) if prf else np.zeros((1, 3))
    return {"pairs": int(len(re)), "rr": float(ok.mean()), "median_re_deg": float(np.median(re)),
            "median_te_m": float(np.median(te)), "median_re_success_deg": float(np.median(re[ok])) if ok.any() else None,
            "median_te_success_m": float(np.median(te[ok])) if ok.any() else None,
            "inlier_precision": float(prf[:, 0].mean()), "inlier_recall": float(prf[:, 1].mean()),
            "inlier_f1": float(prf[:, 2].mean()),
            "top10_confidence_precision": float(np.mean(top_precision)) if top_precision else None,
            "seconds_per_pair": float(np.mean(seconds))}


def score_full(pipe: RegistrationPipeline, pairs, re_max: float, te_max: float) -> dict:
    """The whole pipeline on raw scan pairs; RR also split by how many scans apart the pair is."""
    re, te, seconds, skips, failures, converged = [], [], [], [], [], []
    for pair in pairs:
        res = pipe.register(pair.src, pair.dst)
        re.append(rotation_error_deg(res.transform, pair.T_gt))
        te.append(translation_error(res.transform, pair.T_gt))
        seconds.append(res.seconds)
        skips.append(int(pair.name.rsplit("_", 1)[1]))
        converged.append(res.converged)
        if not (re[-1] < re_max and te[-1] < te_max):
            failures.append(f"{pair.name} (RE {re[-1]:.1f} deg, TE {te[-1]:.2f} m, "
                            f"{'converged' if res.converged else 'not converged'})")
    out = summarise(re, te, [], [], seconds, re_max, te_max)
    for key in ("inlier_precision", "inlier_recall", "inlier_f1", "top10_confidence_precision"):
        out.pop(key)
    ok = (np.asarray(re) < re_max) & (np.asarray(te) < te_max)
    converged = np.asarray(converged, dtype=bool)
    out["converged_rate"] = float(converged.mean())
    out["wrong_but_converged"] = int((converged & ~ok).sum())   # the case a user must never get
    out["right_not_converged"] = int((~converged & ok).sum())
    skips = np.asarray(skips)
    for lo, hi in ((1, 9), (10, 99)):
        sel = (skips >= lo) & (skips <= hi)
        if sel.any():
            out[f"rr_skip_{lo}_{hi}"] = float(ok[sel].mean())
            out[f"pairs_skip_{lo}_{hi}"] = int(sel.sum())
    out["failures"] = failures
    return out


def evaluate(seeds, weights: str, preset: str = "lidar", full: bool = False, spec: PairSpec | None = None,
             overrides: dict | None = None) -> dict:
    """Both variants on `seeds`' pairs; `overrides` ({parameter: value}) change the preset's config (ablations)."""
    cfg = RegistrationConfig.preset(preset) if full else set_config(preset)
    cfg = cfg.replace(**(overrides or {}))
    spec = spec or PairSpec()
    re_max, te_max = THRESHOLDS[preset]
    variants = {"trained": RegistrationPipeline(cfg, weights=weights), "compatibility_only": RegistrationPipeline(cfg, weights=None)}
    report = {"seeds": list(seeds), "preset": preset, "thresholds": {"re_deg": re_max, "te_m": te_max},
              "mode": "full pipeline" if full else "correspondence sets (FPFH matches)", "overrides": dict(overrides or {})}
    if full:
        pairs = [p for seed in seeds for p in sim_pairs(seed, spec)]
        for name, pipe in variants.items():
            report[name] = score_full(pipe, pairs, re_max, te_max)
    else:
        sets = sim_sets(seeds, spec, variants["compatibility_only"])
        report["mean_true_inlier_ratio"] = float(np.mean([s["labels"].mean() for s in sets]))
        for name, pipe in variants.items():
            report[name] = score_sets(pipe, sets, re_max, te_max)
    return report


def format_report(report: dict) -> str:
    keys = ["pairs", "rr", "pairs_skip_1_9", "rr_skip_1_9", "pairs_skip_10_99", "rr_skip_10_99", "converged_rate",
            "wrong_but_converged", "right_not_converged", "median_re_deg", "median_te_m", "inlier_precision",
            "inlier_recall", "inlier_f1", "top10_confidence_precision", "seconds_per_pair"]
    overrides = "".join(f", {k}={v}" for k, v in report.get("overrides", {}).items())
    lines = [f"held-out sim seeds {report['seeds']} ({report['mode']}, preset {report['preset']}{overrides}, "
             f"success RE < {report['thresholds']['re_deg']} deg and TE < {report['thresholds']['te_m']} m)"]
    if "mean_true_inlier_ratio" in report:
        lines.append(f"mean true inlier ratio of the putative matches: {report['mean_true_inlier_ratio']:.3f}")
    lines.append(f"{'metric':<28}{'trained VBReg':>16}{'compat-only':>16}")
    for key in keys:
        a, b = report["trained"].get(key), report["compatibility_only"].get(key)
        if a is None and b is None:
            continue
        counts = key.startswith("pairs") or key in ("wrong_but_converged", "right_not_converged")
        fmt = (lambda v: "-" if v is None else f"{v:.4f}") if not counts else (lambda v: str(v))
        lines.append(f"{key:<28}{fmt(a):>16}{fmt(b):>16}")
    for name in ("trained", "compatibility_only"):
        if report[name].get("failures"):
            lines.append(f"{name} failures: {', '.join(report[name]['failures'])}")
    return "\n".join(lines)


def trained_seeds(weights: str) -> set[int]:
    """The simulator seeds `weights` were trained on: its `train_seeds` metadata; the training default
    (TRAIN_SEEDS, which the shipped file was trained on) for a file written before that key; none for
    'none' or a file that cannot be read (loading it reports that)."""
    from vg_ros.registration.pipeline import DEFAULT_WEIGHTS
    from vg_ros.registration.train import TRAIN_SEEDS
    from vg_ros.sim.seeds import parse_seeds
    if str(weights) == "none":
        return set()
    path = DEFAULT_WEIGHTS if str(weights) == "default" else Path(weights)
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable: the network load names the problem
        return set()
    return set(parse_seeds(meta["train_seeds"])) if "train_seeds" in meta else set(TRAIN_SEEDS)


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    parser = argparse.ArgumentParser(prog="vg-ros eval registration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(HELDOUT_SEEDS))
    parser.add_argument("--weights", default="default")
    parser.add_argument("--preset", default="lidar", choices=("lidar", "indoor"))
    parser.add_argument("--full", action="store_true", help="run the whole pipeline on raw scans")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PARAM=VALUE",
                        help="change one pipeline parameter of the preset (repeatable), e.g. --set bev_candidates=0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.seeds:
        raise UserError("--seeds: give at least one seed")
    used = trained_seeds(args.weights) & set(args.seeds)
    if used:
        raise UserError(f"--seeds {sorted(used)[:10]}{' ...' if len(used) > 10 else ''}: the weights were trained "
                        f"on {'them' if len(used) > 1 else 'it'}; held-out seeds only (default {HELDOUT_SEEDS[0]}-"
                        f"{HELDOUT_SEEDS[-1]})")
    import torch
    import yaml
    torch.set_num_threads(1)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected PARAM=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        report = evaluate(args.seeds, args.weights, args.preset, args.full, overrides=overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
