"""The `vg-ros` dispatcher: help, unknown commands, and one-line errors instead of tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vg_ros.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_answers_help(capsys):
    """README: every command's --help prints its usage and exits 0 (bench said "choose one of")."""
    for name in ("train", "eval", "bench"):
        assert main([name, "--help"]) == 0, name
        assert capsys.readouterr().out.startswith(f"usage: vg-ros {name} "), name


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_train_unknown_model_is_one_line(capsys):
    assert main(["train", "teleportation"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'teleportation'" in err and "Traceback" not in err


def test_every_command_module_exists():
    import importlib
    for name, (target, _) in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "vg_ros.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: vg-ros" in proc.stdout


def test_doctor_passes_here_and_names_a_broken_checkpoint(tmp_path):
    """`vg-ros doctor --json` on this machine (the suite's own DDS domain): every check passes, the
    pipelines included; a corrupt checkpoint or one without its card fails, named, with the fix."""
    import json
    import os
    from pathlib import Path

    from vg_ros.doctor import FAIL, OK, check_weights
    run = subprocess.run([sys.executable, "-m", "vg_ros.cli", "doctor", "--json"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    report = json.loads(run.stdout)
    assert run.returncode == 0 and report["ok"], run.stdout + run.stderr
    names = [c["name"] for c in report["checks"]]
    assert names == ["python", "torch", "rclpy", "dds environment", "dds loopback", "shared memory",
                     "optional ROS pieces", "point-cloud libraries", "parameters file", "checkpoints", "pipelines"]
    assert all(c["status"] == OK for c in report["checks"]), report
    shipped = Path(__file__).resolve().parent.parent / "vg_ros" / "weights" / "registration_vbreg.safetensors"
    (tmp_path / "good.safetensors").write_bytes(shipped.read_bytes())
    (tmp_path / "good.md").write_text("card")
    (tmp_path / "cut.safetensors").write_bytes(shipped.read_bytes()[:500])
    (tmp_path / "cut.md").write_text("card")
    (tmp_path / "orphan.safetensors").write_bytes(shipped.read_bytes())
    check = check_weights(tmp_path)
    assert check.status == FAIL and "cut.safetensors unreadable" in check.detail
    assert "orphan.safetensors has no model card" in check.detail and "good" not in check.detail and check.fix
    bad = subprocess.run([sys.executable, "-m", "vg_ros.cli", "doctor", "--skip-models", "--config",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "[FAIL] parameters file" in bad.stdout and "1 failed: parameters file" in bad.stdout


def test_a_misspelt_node_section_is_named_by_doctor(tmp_path):
    """`registraton_node:` in a params file leaves the registration node on its defaults without a word
    from the node (it reads its own section only): doctor fails the file, naming the section; `vg-ros up`
    warns (the same `unknown_sections`); sections under a namespace and `/**` are known."""
    from vg_ros.config import default_config_path, unknown_sections
    from vg_ros.doctor import FAIL, OK, check_config
    text = default_config_path().read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("registration_node:", "registraton_node:", 1))
    check = check_config(typo)
    assert check.status == FAIL and "['registraton_node'] match no node" in check.detail
    spaced = tmp_path / "spaced.yaml"
    spaced.write_text(text + "\n/robot1/grounding_node:\n  ros__parameters: {}\n/**:\n  ros__parameters: {}\n")
    assert unknown_sections(spaced) == [] and check_config(spaced).status == OK


def test_doctor_says_which_dds_transport_settings_apply(monkeypatch, tmp_path):
    """Under LOCALHOST discovery rmw_fastrtps adds its own transports (measured: a UDP-only profile still
    maps shared memory; the shipped one maps its 4 MB segment beside the rmw's), so the check says a
    profile's transports go beside the rmw's; with SUBNET it says nothing of it. The shared-memory check
    warns where /dev/shm has no room for the segments."""
    from vg_ros import doctor, ros_compat
    monkeypatch.delenv("RMW_IMPLEMENTATION", raising=False)
    monkeypatch.setenv("ROS_DOMAIN_ID", "7")
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    local = doctor.check_dds_environment()
    assert local.status == doctor.OK and "discovery LOCALHOST" in local.detail and "go beside" in local.detail
    assert (ros_compat.use_dds_profiles(dict(os.environ)) or "none") in local.detail
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET")
    assert "go beside" not in doctor.check_dds_environment().detail
    assert doctor.check_shared_memory().status == doctor.OK            # this machine's /dev/shm has room
    assert doctor.profile_segment_mb(str(ros_compat.DDS_PROFILES)) == 4.0   # read from the shipped profile
    assert doctor.profile_segment_mb(str(tmp_path / "none.xml")) == doctor.SHM_DEFAULT_MB
    statvfs = os.statvfs
    monkeypatch.setattr(doctor.os, "statvfs", lambda path: type("S", (), {"f_bavail": 16, "f_frsize": 2**20})())
    small = doctor.check_shared_memory()
    assert small.status == doctor.WARN and "16 MB free" in small.detail and "--shm-size" in small.fix
    monkeypatch.setattr(doctor.os, "statvfs", statvfs)
    assert doctor.check_shared_memory(str(tmp_path / "none")).status == doctor.WARN
    monkeypatch.setenv("RMW_IMPLEMENTATION", "rmw_cyclonedds_cpp")
    assert "Fast DDS" not in doctor.check_dds_environment().detail


def test_doctor_reports_a_check_that_raises_under_its_own_name(monkeypatch):
    from vg_ros import doctor

    def broken():
        raise RuntimeError("no such interface")
    monkeypatch.setattr(doctor, "check_dds_loopback", broken)
    checks = doctor.run_checks(models=False)
    loopback = next(c for c in checks if c.name == "dds loopback")
    assert loopback.status == doctor.FAIL and "raised RuntimeError: no such interface" in loopback.detail
    assert [c.name for c in checks][-1] == "checkpoints"


def test_run_script_takes_paths_from_the_callers_directory(tmp_path):
    """`./run info drive.mcap` from the folder holding the bag (./run changes into the checkout to find its
    virtualenv; the command's relative paths were then the checkout's: 'no such file')."""
    from vg_ros.bag import BagWriter, typestore
    repo = Path(__file__).resolve().parent.parent
    with BagWriter(tmp_path / "drive.mcap") as bag:
        bag.write("/command", 1, typestore().types["std_msgs/msg/String"](data="the bus"))
    run = subprocess.run([str(repo / "run"), "info", "drive.mcap"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "bag:      drive.mcap" in run.stdout and "/command" in run.stdout


def _code(argv: list[str]) -> int:
    """main's exit code, an argparse error (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_bad_numbers_to_train_eval_and_bench_are_one_line(tmp_path, capsys):
    """Each was a traceback (exit 1) or, for eval occupancy --seconds 0, exit 0 with nothing scored; all are
    refused before any rendering or training."""
    cases = [
        ["train", "occupancy", "--threads", "-1"], ["train", "occupancy", "--every", "0"],
        ["train", "occupancy", "--seconds", "nan"],
        ["eval", "occupancy", "--threads", "0"], ["eval", "occupancy", "--seconds", "0"],
        ["eval", "occupancy", "--every", "0"],
        ["train", "grounding", "--seconds", "0"], ["train", "grounding", "--seconds", "nan"],
        ["train", "grounding", "--expressions", "0"], ["train", "grounding", "--val-seconds", "-1"],
        ["train", "grounding", "--monitor-every", "-5"],
        ["eval", "grounding", "--json", str(tmp_path / "no" / "such" / "x.json")],
        ["eval", "grounding", "--json", str(tmp_path)],
        ["bench", "grounding", "--cases", "tiny"], ["bench", "grounding", "--cases", "tiny@17x33"],
        ["bench", "grounding", "--cases", "huge@224x224"], ["bench", "grounding", "--frames", "0"],
        ["bench", "occupancy", "--threads", "0"], ["bench", "registration", "--skip-pairs", "--odometry-seconds", "0"],
        ["bench", "sim", "--rig", "no_such_rig"],
    ]
    for argv in cases:
        assert _code(argv) == 2, argv
        err = capsys.readouterr().err
        # one error line (argparse's own errors print the usage above it)
        assert "Traceback" not in err and "error: " in err.strip().splitlines()[-1], (argv, err)
        assert sum("error" in line for line in err.splitlines()) == 1, (argv, err)


def test_seed_ranges_beyond_a_million_and_bad_weights_are_one_line(tmp_path, capsys):
    """`--seeds 0-99999999999` built the whole list (memory, then a hang); a negative KL weight trained the wrong
    way; a training state that is a folder was reported as missing."""
    from vg_ros.checkpoint import read_training_state
    from vg_ros.sim.seeds import MAX_SEEDS, parse_seeds
    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    with pytest.raises(ValueError, match="more than"):
        parse_seeds("0-99999999999")
    with pytest.raises(ValueError, match="more than"):
        parse_seeds(f"0-{MAX_SEEDS - 1},{MAX_SEEDS + 5}")
    with pytest.raises(ValueError, match="is a folder"):
        read_training_state(tmp_path)
    assert _code(["train", "registration", "--kl-weight", "-1", "--out", str(tmp_path / "w")]) == 2
    assert "--kl-weight -1.0: must be a finite number >= 0" in capsys.readouterr().err
