"""vg_ros.checkpoint: the safetensors round trip and every unusable-file case as one ValueError naming the file."""
import json

import pytest
import torch
from torch import nn

from vg_ros.checkpoint import load_into, read_state, save_state


def _model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width))


def test_round_trip_keeps_tensors_buffers_and_metadata(tmp_path):
    model = _model()
    model[1].running_mean.fill_(0.5)  # buffers travel too
    save_state(model, tmp_path / "sub" / "w.safetensors", {"spec": json.dumps({"width": 4}), "steps": 12})
    state, meta = read_state(tmp_path / "sub" / "w.safetensors", "spec", "toy")
    assert meta["steps"] == "12" and json.loads(meta["spec"]) == {"width": 4}
    fresh = _model()
    fresh[1].running_mean.zero_()
    load_into(fresh, state, "w", "toy")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\xff" * 64])
def test_unreadable_files_are_value_errors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors.*not a readable safetensors"):
        read_state(path, "spec", "toy")


def test_truncated_file_is_a_value_error(tmp_path):
    save_state(_model(), tmp_path / "w.safetensors", {"spec": "{}"})
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="cut.safetensors"):
        read_state(tmp_path / "cut.safetensors", "spec", "toy")


def test_missing_file_and_foreign_metadata(tmp_path):
    with pytest.raises(ValueError, match="toy weights: .*missing.safetensors does not exist.*vg-ros train toy"):
        read_state(tmp_path / "missing.safetensors", "spec", "toy")
    save_state(_model(), tmp_path / "w.safetensors", {"other": 1})
    with pytest.raises(ValueError, match="no `spec` metadata"):
        read_state(tmp_path / "w.safetensors", "spec", "toy")


def test_non_finite_weights_and_a_folder_are_refused(tmp_path):
    """A diverged run's NaN weights would give NaN boxes and poses (and JSON no parser reads): refused, naming
    the tensor; a folder given as the file is named as such."""
    from safetensors.torch import save_file
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    state["0.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata={"spec": "{}"})   # not through save_state
    with pytest.raises(ValueError, match=r"nan.safetensors: tensor 0.weight holds NaN or inf"):
        read_state(tmp_path / "nan.safetensors", "spec", "toy")
    with pytest.raises(ValueError, match="is a directory"):
        read_state(tmp_path, "spec", "toy")


def test_a_diverged_network_is_never_written(tmp_path):
    """save_state refuses NaN weights, so a training run at a runaway learning rate cannot overwrite good
    (perhaps the shipped) weights with unusable ones."""
    save_state(_model(), tmp_path / "w.safetensors", {"spec": "{}"})
    before = (tmp_path / "w.safetensors").read_bytes()
    model = _model()
    with torch.no_grad():
        model[0].bias.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"not writing .*w.safetensors: tensor 0.bias holds NaN or inf"):
        save_state(model, tmp_path / "w.safetensors", {"spec": "{}"})
    assert (tmp_path / "w.safetensors").read_bytes() == before


def test_another_architecture_is_refused(tmp_path):
    save_state(_model(width=4), tmp_path / "w.safetensors", {"spec": "{}"})
    state, _ = read_state(tmp_path / "w.safetensors", "spec", "toy")
    with pytest.raises(ValueError, match="do not match the model"):
        load_into(_model(width=5), state, tmp_path / "w.safetensors", "toy")
    with pytest.raises(ValueError, match="missing"):
        load_into(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), state, "w", "toy")


def test_another_size_is_one_line_naming_the_first_mismatch(tmp_path):
    """torch lists every mismatched tensor on a line of its own: `vg-ros train occupancy --config base --init`
    of the tiny weights printed a 154-line error."""
    save_state(_model(width=4), tmp_path / "w.safetensors", {"spec": "{}"})
    state, _ = read_state(tmp_path / "w.safetensors", "spec", "toy")
    with pytest.raises(ValueError) as info:
        load_into(_model(width=5), state, tmp_path / "w.safetensors", "toy")
    message = str(info.value)
    assert "\n" not in message and "size mismatch for 0.weight" in message and "more)" in message
