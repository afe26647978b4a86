"""Parameter-wise mean of VG-LAW weight files of one network (e.g. a run and the weights it started from).

    python tools/average_weights.py OUT.safetensors A.safetensors B.safetensors [...]

The files (written by `vg_ros.grounding.pipeline.save_weights`; read by `checkpoint.read_state`, which names a
missing or corrupt file) must hold the same tensor names and shapes and agree on the metadata that defines the
network and its data (`format`, `spec` with its defaults filled in, `phi_zero`, `train_seeds`). With
`--union-seeds` the training splits may differ (each file must name its own) and OUT's `train_seeds` is their
union, so evaluation still refuses every seed any input trained on. With `--grow-to-depth N` an input of fewer ViT
blocks is first grown to N (`VGLAW.grown_from`: the new blocks add nothing, so it computes what it did; they are
drawn from `--seed`), e.g. to average a run grown by `vg-ros train grounding --init A --depth N --seed S` with its
exact start (`--grow-to-depth N --seed S OUT RUN A`). OUT keeps A's metadata (its spec at the grown depth)
with `averaged_from` (the input file names) and `date` set. Floating tensors (batch-norm running statistics
included) are averaged; integer ones (batch-norm batch counters) take the largest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vg_ros.checkpoint import read_state
from vg_ros.sim.seeds import format_seeds, parse_seeds

MUST_AGREE = ("format", "spec", "phi_zero", "train_seeds")


def normal(meta: dict[str, str], key: str):
    """A metadata value as compared: the spec with its defaults filled in (files written before a field
    existed omit it), anything else as written."""
    if key == "spec":
        from vg_ros.grounding.model import VGLAWSpec
        return VGLAWSpec(**json.loads(meta[key])).to_dict()
    return meta.get(key)


def training_seeds(path: Path, meta: dict[str, str]) -> set[int]:
    """The seeds a file was trained on, for --union-seeds; a file that does not name them is refused (its split
    could not be joined, and evaluation would take its training seeds for held-out ones)."""
    if not meta.get("train_seeds"):
        raise ValueError(f"{path}: no train_seeds in its metadata; --union-seeds needs every file's")
    return set(parse_seeds(meta["train_seeds"]))


def read_weights(path: Path, depth: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file's tensors and metadata; with `depth` larger than the file's, those of its network grown to `depth`
    blocks (`VGLAW.grown_from`, the new blocks drawn from `seed`, as `vg-ros train grounding --init FILE
    --depth N --seed S` draws them: its start exactly), the metadata's spec changed to match."""
    tensors, meta = read_state(path, "spec", "grounding")
    if not depth:
        return tensors, meta
    from dataclasses import replace

    from vg_ros.checkpoint import load_into
    from vg_ros.grounding.model import VGLAW, VGLAWSpec

    spec = VGLAWSpec(**json.loads(meta["spec"]))
    if depth < spec.depth:
        raise ValueError(f"{path}: {spec.depth} blocks; --grow-to-depth {depth} cannot remove blocks")
    if depth == spec.depth:
        return tensors, meta
    model = VGLAW(spec)
    load_into(model, tensors, path, "grounding")   # the tensors already read, not the file again
    torch.manual_seed(seed)
    grown = VGLAW.grown_from(model, replace(spec, depth=depth))
    return dict(grown.state_dict()), dict(meta, spec=json.dumps(grown.spec.to_dict()))


def average(paths: list[Path], union_seeds: bool = False, depth: int = 0,
            seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The mean tensors and the output metadata; ValueError when the files are not one network (after growing
    each to `depth` blocks when it is given)."""
    if len(paths) < 2:
        raise ValueError("average needs at least two weight files")
    first, meta = read_weights(paths[0], depth, seed)
    sums = {k: v.double() if v.is_floating_point() else v for k, v in first.items()}
    metas = [meta]
    must_agree = [k for k in MUST_AGREE if not (union_seeds and k == "train_seeds")]
    for path in paths[1:]:
        tensors, other = read_weights(path, depth, seed)
        if tensors.keys() != first.keys():
            raise ValueError(f"{path}: tensor names differ from {paths[0]} "
                             f"({sorted(tensors.keys() ^ first.keys())[:5]})")
        metas.append(other)
        for key in must_agree:
            if normal(meta, key) != normal(other, key):
                raise ValueError(f"{path}: metadata {key!r} {other.get(key)!r} != {meta.get(key)!r} in {paths[0]}")
        for k, v in tensors.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                raise ValueError(f"{path}: {k} is {tuple(v.shape)} {v.dtype}, "
                                 f"{tuple(first[k].shape)} {first[k].dtype} in {paths[0]}")
            if v.is_floating_point():
                sums[k] += v.double()
            else:
                sums[k] = torch.maximum(sums[k], v)
    out = {k: (v / len(paths)).to(first[k].dtype) if v.is_floating_point() else v for k, v in sums.items()}
    if union_seeds:
        meta = dict(meta, train_seeds=format_seeds(set().union(*map(training_seeds, paths, metas))))
    meta = dict(meta, averaged_from=json.dumps([p.name for p in paths]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M+00:00"))
    return out, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+")
    ap.add_argument("--union-seeds", action="store_true",
                    help="allow different training splits; OUT's train_seeds is their union")
    ap.add_argument("--grow-to-depth", type=int, default=0, metavar="N",
                    help="grow inputs of fewer ViT blocks to N first (their new blocks adding nothing)")
    ap.add_argument("--seed", type=int, default=0,
                    help="with --grow-to-depth: draw the new blocks from this seed (a run's --seed gives its start)")
    args = ap.parse_args(argv)
    if args.grow_to_depth < 0:
        ap.error(f"--grow-to-depth {args.grow_to_depth}: must be >= 0 (0: no growing)")
    try:
        tensors, meta = average(args.inputs, args.union_seeds, args.grow_to_depth, args.seed)
    except (ValueError, OSError) as e:
        print(f"average_weights: {e}", file=sys.stderr)
        return 2
    try:
        if args.out.is_dir():
            raise ValueError(f"{args.out}: a folder; give the output file's name")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out), metadata=meta)
    except (ValueError, OSError) as e:   # safetensors' own error for an unwritable file is no OSError
        print(f"average_weights: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - SafetensorError
        print(f"average_weights: cannot write {args.out} ({e})", file=sys.stderr)
        return 2
    print(f"average_weights: {len(tensors)} tensors, mean of {len(args.inputs)} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
