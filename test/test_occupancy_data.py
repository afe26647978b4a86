"""Occupancy training data: both supervision modes, class-balanced sampling, the per-height prior baseline."""
import numpy as np
import pytest

from vg_ros.occupancy.data import (balanced_subset, class_statistics, height_prior_prediction,
                                   supervision_points, voxel_centre_points)
from vg_ros.types import FREE_CLASS, GridSpec

GRID = GridSpec((-4.0, -4.0, -1.0), (4.0, 4.0, 1.4), 0.4)   # 20 x 20 x 6
CAR, ROAD, CONE = 4, 11, 8


def _sample() -> dict:
    X, Y, Z = GRID.shape
    occ = np.full((X, Y, Z), FREE_CLASS, np.uint8)
    occ[:, :, 0] = ROAD                  # 400 ground voxels
    occ[2:6, 2:5, 1:4] = CAR             # 36 car voxels
    occ[15, 15, 1] = CONE                # a single cone voxel
    mask = np.ones((X, Y, Z), bool)
    mask[:, :10] = False                 # half of the grid unseen by the cameras
    mask[2:6, 2:5, 1:4] = True
    hits = voxel_centre_points(np.argwhere(occ != FREE_CLASS), GRID)
    labels = occ[occ != FREE_CLASS]
    return {"occupancy": occ, "mask_camera": mask, "lidar_base": hits, "lidar_labels": labels,
            "lidar_origin": np.array([0.0, 0.0, 1.2], np.float32)}


def test_balanced_subset_caps_each_class_and_keeps_rare_ones():
    rng = np.random.default_rng(0)
    labels = np.array([ROAD] * 1000 + [CAR] * 50 + [CONE] * 3)
    keep = balanced_subset(labels, per_class=100, total=10_000, rng=rng)
    counts = {c: int((labels[keep] == c).sum()) for c in (ROAD, CAR, CONE)}
    assert counts == {ROAD: 100, CAR: 50, CONE: 3}
    assert len(np.unique(keep)) == len(keep)
    assert len(balanced_subset(labels, per_class=100, total=60, rng=rng)) == 60
    assert len(balanced_subset(np.zeros(0, np.int64), 10, 10, rng)) == 0


def test_dense_points_are_camera_visible_voxel_centres_with_their_labels():
    sample = _sample()
    rng = np.random.default_rng(1)
    points, labels = supervision_points(sample, "dense", rng, GRID, max_per_class=50, free_per_occupied=2.0)
    idx = np.floor((points - np.asarray(GRID.lower)) / GRID.voxel_size).astype(int)
    assert np.allclose(points, voxel_centre_points(idx, GRID))
    assert np.array_equal(labels, sample["occupancy"][idx[:, 0], idx[:, 1], idx[:, 2]])
    assert sample["mask_camera"][idx[:, 0], idx[:, 1], idx[:, 2]].all()     # never an unseen voxel
    assert (labels == CONE).sum() == 1 and (labels == CAR).sum() == 36       # rare classes kept whole
    assert (labels == ROAD).sum() == 50                                      # the ground is capped
    n_occupied = (labels != FREE_CLASS).sum()
    visible_free = (sample["mask_camera"] & (sample["occupancy"] == FREE_CLASS)).sum()
    assert (labels == FREE_CLASS).sum() == min(visible_free, 2 * max(n_occupied, 1000))
    few = supervision_points(sample, "dense", rng, GRID, max_per_class=50, free_per_occupied=0.01)[1]
    assert (few == FREE_CLASS).sum() == 10   # free points at the given ratio (of at least 1000 occupied)


def test_sparse_points_are_lidar_hits_and_free_space_before_them():
    sample = _sample()
    rng = np.random.default_rng(2)
    points, labels = supervision_points(sample, "sparse", rng, GRID, free_per_ray=2)
    hits = labels != FREE_CLASS
    assert set(np.unique(labels[hits])) == {CAR, ROAD, CONE}
    # free samples lie on a ray from the sensor, short of a hit by at least one voxel diagonal
    origin = sample["lidar_origin"]
    free = points[~hits]
    assert len(free) > 0
    dist_free = np.linalg.norm(free - origin, axis=1)
    dist_hits = np.linalg.norm(sample["lidar_base"] - origin, axis=1)
    assert dist_free.max() <= dist_hits.max() - np.sqrt(3) * GRID.voxel_size + 1e-5
    with pytest.raises(ValueError, match="dense.*sparse"):
        supervision_points(sample, "voxels", rng, GRID)


