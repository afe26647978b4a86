"""`vg-ros register` / `vg-ros odometry` end to end, point-cloud file reading, and a short training run
with a safetensors round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vg_ros.cli import main as vg_main
from vg_ros.registration.io import read_cloud


def test_register_json_on_real_lidar_pair(shared_data, capsys):
    lid = shared_data / "registration" / "lidar_pair_small_gicp"
    code = vg_main(["register", str(lid / "source.ply"), str(lid / "target.ply"), "--preset", "lidar", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"transform", "inliers", "inlier_ratio", "fitness", "seconds", "converged"} <= set(out)
    assert set(out) <= {"transform", "inliers", "inlier_ratio", "fitness", "seconds", "converged", "reason", "covariance"}
    gt = np.loadtxt(lid / "T_target_source.txt")
    assert np.linalg.norm(np.asarray(out["transform"])[:3, 3] - gt[:3, 3]) < 0.6 and out["converged"] is True


def test_register_text_output_and_no_refine(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.uniform(0, 4, (2000, 3)) * [1, 1, 0], rng.uniform(0, 4, (2000, 3)) * [0, 1, 1],
                            rng.uniform(0.5, 3.5, 3) + rng.uniform(-0.3, 0.3, (800, 3))])
    np.save(tmp_path / "a.npy", cloud)
    np.save(tmp_path / "b.npy", cloud + [0.1, 0.0, 0.0])
    code = vg_main(["register", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--no-refine", "--weights", "none"])
    text = capsys.readouterr().out
    assert "transform" in text and "inliers" in text and "fitness" in text and "seconds" in text
    assert code in (0, 1)


def test_register_rejects_non_point_clouds(tmp_path, capsys):
    bogus = tmp_path / "notes.ply"
    bogus.write_text("hello, not a cloud\n")
    assert vg_main(["register", str(bogus), str(bogus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a PLY" in err[0]
    txt = tmp_path / "x.txt"
    txt.write_text("1 2 3")
    assert vg_main(["register", str(txt), str(txt)]) == 2
    assert "unsupported point-cloud format" in capsys.readouterr().err
    assert vg_main(["register", str(tmp_path / "missing.pcd"), str(txt)]) == 2
    np.save(tmp_path / "bad.npy", np.zeros((4, 2)))
    assert vg_main(["register", str(tmp_path / "bad.npy"), str(tmp_path / "bad.npy")]) == 2
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 18)
    assert vg_main(["register", str(tmp_path / "odd.bin"), str(tmp_path / "odd.bin")]) == 2
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))   # as an empty .bin: a bad file, exit 2
    assert vg_main(["register", str(tmp_path / "empty.npy"), str(tmp_path / "empty.npy")]) == 2
    assert "no points" in capsys.readouterr().err
    np.save(tmp_path / "nan.npy", np.full((100, 3), np.nan))   # nothing usable: as empty (it exited 1, "not converged")
    assert vg_main(["register", str(tmp_path / "nan.npy"), str(tmp_path / "empty.npy")]) == 2
    assert "no finite point" in capsys.readouterr().err


def test_bin_layouts_detected(tmp_path):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(40, 3)).astype(np.float32) * 10  # 40 points: x4 = 640 B, x5 = 800 B (both /80)
    kitti = np.c_[xyz, rng.uniform(0, 1, 40).astype(np.float32)]
    nusc = np.c_[xyz, rng.uniform(0, 255, 40).astype(np.float32), rng.integers(0, 32, 40).astype(np.float32)]
    kitti.astype(np.float32).tofile(tmp_path / "k.bin")
    nusc.astype(np.float32).tofile(tmp_path / "n.bin")
    assert np.allclose(read_cloud(tmp_path / "k.bin"), xyz)
    assert np.allclose(read_cloud(tmp_path / "n.bin"), xyz)
    assert np.allclose(read_cloud(tmp_path / "n.bin", bin_fields=5), xyz)
    xyz3 = rng.normal(size=(7, 4)).astype(np.float32)  # 112 B: x4 only
    xyz3.tofile(tmp_path / "s.bin")
    assert read_cloud(tmp_path / "s.bin").shape == (7, 3)


def test_odometry_cli_on_real_bag(shared_data, capsys):
    bag = shared_data / "bags" / "s3e_lidar_imu_camera"
    code = vg_main(["odometry", str(bag), "--topic", "/Alpha/velodyne_points", "--json", "--weights", "none"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["scans"] == 2 and out["converged"] == 2
    assert vg_main(["odometry", str(bag), "--topic", "/nope"]) == 2
    assert "not in bag" in capsys.readouterr().err


def test_short_training_reduces_loss_and_round_trips(tmp_path):
    from vg_ros.registration.pipeline import RegistrationConfig, load_network
    from vg_ros.registration.train import save_weights, train

    rng = np.random.default_rng(0)
    sets = []
    for _ in range(6):
        src = rng.uniform(-20, 20, (200, 3))
        dst = src + [1.0, 2.0, 0.0]
        labels = (rng.uniform(size=200) < 0.3).astype(np.uint8)
        dst[labels == 0] = rng.uniform(-20, 20, (int((labels == 0).sum()), 3))
        sets.append({"src": src, "dst": dst, "labels": labels, "T_gt": np.eye(4)})
    cfg = RegistrationConfig.preset("lidar").replace(num_layers=2, feature_dim=16, random_dim=8, hidden_dim=16)
    net, summary = train(sets, cfg, steps=40, batch=2, size=128, lr=3e-3, log_every=0)
    assert summary["steps"] == 40 and summary["final_prior_nll"] < 0.6
    path = tmp_path / "w.safetensors"
    save_weights(net, path, {"preset": "lidar", "train_seeds": "3-5,9"})
    from vg_ros.registration.evaluate import trained_seeds
    assert trained_seeds(str(path)) == {3, 4, 5, 9} and trained_seeds("none") == set()
    loaded = load_network(path, RegistrationConfig.preset("lidar"), torch.device("cpu"))
    assert loaded.dims.num_layers == 2 and loaded.dims.feature_dim == 16  # dims come from the file
    from vg_ros.registration.model import spatial_compatibility
    src = torch.as_tensor(sets[0]["src"][None], dtype=torch.float32)
    dst = torch.as_tensor(sets[0]["dst"][None], dtype=torch.float32)
    beta = spatial_compatibility(src, dst, cfg.tau)
    with torch.no_grad():
        a, b = net(src, dst, beta)["logits"], loaded(src, dst, beta)["logits"]
    assert torch.equal(a, b)
    probs = torch.sigmoid(a[0]).numpy()
    labels = sets[0]["labels"].astype(bool)
    assert probs[labels].mean() > probs[~labels].mean() + 0.3


def test_train_cli_end_to_end_writes_weights_that_eval_refuses_to_score_on_their_seeds(tmp_path, monkeypatch,
                                                                                       capsys):
    """`vg-ros train registration` through its command line (a local import once broke every run of it):
    weights with `train_seeds` and a card; eval then refuses those seeds. Bad numbers, held-out seeds and an
    --out that is a file are refused before any work."""
    from vg_ros.registration import train as reg_train
    monkeypatch.setattr(reg_train, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "run"
    assert vg_main(["train", "registration", "--seeds", "0", "--steps", "3", "--out", str(out)]) == 0
    weights = out / "registration_vbreg.safetensors"
    assert weights.is_file() and (out / "registration_vbreg.md").is_file()
    capsys.readouterr()
    assert vg_main(["eval", "registration", "--weights", str(weights), "--seeds", "0"]) == 2
    assert "trained on it" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    for argv, needle in ((["--lr", "nan"], "--lr nan"), (["--lr", "0"], "--lr 0.0"), (["--batch", "0"], "--batch 0"),
                         (["--size", "0"], "--size 0"), (["--seeds", "9500"], "held-out evaluation seeds"),
                         (["--out", str(tmp_path / "file")], "a file, not a folder")):
        assert vg_main(["train", "registration", "--steps", "3", "--out", str(out), *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    # Ctrl-C (a real SIGINT, sent during the second step) ends the run after that step: weights so far,
    # marked partial, the card of the earlier weights removed, exit 130
    import signal

    from signal_helpers import sigint_on_call
    monkeypatch.setattr(reg_train, "elbo_loss", sigint_on_call(reg_train.elbo_loss, 2))
    before = signal.getsignal(signal.SIGINT)
    assert vg_main(["train", "registration", "--seeds", "0", "--steps", "50", "--out", str(out)]) == 130
    assert "stopped by signal 2 at step 2 of 50" in capsys.readouterr().out
    from vg_ros.checkpoint import read_state
    _, meta = read_state(weights, "preset", "registration")
    assert meta["steps"] == "2" and meta["partial"] == "true" and not (out / "registration_vbreg.md").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_model_card_seed_ranges():
    from vg_ros.sim.seeds import format_seeds, parse_seeds
    assert format_seeds(range(96)) == "0-95"
    assert format_seeds([8, 7, 0, 1, 2, 5]) == "0-2, 5, 7-8"
    assert parse_seeds(format_seeds([8, 7, 0, 1, 2, 5])) == [0, 1, 2, 5, 7, 8]
    assert format_seeds([]) == "none"


def test_missing_weights_is_a_clear_error(tmp_path):
    from vg_ros.registration.pipeline import RegistrationPipeline
    with pytest.raises(ValueError, match="does not exist"):
        RegistrationPipeline(weights=tmp_path / "none.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RegistrationPipeline(weights=corrupt)


def test_train_cli_on_user_3dmatch_layout(shared_data, tmp_path, capsys):
    folder = shared_data / "registration" / "3dmatch_redkitchen_0_4"
    code = vg_main(["train", "registration", "--preset", "indoor", "--data", str(folder), "--no-sim",
                    "--steps", "2", "--out", str(tmp_path)])
    assert code == 0
    assert "1 correspondence sets" in capsys.readouterr().out
    card = (tmp_path / "registration_vbreg.md").read_text()
    assert "3dmatch data" in card and "steps" in card and "command" in card
    from vg_ros.registration.pipeline import RegistrationPipeline
    RegistrationPipeline(weights=tmp_path / "registration_vbreg.safetensors")  # loads


def test_kitti_layout_pairs(tmp_path):
    from vg_ros.geometry import invert_T, make_T, rpy_to_R
    from vg_ros.registration.train import kitti_pairs
    (tmp_path / "velodyne").mkdir()
    rng = np.random.default_rng(0)
    Tr = make_T(rpy_to_R(-np.pi / 2, 0, -np.pi / 2), [0.1, -0.05, -0.3])  # velodyne -> camera
    poses_cam = [make_T(rpy_to_R(0, 0.05 * k, 0), [0, 0, 2.0 * k]) for k in range(3)]
    base = rng.normal(size=(100, 3)) * 10
    lines = []
    for k, P in enumerate(poses_cam):
        T_world_velo = invert_T(Tr) @ P @ Tr
        pts = (base - T_world_velo[:3, 3]) @ T_world_velo[:3, :3]  # world points seen from scan k
        np.c_[pts, np.zeros(100)].astype(np.float32).tofile(tmp_path / "velodyne" / f"{k:06d}.bin")
        lines.append(" ".join(f"{v:.9f}" for v in P[:3].reshape(-1)))
    (tmp_path / "poses.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "calib.txt").write_text("Tr: " + " ".join(f"{v:.9f}" for v in Tr[:3].reshape(-1)) + "\n")
    pairs = kitti_pairs(tmp_path, every=2)
    assert len(pairs) == 1
    p = pairs[0]
    moved = p.src @ p.T_gt[:3, :3].T + p.T_gt[:3, 3]
    assert np.allclose(moved, p.dst, atol=1e-3)


def test_odometry_cli_on_simulated_bag_with_ground_truth(tmp_path, capsys):
    bag = tmp_path / "drive.mcap"
    assert vg_main(["sim", "--seed", "5", "--seconds", "1.5", "--out", str(bag)]) == 0
    capsys.readouterr()
    code = vg_main(["odometry", str(bag), "--topic", "/lidar/points", "--rig", "default", "--json", "--weights", "none"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["scans"] == 15 and out["converged"] == 15 and out["gt_matched"] == 15
    assert out["ate_m"] < 0.05 and out["drift_percent"] < 1.0 and out["hz"] > 1.0
    # the covariances against the ground truth, at the default scale: no planar axis badly overconfident,
    # none absurdly conservative (the first scan has no motion: 14 steps)
    check = out["covariance_check"]
    assert check["steps"] == 14 and check["covariance_scale"] == 1.5
    for axis in ("x", "y", "yaw"):
        assert 0.02 < check["z_median"][axis] < 1.5 and check["z_p90"][axis] < 3.0, (axis, check)
    assert check["covariance_prior_deviation"] == 0.3
    # without --rig the LiDAR's mounting comes from the bag's /tf_static, as the node takes it (it was
    # identity: 18x the drift on a 6 s drive, and a covariance scale suggested 9x too high)
    assert out["extrinsics"] == "the bag's /tf_static (base_link <- lidar_top)"   # TF first, as the node
    from vg_ros.bag import BagReader, BagWriter
    clouds_only = tmp_path / "clouds.mcap"   # no /tf_static: the default rig names the frame
    with BagReader(bag) as src, BagWriter(clouds_only) as dst:
        for topic, _, log_ns, msg in src.messages(["/lidar/points", "/gt/ego_pose"]):
            dst.write(topic, log_ns, msg)
    assert vg_main(["odometry", str(clouds_only), "--topic", "/lidar/points", "--json", "--weights", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["extrinsics"] == "rig 'default' (base_link <- lidar_top)"
    assert plain["ate_m"] == pytest.approx(out["ate_m"], abs=1e-9)
    # the covariance parameters to calibrate with: the check reads what was asked; a bad value, one line
    argv = ["odometry", str(bag), "--topic", "/lidar/points", "--json", "--weights", "none"]
    assert vg_main(argv + ["--covariance-scale", "3", "--covariance-prior-deviation", "0"]) == 0
    tried = json.loads(capsys.readouterr().out)["covariance_check"]
    assert tried["covariance_scale"] == 3.0 and tried["covariance_prior_deviation"] == 0.0
    assert all(tried["z_p90"][a] < check["z_p90"][a] * 3.0 / 1.5 for a in ("x", "y", "yaw"))
    assert vg_main(argv + ["--covariance-scale", "-1"]) == 2 and "covariance_scale" in capsys.readouterr().err
    # a /tf_static to another body frame: --base-frame names it; without, the chain is missing and said so
    from vg_ros.convert import matrix_to_transform_stamped, structured_to_pointcloud2
    from vg_ros.bag import typestore
    from vg_ros.geometry import make_T
    footprint = tmp_path / "footprint.mcap"
    TFMessage = typestore().types["tf2_msgs/msg/TFMessage"]
    T_mount = make_T(None, [0.1, 0.0, 1.9])
    with BagReader(bag) as src, BagWriter(footprint) as dst:
        dst.add_topic("/tf_static", "tf2_msgs/msg/TFMessage", latched=True)
        dst.write("/tf_static", src.start_ns - 1, TFMessage(transforms=[
            matrix_to_transform_stamped(T_mount, 0, "base_footprint", "lidar_top", flavor="rosbags")]))
        bad = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4")])   # a first cloud without z: one failure
        dst.write("/lidar/points", src.start_ns - 1, structured_to_pointcloud2(bad, stamp_ns=src.start_ns - 1,
                                                                               frame_id="lidar_top", flavor="rosbags"))
        for topic, _, log_ns, msg in src.messages(["/lidar/points"]):
            dst.write(topic, log_ns, msg)
    argv = ["odometry", str(footprint), "--topic", "/lidar/points", "--json", "--weights", "none"]
    assert vg_main(argv + ["--base-frame", "base_footprint"]) == 0
    mounted = json.loads(capsys.readouterr().out)
    assert mounted["extrinsics"] == "the bag's /tf_static (base_footprint <- lidar_top)"
    assert mounted["scans"] == 15 and mounted["converged"] == 15 and "'z'" in mounted["first_failures"][0]
    assert vg_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["extrinsics"] == "rig 'default' (base_link <- lidar_top)"
    # a topic of another type, a ground-truth topic asked for by name that is absent, a scan limit under 1:
    # one line, exit 2; the default ground truth absent: scored nothing, said so
    assert vg_main(["odometry", str(bag), "--topic", "/cameras/CAM_BACK/image_raw"]) == 2
    assert "is sensor_msgs/msg/Image, not sensor_msgs/PointCloud2 (clouds in this bag: ['/gt/lidar_labels', '/lidar/points'])" \
        in capsys.readouterr().err
    assert vg_main(["odometry", str(bag), "--topic", "/lidar/points", "--gt-topic", "/gt/typo"]) == 2
    assert "ground-truth topic '/gt/typo' not in bag" in capsys.readouterr().err
    assert vg_main(["odometry", str(bag), "--topic", "/lidar/points", "--max-scans", "0"]) == 2
    assert "--max-scans 0: must be >= 1" in capsys.readouterr().err


def test_eval_full_scores_and_flags_wrong_but_converged():
    """score_full: RR, the converged split (a wrong pose reported as converged is counted apart) and the
    failure list, on a street scene moved by a known pose and the same scene against a far-away copy of
    itself with a wrong ground truth."""
    from vg_ros.geometry import make_T, rpy_to_R
    from vg_ros.registration.evaluate import format_report, score_full
    from vg_ros.registration.pipeline import RegistrationConfig, RegistrationPipeline
    from vg_ros.registration.train import CloudPair
    from test_registration_verify import street_scene

    src = street_scene()
    T = make_T(rpy_to_R(0.0, 0.0, np.radians(40.0)), [3.0, 1.0, 0.0])
    dst = src @ T[:3, :3].T + T[:3, 3]
    pipe = RegistrationPipeline(RegistrationConfig.preset("lidar"), weights=None)
    pairs = [CloudPair("street_0_3", src, dst, T), CloudPair("street_1_12", src, dst, make_T(t=[30.0, 0.0, 0.0]))]
    out = score_full(pipe, pairs, 5.0, 0.6)
    assert out["pairs"] == 2 and out["rr"] == 0.5 and out["rr_skip_1_9"] == 1.0 and out["rr_skip_10_99"] == 0.0
    assert out["converged_rate"] == 1.0 and out["wrong_but_converged"] == 1 and out["right_not_converged"] == 0
    assert len(out["failures"]) == 1 and out["failures"][0].startswith("street_1_12") and "converged" in out["failures"][0]
    report = {"seeds": [0], "preset": "lidar", "thresholds": {"re_deg": 5.0, "te_m": 0.6}, "mode": "full pipeline",
              "overrides": {"bev_candidates": 0}, "trained": out, "compatibility_only": out}
    text = format_report(report)
    assert "bev_candidates=0" in text and "wrong_but_converged" in text


def test_eval_refuses_the_seeds_the_weights_were_trained_on(capsys):
    """As eval occupancy and eval grounding: a training seed is no held-out score. The shipped file predates
    the `train_seeds` key and was trained on the default seeds."""
    assert vg_main(["eval", "registration", "--seeds", "0", "9500"]) == 2
    assert "--seeds [0]: the weights were trained on it" in capsys.readouterr().err


def test_eval_set_option_is_checked(capsys):
    assert vg_main(["eval", "registration", "--seeds", "9500", "--set", "bev_candidates"]) == 2
    assert "PARAM=VALUE" in capsys.readouterr().err
    assert vg_main(["eval", "registration", "--seeds", "9500", "--set", "no_such_parameter=1"]) == 2
    assert "unknown parameter" in capsys.readouterr().err


def test_covariance_check_of_honest_covariances_reads_honest():
    """Synthetic steps whose errors are Gaussian with exactly the claimed deviations: |z| has the
    Gaussian's median (0.67) and 90th percentile (1.64) on the noisy axes, and the suggested scale is the
    one in use."""
    from vg_ros.geometry import make_T, rpy_to_R
    from vg_ros.registration.cli import covariance_check
    rng = np.random.default_rng(0)
    n, dt, scale = 4000, 0.1, 3.0
    sigma = np.array([0.02, 0.01, 0.005, 1e-3, 1e-3, 0.004])   # x, y, z (m), roll, pitch, yaw (rad) per step
    stamps = [int(1e9 + k * dt * 1e9) for k in range(n)]
    G = np.stack([make_T(None, [1.0 * k, 0.0, 0.0]) for k in range(n)])
    E, yaw = [np.eye(4)], 0.0
    for k in range(1, n):   # each step: the true 1 m forward plus noise in its own frame; yaw noise only
        yaw += rng.normal(0.0, sigma[5])
        R = rpy_to_R(0.0, 0.0, yaw)
        E.append(make_T(R, E[-1][:3, 3] + R @ (np.array([1.0, 0, 0]) + rng.normal(0.0, sigma[:3]))))
    E = np.stack(E)
    cov = {s: np.diag((sigma / dt) ** 2) for s in stamps[1:]}   # twist covariance: per second
    check = covariance_check(stamps, cov, E, G, scale)
    assert check["steps"] == n - 1
    for axis in ("x", "y", "z", "yaw"):
        assert check["z_median"][axis] == pytest.approx(0.674, abs=0.05), axis
        assert check["z_p90"][axis] == pytest.approx(1.645, abs=0.1), axis
        assert check["rms_error_over_claimed"][axis] == pytest.approx(1.0, abs=0.05), axis
    assert check["z_median"]["roll"] < 1e-6   # no error there at all


def test_truncated_ply_and_pcd_are_bad_files_not_clouds_padded_with_zeros(tmp_path, capsys):
    # Open3D warns on a .ply / .pcd shorter than its header, then returns the declared number of points with the
    # missing ones at the origin: `vg-ros register` exited 0 on half a file
    import open3d as o3d
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.default_rng(0).uniform(-5, 5, (2000, 3))))
    for name, ascii_ in (("b.ply", False), ("a.ply", True), ("b.pcd", False), ("a.pcd", True)):
        whole = tmp_path / name
        o3d.io.write_point_cloud(str(whole), cloud, write_ascii=ascii_)
        assert read_cloud(whole).shape == (2000, 3)
        half = tmp_path / ("half_" + name)
        data = whole.read_bytes()
        half.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated: the header declares 2000 points"):
            read_cloud(half)
    code = vg_main(["register", str(tmp_path / "half_b.ply"), str(tmp_path / "b.ply"), "--weights", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "half_b.ply: truncated" in err and "Traceback" not in err


def test_train_cli_bad_user_data_is_one_line(tmp_path, monkeypatch, capsys):
    """A KITTI folder without poses.txt, a gt.log with a non-number, a cloud that is no cloud, --threads 0,
    a negative seed, an --out that cannot be made: exit 2 and one line (were tracebacks, exit 1; the --out
    one after the whole training)."""
    from vg_ros.registration import train as reg_train
    monkeypatch.setattr(reg_train, "CACHE_DIR", tmp_path / "cache")
    kitti = tmp_path / "kitti"
    (kitti / "velodyne").mkdir(parents=True)
    tdm = tmp_path / "tdm"
    tdm.mkdir()
    (tdm / "gt.log").write_text("0 1 2\n1 0 0 0\n0 1 0 0\n0 0 1 x\n0 0 0 1\n")
    bad_cloud = tmp_path / "badcloud"
    bad_cloud.mkdir()
    (bad_cloud / "gt.log").write_text("0 1 2\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    for i in range(2):
        (bad_cloud / f"cloud_bin_{i}.ply").write_text("ply\nformat ascii 1.0\nelement vertex 100\n")
    (tmp_path / "afile").write_text("")
    base = ["train", "registration", "--steps", "1", "--out", str(tmp_path / "out")]
    for extra, words in ((["--no-sim", "--data", str(kitti)], "poses.txt"), (["--no-sim", "--data", str(tdm)], "'x'"),
                         (["--no-sim", "--data", str(bad_cloud)], "cloud_bin_"), (["--threads", "0"], "--threads"),
                         (["--seeds", "-3"], "--seeds"),
                         (["--seeds", "5", "--out", str(tmp_path / "afile" / "sub")], "--out")):
        assert vg_main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_train_cli_user_data_fixed_in_place_is_read_again(tmp_path, monkeypatch, capsys):
    """The user-data cache was keyed by the folder's path alone: a folder whose gt.log was fixed (or whose
    clouds were replaced) went on answering "no pairs found" (or training on the old sets) for ever."""
    from vg_ros.registration import train as reg_train
    monkeypatch.setattr(reg_train, "CACHE_DIR", tmp_path / "cache")
    folder = tmp_path / "tdm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pts = rng.uniform(-5, 5, (3000, 3))
        header = f"ply\nformat ascii 1.0\nelement vertex {len(pts)}\nproperty float x\nproperty float y\n" \
                 "property float z\nend_header\n"
        (folder / f"cloud_bin_{i}.ply").write_text(header + "\n".join("%f %f %f" % tuple(p) for p in pts) + "\n")
    (folder / "gt.log").write_text("garbage\n")
    args = ["train", "registration", "--no-sim", "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "out")]
    assert vg_main(args) == 2
    assert "no pairs found" in capsys.readouterr().err
    (folder / "gt.log").write_text("0 1 2\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    assert vg_main(args) == 0
    assert "1 correspondence sets" in capsys.readouterr().out


def test_odometry_cli_leaves_out_a_nan_ground_truth_pose_and_says_so(tmp_path, capsys):
    """One /gt/ego_pose with a NaN position: that pose is counted and not scored, the rest is (before: exit 2,
    `position: not finite`, after registering every scan)."""
    import dataclasses

    from vg_ros.bag import BagReader, BagWriter
    bag = tmp_path / "drive.mcap"
    assert vg_main(["sim", "--seed", "5", "--seconds", "1", "--out", str(bag)]) == 0
    hostile = tmp_path / "nan_gt.mcap"
    with BagReader(bag) as src, BagWriter(hostile) as dst:
        for k, (topic, _, log_ns, msg) in enumerate(src.messages(["/lidar/points", "/gt/ego_pose", "/tf_static"])):
            if topic == "/gt/ego_pose" and k == 6:
                msg = dataclasses.replace(msg, pose=dataclasses.replace(msg.pose, position=dataclasses.replace(
                    msg.pose.position, x=float("nan"))))
            dst.write(topic, log_ns, msg)
    capsys.readouterr()
    assert vg_main(["odometry", str(hostile), "--topic", "/lidar/points", "--json", "--weights", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gt_malformed"] == 1 and "not finite" in out["first_gt_malformed"][0]
    assert out["gt_matched"] == out["converged"] - 1 == 9 and out["ate_m"] < 0.05
