"""TPVFormer parts: fast deformable sampling vs the slow reference, image cross-attention camera skipping,
decoder point/voxel agreement, the Lovasz-softmax loss, configs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vg_ros.geometry import invert_T
from vg_ros.occupancy.deformable import MSDeformAttention, ms_deform_sample, ms_deform_sample_reference
from vg_ros.occupancy.model import (MODEL_CONFIGS, TPVConfig, TPVFormer, lovasz_softmax, model_config,
                                    occupancy_loss, plane_locations, plane_pillars)
from vg_ros.types import Rig

torch.set_num_threads(1)

MICRO = TPVConfig(name="micro", image_size=(64, 48), backbone_channels=(8, 8, 16, 16), backbone_blocks=(1, 1, 1, 1),
                  fpn_levels=3, embed_dim=16, num_heads=2, tpv_shape=(10, 10, 4), upsample=2,
                  pillar_points=(2, 4, 4), cross_view_anchors=2, cross_view_points=2, num_hcab=1, num_hab=1)


def _random_sampling(seed: int, shapes, B=2, Q=5, M=2, D=3, P=3):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    # Locations spill past the borders so zero padding is exercised too.
    locations = torch.rand(B, Q, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, len(shapes), P, generator=g, dtype=torch.float64)
    return value, locations, weights


@pytest.mark.parametrize("shapes", [[(4, 6)], [(5, 7), (3, 4), (1, 2)], [(8, 8), (4, 4), (2, 2), (1, 1)]])
def test_fast_deformable_sampling_matches_reference(shapes):
    value, locations, weights = _random_sampling(len(shapes), shapes)
    fast = ms_deform_sample(value, shapes, locations, weights)
    slow = ms_deform_sample_reference(value, shapes, locations, weights)
    assert fast.shape == (2, 5, 6)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def test_sampling_at_pixel_centre_reads_that_pixel():
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)  # one 3x4 level, value = row * 4 + col
    loc = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    out = ms_deform_sample(value, [(3, 4)], loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
    assert out.item() == pytest.approx(1 * 4 + 2)


def test_ms_deform_sample_rejects_mismatched_levels():
    value, locations, weights = _random_sampling(0, [(4, 6)])
    with pytest.raises(ValueError, match="does not match levels"):
        ms_deform_sample(value, [(4, 5)], locations, weights)


def test_deform_attention_module_shapes_and_anchor_check():
    attn = MSDeformAttention(16, 2, 2, 4)
    shapes = [(6, 5), (3, 3)]
    out = attn(torch.randn(2, 7, 16), torch.randn(2, 39, 16), shapes, torch.rand(2, 7, 2, 2, 2))
    assert out.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="reference_points"):
        attn(torch.randn(2, 7, 16), torch.randn(2, 39, 16), shapes, torch.rand(2, 7, 2, 3, 2))


def test_pillars_run_along_each_planes_normal():
    xy, xz, yz = plane_pillars((4, 5, 3), (2, 6, 7))
    assert xy.shape == (20, 2, 3) and xz.shape == (12, 6, 3) and yz.shape == (15, 7, 3)
    assert torch.all(xy[:, :, :2] == xy[:, :1, :2]) and torch.unique(xy[:, :, 2]).numel() == 2
    assert torch.all(xz[:, :, [0, 2]] == xz[:, :1, [0, 2]]) and torch.unique(xz[:, :, 1]).numel() == 6
    assert torch.all(yz[:, :, 1:] == yz[:, :1, 1:]) and torch.unique(yz[:, :, 0]).numel() == 7
    loc_xy, loc_xz, loc_yz = plane_locations(torch.tensor([[0.125, 0.25, 0.5]]))
    assert loc_xy.tolist() == [[0.25, 0.125]] and loc_xz.tolist() == [[0.5, 0.125]] and loc_yz.tolist() == [[0.5, 0.25]]


def _rig_inputs(cfg: TPVConfig, seed: int = 0):
    rig = Rig.load("default")
    W, H = cfg.image_size
    cams = [c.scaled(W, H) for c in rig.cameras]
    K = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)[None]
    T = torch.tensor(np.stack([invert_T(c.T_base_cam) for c in cams]), dtype=torch.float32)[None]
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (1, len(cams), 3, H, W), generator=g, dtype=torch.uint8)
    return images, K, T


def test_model_planes_and_decoder_agree_at_voxel_centres():
    torch.manual_seed(0)
    model = TPVFormer(MICRO).eval()
    images, K, T = _rig_inputs(MICRO)
    with torch.no_grad():
        planes = model(images, K, T)
        assert [tuple(p.shape) for p in planes] == [(1, 16, 10, 10), (1, 16, 10, 4), (1, 16, 10, 4)]
        voxels = model.decoder.voxel_logits(planes, x_chunk=7)
        assert voxels.shape == (1, 18, 20, 20, 8)
        idx = torch.tensor([[0, 0, 0], [19, 19, 7], [3, 11, 5], [10, 2, 1]])
        centres = (idx.float() + 0.5) / torch.tensor([20.0, 20.0, 8.0])
        points = model.decoder.point_logits(planes, centres[None])
    torch.testing.assert_close(points[0], voxels[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].T, rtol=1e-4, atol=1e-5)


def test_camera_no_pillar_reaches_is_skipped_and_order_does_not_matter():
    torch.manual_seed(1)
    model = TPVFormer(MICRO).eval()
    images, K, T = _rig_inputs(MICRO)
    # A seventh camera 1 km above the grid looking up: no pillar point projects into it.
    T_far = torch.eye(4)
    T_far[:3, :3] = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # optical z = +z of base_link (up)
    T_far[:3, 3] = torch.tensor([0.0, 0.0, -1000.0])  # base point (0, 0, 1000) -> camera origin
    images7 = torch.cat([images, images[:, :1]], 1)
    K7, T7 = torch.cat([K, K[:, :1]], 1), torch.cat([T, T_far[None, None]], 1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        base = model(images, K, T)
        with_far = model(images7, K7, T7)
        permuted = model(images[:, perm], K[:, perm], T[:, perm])
        masked = model(images7, K7, T7, cam_valid=torch.tensor([[True] * 6 + [False]]))
    for a, b, c, d in zip(base, with_far, permuted, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-5)


def test_image_content_changes_planes_only_where_cameras_look():
    torch.manual_seed(2)
    model = TPVFormer(MICRO).eval()
    images, K, T = _rig_inputs(MICRO)
    changed = images.clone()
    changed[:, 0] = 255 - changed[:, 0]  # CAM_FRONT only
    with torch.no_grad():
        delta = (model.decoder.voxel_logits(model(images, K, T)) -
                 model.decoder.voxel_logits(model(changed, K, T))).abs().amax(dim=(0, 1, 4))  # (X, Y)
    # The front camera looks along +x: the front half changes far more than the region behind the car.
    # (The side and front planes span the whole grid, so the rear still changes a little.)
    assert delta[12:, 8:12].mean() > 3 * delta[:8, 8:12].mean() + 1e-6


def test_model_rejects_wrong_input_size():
    model = TPVFormer(MICRO)
    images, K, T = _rig_inputs(MICRO)
    with pytest.raises(ValueError, match="model input is 64x48"):
        model(images[..., :40, :], K, T)


def test_lovasz_softmax_is_zero_for_perfect_and_positive_for_wrong():
    labels = torch.tensor([0, 1, 2, 2, 1, 255])
    perfect = torch.nn.functional.one_hot(labels.clamp(max=2), 3).float()
    assert lovasz_softmax(perfect, labels).item() == pytest.approx(0.0)
    wrong = torch.nn.functional.one_hot((labels.clamp(max=2) + 1) % 3, 3).float()
    assert lovasz_softmax(wrong, labels).item() == pytest.approx(1.0)
    logits = torch.randn(50, 18, requires_grad=True)
    total, parts = occupancy_loss(logits, torch.randint(0, 18, (50,)))
    total.backward()
    assert parts["ce"] > 0 and 0 < parts["lovasz"] <= 1 and logits.grad.abs().sum() > 0


def test_named_configs():
    assert set(MODEL_CONFIGS) == {"tiny", "small", "base"}
    tiny, base = model_config("tiny"), model_config("base")
    assert tiny.voxel_shape == (200, 200, 16) and tiny.grid.voxel_size == pytest.approx(0.4)
    assert base.tpv_shape == (200, 200, 16) and base.embed_dim == 128 and (base.num_hcab, base.num_hab) == (3, 2)
    assert base.pillar_points == (4, 32, 32) and base.num_heads == 8
    with pytest.raises(ValueError, match="unknown TPVFormer config"):
        model_config("huge")
    with pytest.raises(ValueError, match="embed_dim"):
        TPVConfig(embed_dim=30, num_heads=4)