def test_height_prior_baseline(tmp_path):
    sample = _sample()
    np.savez(tmp_path / "a.npz", **sample)
    stats = class_statistics([tmp_path / "a.npz"])
    assert stats["per_height"].shape == (GRID.shape[2], 18)
    assert stats["total"].sum() == sample["mask_camera"].sum()
    prior = height_prior_prediction(stats["per_height"], GRID.shape)
    assert (prior[:, :, 0] == ROAD).all() and (prior[:, :, 1:] == FREE_CLASS).all()


def test_height_prior_at_lidar_hits_is_the_layers_most_frequent_occupied_class(tmp_path):
    import dataclasses
    from vg_ros.occupancy.evaluate import height_prior_points
    from vg_ros.occupancy.model import model_config
    sample = _sample()
    np.savez(tmp_path / "a.npz", **sample)
    per_height = class_statistics([tmp_path / "a.npz"])["per_height"]
    cfg = dataclasses.replace(model_config("tiny"), grid_lower=GRID.lower, grid_upper=GRID.upper)
    z = np.array([-0.8, -0.5, 0.0, 0.5, 1.3])      # layers 0, 1, 2, 3, 5
    classes = height_prior_points(per_height, np.c_[np.zeros((5, 2)), z], cfg)
    assert classes.tolist() == [ROAD, CAR, CAR, CAR, 0]  # layer 5 has no occupied voxel: class 0, never free


def test_evaluation_scores_voxels_and_lidar_hits(tmp_path):
    """evaluate_model on one rendered frame: Occ3D scores for the model and the prior, and the LiDAR
    segmentation scores of both at the frame's in-grid hits."""
    import torch
    from vg_ros.occupancy.data import build_cache, load_sample
    from vg_ros.occupancy.evaluate import calibrate_free_shift, evaluate_model, lidar_points_in_grid, metrics_table
    from vg_ros.occupancy.model import TPVFormer, model_config
    torch.manual_seed(0)
    model = TPVFormer(model_config("tiny")).eval()
    paths = build_cache([4242], model.cfg.image_size, seconds=0.1, every=1, root=tmp_path, log=lambda *_: None)
    per_height = class_statistics(paths)["per_height"]
    out = evaluate_model(model, paths, torch.device("cpu"), per_height)
    points, labels = lidar_points_in_grid(model, load_sample(paths[0]))
    assert len(points) > 1000 and set(np.unique(labels)) <= set(range(FREE_CLASS))
    for key in ("model", "height_prior"):
        assert 0.0 <= out[key]["iou"] <= 100.0 and 0.0 <= out["lidarseg"][key]["miou"] <= 100.0
    assert out["lidarseg"]["height_prior"]["miou"] > 5.0  # the ground layer's class is right at most ground hits
    assert out["height_prior"]["obstacle_iou"] == 0.0  # ground where the ground is, free above: no obstacle
    assert "LiDAR segmentation" in metrics_table(dict(out, name="tiny"))
    bias = model.decoder.classifier.bias[FREE_CLASS].item()
    shift, sweep = calibrate_free_shift(model, paths, torch.device("cpu"), np.array([-2.0, 0.0, 2.0]))
    total = [s["miou"] + s["iou"] + s["obstacle_iou"] for s in sweep]
    assert [s["shift"] for s in sweep] == [-2.0, 0.0, 2.0] and shift == sweep[int(np.argmax(total))]["shift"]
    assert model.decoder.classifier.bias[FREE_CLASS].item() == pytest.approx(bias + shift)


def test_train_init_reads_weights_through_the_checkpoint_reader(tmp_path, monkeypatch):
    """`vg-ros train occupancy --init`: shipped weights continue (their baked free-logit shift undone); a
    corrupt file is one clear error naming it, not a traceback from inside safetensors,
    and it comes before the rendering."""
    from vg_ros.occupancy import data, train
    from vg_ros.occupancy.pipeline import default_weights_path
    real_cache = data.build_cache
    monkeypatch.setattr(train, "build_cache", lambda *a, **k: real_cache(*a, **{**k, "root": tmp_path}))

    def args(init):
        argv = ["--seeds", "4242", "--eval-seeds", "4243", "--seconds", "0.1", "--every", "1", "--steps", "1",
                "--calibrate-frames", "0", "--no-eval", "--init", str(init), "--out", str(tmp_path / "out")]
        parsed = train.build_parser().parse_args(argv)
        parsed.argv = argv   # as `main` records it
        return parsed
    logged = []
    info = train.train(args(default_weights_path("tiny")), log=logged.append)
    assert any("initialised from" in line and "undone" in line for line in logged)
    # the shipped network's training seeds stay on record beside this run's: eval refuses all of them
    from vg_ros.checkpoint import read_state
    from vg_ros.sim.seeds import parse_seeds
    _, shipped = read_state(default_weights_path("tiny"), "tpv_config", "occupancy")
    assert set(parse_seeds(info["train_seeds"])) == set(parse_seeds(shipped["train_seeds"])) | {4242}
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(default_weights_path("tiny").read_bytes()[:1000])
    rendered = []   # the bad file is reported before any rendering
    monkeypatch.setattr(train, "build_cache", lambda *a, **k: rendered.append(a) or real_cache(*a, **k))
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors file"):
        train.train(args(corrupt), log=lambda *_: None)
    assert rendered == []


def test_train_cli_stopped_by_sigint_writes_the_weights_so_far(tmp_path, monkeypatch, capsys):
    """Ctrl-C during `vg-ros train occupancy` (a real SIGINT, sent in the second step) ends the run after that
    step: the weights so far, marked partial, the card and metrics of earlier weights removed, exit 130."""
    from signal_helpers import sigint_on_call
    from vg_ros.checkpoint import read_state
    from vg_ros.cli import main as vg_main
    from vg_ros.occupancy import data, train
    real_cache = data.build_cache
    monkeypatch.setattr(train, "build_cache", lambda *a, **k: real_cache(*a, **{**k, "root": tmp_path}))
    monkeypatch.setattr(train, "occupancy_loss", sigint_on_call(train.occupancy_loss, 2))
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("occupancy_tpvformer_tiny.md", "occupancy_tpvformer_tiny.json"):
        (out / stale).write_text("earlier weights")
    argv = ["train", "occupancy", "--seeds", "4242", "--eval-seeds", "4243", "--seconds", "0.1", "--every", "1",
            "--steps", "20", "--out", str(out)]
    assert vg_main(argv) == 130
    assert "stopped at step 2 of 20" in capsys.readouterr().out
    _, meta = read_state(out / "occupancy_tpvformer_tiny.safetensors", "tpv_config", "occupancy")
    assert meta["steps"] == "2" and meta["partial"] == "true" and meta["train_seeds"] == "4242"
    assert not (out / "occupancy_tpvformer_tiny.md").exists() and not (out / "occupancy_tpvformer_tiny.json").exists()
    # Ctrl-C while the training frames render (before any step): the run stops there, nothing is written
    # or removed (the handler is installed around the steps only)
    for stale in ("occupancy_tpvformer_tiny.md", "occupancy_tpvformer_tiny.json"):
        (out / stale).write_text("earlier weights")
    weights_before = (out / "occupancy_tpvformer_tiny.safetensors").read_bytes()

    monkeypatch.setattr(train, "build_cache",
                        sigint_on_call(lambda *a, **k: real_cache(*a, **{**k, "root": tmp_path}), 1))
    assert vg_main(argv) == 130 and "interrupted" in capsys.readouterr().err
    assert (out / "occupancy_tpvformer_tiny.safetensors").read_bytes() == weights_before
    assert (out / "occupancy_tpvformer_tiny.md").exists() and (out / "occupancy_tpvformer_tiny.json").exists()
