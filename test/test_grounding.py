"""VG-LAW grounding: text encoder, model (weight generation, caching, heads), losses, metrics, pipeline."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vg_ros.grounding import metrics
from vg_ros.grounding.model import (VGLAW, BoxHead, VGLAWSpec, box_loss, cxcywh_to_xyxy, dice_loss,
                                    generalized_box_iou, pooling_loss, spec_by_name, total_loss)
from vg_ros.grounding.text import MAX_TOKENS, TextEncoder, check_command
from vg_ros.types import CameraFrame, CameraModel, GroundingResult

torch.set_num_threads(1)
SMALL = VGLAWSpec(img_h=32, img_w=64, patch=16, width=32, depth=2, heads=2, groups=4, lap_dim=16, mask_dim=16)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


# -- text ---------------------------------------------------------------------------------------------------

def test_text_encoder_cls_first_capped_at_40(encoder):
    feats, valid = encoder.encode(["the red car left of the bus", "car " * 200])
    assert feats.shape == (2, MAX_TOKENS, 384) and valid.shape == (2, MAX_TOKENS)
    ids = encoder.tokenize(["the red car"])["input_ids"][0]
    assert int(ids[0]) == encoder.tokenizer.cls_token_id
    assert valid[1].all() and valid[0].sum() == 9  # [CLS] + 7 words + [SEP]
    assert torch.isfinite(feats).all()


def test_text_encoder_non_ascii_and_other_dir(encoder, tmp_path):
    feats, valid = encoder.encode(["das rote Auto links vom Bus, bitte — 車"])
    assert feats.shape[0] == 1 and valid[0, 0]
    with pytest.raises(ValueError, match="config.json"):
        TextEncoder(tmp_path)


@pytest.mark.parametrize("bad, match", [("", "empty"), ("   \n", "empty"), ("x" * 1001, "1001 characters"),
                                        ("?!. ,", "no letters"), (None, "expected str")])
def test_check_command_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        check_command(bad)


def test_check_command_normalises_whitespace():
    assert check_command("  the  red\tcar ") == "the red car"
    assert check_command("der grüne Lkw") == "der grüne Lkw"


# -- model --------------------------------------------------------------------------------------------------

def _text(batch: int, length: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, 384, generator=gen)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, length - 2:] = False
    return feats, valid


def test_spec_validation_and_configs():
    tiny = spec_by_name("tiny")
    assert tiny.grid == (11, 20) and tiny.stem == "conv" and tiny.box_reference and tiny.mask_skip and tiny.mask_refine
    base = spec_by_name("base")
    assert (base.img_h, base.img_w, base.width, base.depth) == (448, 448, 768, 12)
    assert base.stem == "patch" and not base.box_reference   # the paper's ViT-B and head
    with pytest.raises(ValueError, match="patch"):
        VGLAWSpec(img_h=30, img_w=64)
    with pytest.raises(ValueError, match="model config"):
        spec_by_name("huge")
    with pytest.raises(ValueError, match="stem"):
        VGLAWSpec(stem="resnet")
    with pytest.raises(ValueError, match="power-of-two"):
        VGLAWSpec(img_h=36, img_w=72, patch=12, stem="conv")
    with pytest.raises(ValueError, match="mask_skip"):
        VGLAWSpec(mask_skip=True)   # the skip joins read the conv stem
    with pytest.raises(ValueError, match="mask_refine"):
        VGLAWSpec(mask_refine=True)   # so does the refiner


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_stems_give_the_same_token_grid(stem):
    spec = VGLAWSpec(**{**SMALL.to_dict(), "stem": stem})
    model = VGLAW(spec).eval()
    tokens = model.patch_embed(torch.rand(2, 3, 32, 64))
    assert tokens.shape == (2, SMALL.width, 2, 4)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 64), *_text(2))
    assert out["fmap_hw"] == (2, 4) and out["pool"].shape == (2, 8)


def test_mask_skip_joins_start_at_zero_and_learn():
    """A network grown with the mask head's skip joins computes exactly what it did before; the joins get
    gradient at once and then change the mask; any other change of architecture is refused."""
    from vg_ros.grounding.model import total_loss
    torch.manual_seed(4)
    plain = VGLAW(VGLAWSpec(**{**SMALL.to_dict(), "stem": "conv"})).eval()
    grown = VGLAW.grown_from(plain, VGLAWSpec(**{**SMALL.to_dict(), "stem": "conv", "mask_skip": True})).eval()
    _, maps = grown.patch_embed(torch.rand(1, 3, 32, 64), skips=(8, 4))
    assert maps[8].shape[-2:] == (4, 8) and maps[4].shape[-2:] == (8, 16)
    images, text = torch.rand(2, 3, 32, 64), _text(2)
    with torch.no_grad():
        a, b = plain(images, *text), grown(images, *text)
    assert torch.equal(a["mask_logits"], b["mask_logits"]) and torch.equal(a["boxes"], b["boxes"])
    grown.train()
    out = grown(images, *text)
    masks = torch.zeros(2, 32, 64)
    masks[:, 8:20, 10:30] = 1
    total_loss(out, torch.tensor([[0.3, 0.4, 0.3, 0.4]] * 2), masks)["total"].backward()
    assert grown.mask_head.skip8.weight.grad.abs().sum() > 0
    assert grown.mask_head.skip4[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="more than added blocks"):
        VGLAW.grown_from(plain, VGLAWSpec(**{**SMALL.to_dict(), "stem": "conv", "mask_skip": True, "width": 64}))


def test_added_blocks_start_as_identity_and_learn():
    """A network grown by two ViT blocks computes exactly what it did, through the batched forward and the
    per-command merged path alike; the new blocks' output layers get gradient at once, and after one step
    the new blocks and their language-adaptive weights change the output. Fewer blocks, or a different
    width, are refused; `train.continued` keeps --init's blocks unless a larger depth is asked for."""
    from vg_ros.grounding.model import total_loss
    from vg_ros.grounding.train import continued
    torch.manual_seed(5)
    plain = VGLAW(SMALL).eval()
    for p in plain.weight_generator.phi.parameters():   # a trained network's Phi is not zero
        torch.nn.init.normal_(p, std=0.02)
    grown = VGLAW.grown_from(plain, dataclasses.replace(SMALL, depth=4)).eval()
    assert len(grown.blocks) == 4 and grown.weight_generator.layer_queries.shape[0] == 4
    images, text = torch.rand(2, 3, 32, 64), _text(2)
    with torch.no_grad():
        a, b = plain(images, *text), grown(images, *text)
        # the same numbers up to float rounding (the generator's per-layer einsum blocks differently)
        assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-6)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-6)
        one = tuple(t[:1] for t in text)
        merged_plain = plain.forward_visual(images[:1], plain.merge(plain.generate(*one)))
        merged_grown = grown.forward_visual(images[:1], grown.merge(grown.generate(*one)))
        assert torch.allclose(merged_plain["mask_logits"], merged_grown["mask_logits"], atol=1e-5)
    grown.train()
    masks = torch.zeros(2, 32, 64)
    masks[:, 8:20, 10:30] = 1
    total_loss(grown(images, *text), torch.tensor([[0.3, 0.4, 0.3, 0.4]] * 2), masks)["total"].backward()
    for block in grown.blocks[2:]:
        assert block.attn.proj.weight.grad.abs().sum() > 0 and block.mlp[2].weight.grad.abs().sum() > 0
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.5)
    optimizer.step()
    optimizer.zero_grad()
    total_loss(grown(images, *text), torch.tensor([[0.3, 0.4, 0.3, 0.4]] * 2), masks)["total"].backward()
    assert grown.blocks[3].attn.qkv.weight.grad.abs().sum() > 0        # reached through the new projection
    assert grown.weight_generator.phi[3].weight.grad.abs().sum() > 0   # the new block's Phi learns too
    with pytest.raises(ValueError, match="more than added blocks"):
        VGLAW.grown_from(grown, SMALL)   # removing blocks is not growing
    assert continued(plain, SMALL) is plain
    assert continued(grown, SMALL).spec.depth == 4   # depth 0: --init's blocks
    assert continued(plain, SMALL, depth=3).spec.depth == 3
    with pytest.raises(ValueError, match="2 blocks"):
        continued(plain, dataclasses.replace(SMALL, width=64))


def test_resized_network_resamples_only_its_position_embeddings():
    """`VGLAW.resized_to` a finer token grid: every weight as it was but the position embeddings, resampled
    from the old grid (a constant grid stays constant, a left-right ramp stays a ramp); the same size is the
    same network; `train.continued` resizes --init to --input-size and otherwise keeps --init's size."""
    from vg_ros.grounding.train import continued, parse_size
    torch.manual_seed(7)
    plain = VGLAW(SMALL).eval()   # 32x64: a 2x4 token grid
    with torch.no_grad():
        plain.pos_embed.copy_(torch.arange(4.0).repeat(2)[None, :, None].expand_as(plain.pos_embed))
    finer = VGLAW.resized_to(plain, 64, 128)   # 4x8 tokens
    assert finer.spec.grid == (4, 8) and finer.pos_embed.shape == (1, 32, SMALL.width)
    ramp = finer.pos_embed[0, :, 0].reshape(4, 8)
    assert torch.allclose(ramp[0], ramp[3]) and (ramp[:, 1:] >= ramp[:, :-1]).all()   # still a left-right ramp
    assert ramp[0, 0] < 0.5 and ramp[0, -1] > 2.5
    for name, value in plain.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(value, finer.state_dict()[name]), name
    images, text = torch.rand(1, 3, 64, 128), _text(1)
    with torch.no_grad():
        assert finer(images, *text)["mask_logits"].shape == (1, 64, 128)
        same = VGLAW.resized_to(plain, 32, 64)
        small = torch.rand(1, 3, 32, 64)
        assert torch.equal(same(small, *text)["mask_logits"], plain(small, *text)["mask_logits"])
    with pytest.raises(ValueError, match="must divide"):
        VGLAW.resized_to(plain, 40, 64)
    assert continued(plain, SMALL, size=(64, 128)).spec.grid == (4, 8)
    assert continued(finer, SMALL).spec.grid == (4, 8)   # --init's size unless --input-size says otherwise
    assert parse_size("272x480") == (272, 480)
    for bad in ("272", "ax480", "0x480"):
        with pytest.raises(ValueError, match="--input-size"):
            parse_size(bad)


def test_mask_refiner_starts_at_zero_learns_and_matches_the_dense_computation():
    """Grown with the refiner, a network computes exactly what it did; the refiner's kernel gets gradient at
    once. The windowed computation gives the numbers of refining every 1/2 pixel with the gate applied
    (cells above the gate in both images, one at the map's border); nothing above the gate: no change."""
    from vg_ros.grounding.model import MaskRefiner, total_loss
    torch.manual_seed(6)
    conv = {**SMALL.to_dict(), "stem": "conv", "mask_skip": True}
    plain = VGLAW(VGLAWSpec(**conv)).eval()
    grown = VGLAW.grown_from(plain, VGLAWSpec(**{**conv, "mask_refine": True})).eval()
    images, text = torch.rand(2, 3, 32, 64), _text(2)
    with torch.no_grad():
        assert torch.equal(plain(images, *text)["mask_logits"], grown(images, *text)["mask_logits"])
    grown.train()
    masks = torch.zeros(2, 32, 64)
    masks[:, 8:20, 10:30] = 1
    total_loss(grown(images, *text), torch.tensor([[0.3, 0.4, 0.3, 0.4]] * 2), masks)["total"].backward()
    assert grown.mask_head.refine.text_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="more than added"):
        VGLAW.grown_from(grown, VGLAWSpec(**conv))   # removing a part is not growing

    refiner = MaskRefiner(6, 8)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.5)
    B, h, w = 2, 10, 14
    quarter = torch.full((B, h, w), -9.0) + torch.rand(B, h, w)
    quarter[0, 2:4, 3:5] = torch.randn(2, 2) * 5
    quarter[1, 7:10, 11:14] = 4.0
    fine, cls, logits = torch.randn(B, 2 * h, 2 * w, 6), torch.randn(B, 8), torch.randn(B, 4 * h, 4 * w)
    coarse = F.interpolate(quarter[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    gate = coarse > MaskRefiner.GATE_LOGIT
    feats = torch.cat([fine, (coarse.clamp(-10, 10) / MaskRefiner.COARSE_SCALE)[..., None]], dim=-1)
    delta = (refiner.mlp(feats) * refiner.text_proj(cls)[:, None, None]).sum(-1) * gate
    dense = logits + F.interpolate(delta[:, None], scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    kernel = refiner.text_proj(cls)
    refined = refiner(quarter, fine, kernel, logits)
    assert 0 < gate.sum() < gate.numel() / 4 and not torch.equal(refined, logits)
    assert torch.allclose(refined, dense, atol=1e-5)
    assert torch.allclose(refiner(quarter[:1], fine[:1], kernel[:1], logits[:1]), dense[:1], atol=1e-5)  # one image
    assert torch.equal(refiner(torch.full((B, h, w), -9.0), fine, kernel, logits), logits)
    with pytest.raises(ValueError, match="2x"):
        refiner(quarter, fine[:, :-2], kernel, logits)


@pytest.mark.parametrize("skip", [False, True])
def test_mask_head_matches_its_modules(skip):
    """The head computes exactly the paper's sequence (+ the skip joins): up1 (+ skip8), GroupNorm, GELU, up2
    (+ skip4 residual), dot product with the projected [CLS], bilinear to the output size; the channels-last
    matrix products, with the kernel folded into up2 and skip4's last conv and up2 into skip4's first conv,
    give the modules' numbers; one command's tensors serve a whole batch."""
    from vg_ros.grounding.model import MaskHead
    torch.manual_seed(5)
    head = MaskHead(32, 24, 16, (20, 12) if skip else None)
    for p in head.parameters():          # the skip joins start at zero: give them values to compare
        torch.nn.init.normal_(p, std=0.3)
    fmap, cls = torch.randn(2, 32, 3, 5), torch.randn(2, 24)
    skips = {8: torch.randn(2, 20, 6, 10), 4: torch.randn(2, 12, 12, 20)}
    x = head.up1(fmap)
    if skip:
        x = x + head.skip8(skips[8])
    pixels = head.up2(F.gelu(head.norm(x)))
    if skip:
        pixels = pixels + head.skip4(torch.cat([pixels, skips[4]], dim=1))
    quarter = torch.einsum("bdhw,bd->bhw", pixels, head.text_proj(cls)) / 4.0
    reference = F.interpolate(quarter[:, None], size=(48, 80), mode="bilinear", align_corners=False)[:, 0]
    last = {k: v.permute(0, 2, 3, 1) for k, v in skips.items()}      # the head takes channels-last maps
    out = head(fmap.permute(0, 2, 3, 1), head.command_tensors(cls), (48, 80), last if skip else None)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
    one = head(fmap.permute(0, 2, 3, 1), head.command_tensors(cls[:1]), (48, 80), last if skip else None)
    alone = head(fmap[1:].permute(0, 2, 3, 1), head.command_tensors(cls[:1]), (48, 80),
                 {k: v[1:] for k, v in last.items()} if skip else None)
    assert torch.allclose(one[0], out[0], atol=1e-5) and torch.allclose(one[1], alone[0], atol=1e-5)


def test_fused_conv_stem_gives_the_same_output_and_refuses_training():
    torch.manual_seed(3)
    model = VGLAW(VGLAWSpec(**{**SMALL.to_dict(), "stem": "conv", "mask_skip": True, "mask_refine": True}))
    torch.nn.init.normal_(model.mask_head.refine.text_proj.weight)   # a refiner that changes the logits
    model.train()
    model(torch.rand(4, 3, 32, 64), *_text(4))  # moves the BatchNorm running statistics off their init
    model.eval()
    images, text = torch.rand(2, 3, 32, 64), _text(2)
    with torch.no_grad():
        before = model(images, *text)
        model.for_inference()
        after = model(images, *text)
    assert model.patch_embed.fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key in ("boxes", "mask_logits"):
        assert torch.allclose(before[key], after[key], atol=1e-5), key
    with pytest.raises(RuntimeError, match="folded"):
        model.train()


def test_anchored_box_centre_follows_the_pooling():
    """With zero offsets the anchored head's centre is the attention-weighted token centre."""
    torch.manual_seed(5)
    head = BoxHead(width=8, text_dim=6, lap_dim=4, grid=(2, 4), anchored=True)
    torch.nn.init.zeros_(head.mlp[-1].weight)
    torch.nn.init.zeros_(head.mlp[-1].bias)
    visual = torch.randn(3, 8, 8)
    visual[:, 6] += 40.0   # one token (row 1, column 2) dominates the keys
    boxes, attention = head(visual, torch.randn(3, 6))
    expected = attention @ head.token_centres
    assert torch.allclose(boxes[:, :2], expected, atol=1e-4)
    assert torch.allclose(boxes[:, 2:], torch.full((3, 2), 0.5))
    plain = BoxHead(width=8, text_dim=6, lap_dim=4, grid=(2, 4), anchored=False)
    plain.load_state_dict(head.state_dict())
    assert torch.allclose(plain(visual, torch.randn(3, 6))[0], torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="tokens"):
        head(torch.randn(1, 5, 8), torch.randn(1, 6))


def test_phi_zero_init_starts_from_plain_backbone():
    torch.manual_seed(0)
    model = VGLAW(SMALL).eval()
    images = torch.rand(2, 3, 32, 64)
    feats, valid = _text(2)
    weights = model.generate(feats, valid)
    assert weights.phi.shape == (2, SMALL.depth, SMALL.d_w, SMALL.d_w)
    assert torch.count_nonzero(weights.phi) == 0
    with torch.no_grad():
        adaptive = model.forward_visual(images, weights)
        plain = model.forward_visual(images, weights, use_language_weights=False)
    assert torch.allclose(adaptive["mask_logits"], plain["mask_logits"])
    assert adaptive["boxes"].shape == (2, 4) and adaptive["mask_logits"].shape == (2, 32, 64)
    assert ((adaptive["boxes"] > 0) & (adaptive["boxes"] < 1)).all()


def test_shared_P_Q_and_language_changes_backbone():
    torch.manual_seed(1)
    model = VGLAW(SMALL).eval()
    names = [n for n, _ in model.named_parameters()]
    assert names.count("P") == 1 and names.count("Q") == 1
    assert model.P.shape == (3 * SMALL.width, SMALL.d_w) and model.Q.shape == (SMALL.width, SMALL.d_w)
    for layer in model.weight_generator.phi:
        torch.nn.init.normal_(layer.weight, std=0.5)
    images = torch.rand(1, 3, 32, 64).expand(2, -1, -1, -1)
    feats, valid = _text(2)
    with torch.no_grad():
        out = model(images, feats, valid)
    # same image, two expressions, only the generated weights differ -> different masks
    assert (out["mask_logits"][0] - out["mask_logits"][1]).abs().max() > 1e-3


def test_merged_weights_equal_low_rank_path():
    torch.manual_seed(2)
    model = VGLAW(SMALL).eval()
    for layer in model.weight_generator.phi:
        torch.nn.init.normal_(layer.weight, std=0.3)
        torch.nn.init.normal_(layer.bias, std=0.3)
    feats, valid = _text(1)
    images = torch.rand(3, 3, 32, 64)
    with torch.no_grad():
        weights = model.generate(feats, valid)
        merged = model.merge(weights)
        low_rank = model.forward_visual(images, weights)
        cached = model.forward_visual(images, merged)
    assert merged.merged[0].shape == (3 * SMALL.width, SMALL.width)
    expected = model.blocks[0].attn.qkv.weight + model.P @ weights.phi[0, 0] @ model.Q.t()
    assert torch.allclose(merged.merged[0], expected)
    assert torch.allclose(low_rank["mask_logits"], cached["mask_logits"], atol=1e-4)
    assert torch.allclose(low_rank["boxes"], cached["boxes"], atol=1e-5)
    with pytest.raises(ValueError, match="one command"):
        model.merge(model.generate(*_text(2)))


def test_padding_tokens_are_ignored():
    torch.manual_seed(3)
    model = VGLAW(SMALL)
    feats, valid = _text(1, length=6)
    valid[0, 4:] = False
    altered = feats.clone()
    altered[0, 4:] = 100.0
    for layer in model.weight_generator.phi:
        torch.nn.init.normal_(layer.weight)
    assert torch.allclose(model.generate(feats, valid).phi, model.generate(altered, valid).phi)


def test_model_input_errors():
    model = VGLAW(SMALL)
    feats, valid = _text(1)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(1, 3, 30, 64), feats, valid)
    with pytest.raises(ValueError, match="text_feats"):
        model(torch.rand(1, 3, 32, 64), torch.rand(1, 6, 100), valid)
    bad_valid = valid.clone()
    bad_valid[0, 0] = False
    with pytest.raises(ValueError, match="CLS"):
        model.generate(feats, bad_valid)


def test_gradient_reaches_phi_P_Q_and_text_queries():
    torch.manual_seed(4)
    model = VGLAW(SMALL)
    feats, valid = _text(2)
    out = model(torch.rand(2, 3, 32, 64), feats, valid)
    target_masks = torch.zeros(2, 32, 64)
    target_masks[:, 8:20, 10:30] = 1
    loss = total_loss(out, torch.tensor([[0.3, 0.4, 0.2, 0.3]] * 2), target_masks)["total"]
    loss.backward()
    assert model.weight_generator.phi[0].weight.grad.abs().sum() > 0
    assert model.P.grad is not None and model.Q.grad is not None
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()


# -- losses -------------------------------------------------------------------------------------------------

def test_box_losses_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    # IoU 1/7, hull 9, union 7 -> GIoU = 1/7 - 2/9
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    assert box_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    shifted = box + torch.tensor([[0.1, 0.0, 0.0, 0.0]])
    expected_giou = 1 - generalized_box_iou(cxcywh_to_xyxy(shifted), cxcywh_to_xyxy(box)).item()
    assert box_loss(shifted, box).item() == pytest.approx(0.1 + expected_giou, abs=1e-5)


def test_mask_losses():
    target = torch.zeros(1, 8, 8)
    target[0, 2:6, 2:6] = 1
    good = (target * 2 - 1) * 20
    assert dice_loss(good, target).item() < 1e-3
    assert dice_loss(-good, target).item() > 0.9
    out = {"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "mask_logits": good}
    losses = total_loss(out, torch.tensor([[0.5, 0.5, 0.5, 0.5]]), target)
    assert losses["total"].item() < 1e-2


def test_pooling_loss_is_low_only_on_the_target_tokens():
    masks = torch.zeros(2, 32, 64)
    masks[0, :16, :16] = 1          # token (0, 0) of the (2, 4) grid
    on_target = torch.full((2, 8), 1e-6)
    on_target[:, 0] = 1.0
    elsewhere = torch.full((2, 8), 1e-6)
    elsewhere[:, 7] = 1.0
    uniform = torch.full((2, 8), 1 / 8)
    loss_on, loss_off, loss_uniform = (pooling_loss(p, masks, (2, 4)) for p in (on_target, elsewhere, uniform))
    assert float(loss_uniform[0]) == pytest.approx(np.log(8), rel=1e-4)
    assert loss_on[0] < 1e-4 and loss_off[0] > loss_uniform[0]
    assert loss_on[1] == loss_off[1] == 0     # no target pixels: no pooling loss
    out = {"boxes": torch.full((2, 4), 0.5), "mask_logits": torch.zeros(2, 32, 64), "pool": uniform, "fmap_hw": (2, 4)}
    target = torch.full((2, 4), 0.5)
    with_pool = total_loss(out, target, masks, w_pool=2.0)
    without = total_loss(out, target, masks)
    assert "pool" not in without and with_pool["total"] == pytest.approx(float(without["total"] + 2 * with_pool["pool"]))


def test_tiny_model_learns_which_object_the_command_names(encoder):
    """A few seconds of training: one image with a red and a blue square; the command picks the box."""
    torch.manual_seed(0)
    image = torch.full((3, 32, 64), 0.5)
    image[:, 8:24, 4:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]     # red, left
    image[:, 8:24, 40:56] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]    # blue, right
    feats, valid = encoder.encode(["the red square", "the blue square"])
    boxes_xyxy = torch.tensor([[4, 8, 20, 24], [40, 8, 56, 24]], dtype=torch.float32) / torch.tensor([64, 32, 64, 32])
    masks = torch.zeros(2, 32, 64)
    masks[0, 8:24, 4:20] = 1
    masks[1, 8:24, 40:56] = 1
    targets = torch.stack([(boxes_xyxy[:, 0] + boxes_xyxy[:, 2]) / 2, (boxes_xyxy[:, 1] + boxes_xyxy[:, 3]) / 2,
                           boxes_xyxy[:, 2] - boxes_xyxy[:, 0], boxes_xyxy[:, 3] - boxes_xyxy[:, 1]], dim=1)
    model = VGLAW(SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = image[None].expand(2, -1, -1, -1)
    for _ in range(150):
        loss = total_loss(model(images, feats, valid), targets, masks)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(images, feats, valid)
    pred = cxcywh_to_xyxy(out["boxes"]).numpy()
    ious = metrics.box_iou(pred, boxes_xyxy.numpy())
    assert (ious > 0.5).all(), ious
    pred_masks = out["mask_logits"].sigmoid().numpy() > 0.35
    assert metrics.mask_miou(pred_masks, masks.numpy() > 0) > 0.6


# -- metrics ------------------------------------------------------------------------------------------------

def test_found_report():
    found = np.array([True, True, True, False, False, False])
    correct = np.array([True, True, False, False, False, True])
    rep = metrics.found_report(found, correct)
    assert rep["found_rate"] == pytest.approx(0.5) and rep["precision"] == pytest.approx(2 / 3)
    assert rep["wrong_rejected"] == pytest.approx(2 / 3) and rep["right_kept"] == pytest.approx(2 / 3)
    assert np.isnan(metrics.found_report(np.zeros(2, bool), np.ones(2, bool))["precision"])
    with pytest.raises(ValueError):
        metrics.found_report(found, correct[:3])


def test_box_iou_and_prec():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert metrics.box_iou(a, b) == pytest.approx([1.0, 1 / 3, 0.0])
    assert metrics.box_iou(a[0], b[1]) == pytest.approx(1 / 3)
    assert metrics.prec_at_05(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        metrics.box_iou(a, b[:2])


def test_mask_metrics_and_hops():
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :2] = True      # 8 px
    gt[1, :1, :1] = True  # 1 px
    pred = np.zeros_like(gt)
    pred[0, :1] = True    # 4 of 8 -> 0.5
    pred[1, :1, :1] = True
    assert metrics.mask_miou(pred, gt) == pytest.approx(0.75)
    assert metrics.mask_oiou(pred, gt) == pytest.approx(5 / 9)
    split = metrics.split_by_hops([1.0, 0.0, 0.5], [0, 1, 1])
    assert split == {0: 1.0, 1: 0.25, "all": pytest.approx(0.5)}
    report = metrics.grounding_report(np.array([[0, 0, 4, 2], [0, 0, 1, 1]]), np.array([[0, 0, 4, 2], [2, 2, 4, 4]]),
                                      pred, gt, [0, 1])
    assert report["prec@0.5"] == {0: 1.0, 1: 0.0, "all": 0.5}
    assert report["count"] == {0: 1, 1: 1, "all": 2}
    # the same report from the masks' counts, taken once
    counts = metrics.mask_counts(pred, gt)
    assert counts[0].tolist() == [4, 1] and counts[1].tolist() == [8, 1]
    assert metrics.report_from_counts(np.array([[0, 0, 4, 2], [0, 0, 1, 1]]), np.array([[0, 0, 4, 2], [2, 2, 4, 4]]),
                                      counts, [0, 1]) == report
    # every mask and label empty (a node rightly finding nothing): oIoU 1, as mask_oiou says
    empty = np.zeros_like(pred)
    assert metrics.mask_oiou(empty, empty) == 1.0
    assert metrics.report_from_counts(np.zeros((2, 4)), np.zeros((2, 4)), metrics.mask_counts(empty, empty),
                                      [0, 1])["oiou"]["all"] == 1.0


def test_misses_are_sorted_by_where_the_mask_went_and_targets_by_size():
    from types import SimpleNamespace
    from vg_ros.grounding.evaluate import miss_outcomes, size_report
    H, W = 10, 10
    target, other, background = (np.zeros((H, W), bool) for _ in range(3))
    target[0:4, 0:4] = True        # 16 px, the target of expressions 0-4
    other[6:10, 6:10] = True       # 16 px, the target of expression 5 (same image)
    background[0:2, 6:9] = True    # 6 px on neither
    half_on = target.copy()
    half_on[0:4, 4:8] = True       # 32 px, 16 on the target: found, outlined badly
    split = SimpleNamespace(expr_image=np.array([0, 0, 0, 0, 0, 0]), instance=np.array([3, 3, 3, 3, 3, 8]))
    masks = [target, half_on, other, background, np.zeros((H, W), bool), other]
    gt = [target] * 5 + [other]
    hits = np.array([True, False, False, False, False, True])
    inter = metrics.mask_counts(masks, gt)[0]
    assert miss_outcomes(split, masks, gt, hits, inter).tolist() == [
        "hit", "on_target", "other_object", "elsewhere", "empty", "hit"]
    # another object only counts when a command of the same image names it
    alone = SimpleNamespace(expr_image=np.array([0, 0, 0, 0, 0, 1]), instance=split.instance)
    assert miss_outcomes(alone, masks, gt, hits, inter)[2] == "elsewhere"
    share = np.array([0.001, 0.0035, 0.01, 0.5])   # a bucket's bound belongs to the next one
    report = size_report(share, np.array([True, False, True, True]), np.array([0.8, 0.2, 0.6, 1.0]), 129600)
    assert [report[k]["count"] for k in ("small", "medium", "large")] == [1, 2, 1]
    assert report["medium"]["prec@0.5"] == 0.5 and report["medium"]["miou"] == pytest.approx(0.4)
    assert report["small"]["max_pixels"] == pytest.approx(453.6) and report["large"]["max_pixels"] is None
    assert np.isnan(size_report(share[:1], np.array([True]), np.array([1.0]), 100)["large"]["miou"])


# -- pipeline -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(encoder):
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
    torch.manual_seed(0)
    return GroundingPipeline(GroundingConfig(), weights=None, device="cpu", text_encoder=encoder)


def _camera(width=480, height=270) -> CameraModel:
    K = np.array([[300.0, 0, width / 2], [0, 300.0, height / 2], [0, 0, 1]])
    return CameraModel("CAM_FRONT", width, height, K, np.eye(4))


def test_pipeline_command_errors_and_no_command(encoder):
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
    pipe = GroundingPipeline(GroundingConfig(), weights=None, device="cpu", text_encoder=encoder)
    frame = CameraFrame(_camera(), np.zeros((270, 480, 3), np.uint8))
    with pytest.raises(RuntimeError, match="no command"):
        pipe.infer(frame, 1)
    for bad in ("", "x" * 10_000, "..."):
        with pytest.raises(ValueError):
            pipe.set_command(bad)
    pipe.set_command("the red car")
    with pytest.raises(ValueError):
        pipe.set_command("")
    assert pipe.command == "the red car"  # a bad command leaves the previous one in place
    pipe.set_command("das Auto — 車")
    with pytest.raises(ValueError, match="uint8"):
        pipe.infer(CameraFrame(_camera(), np.zeros((270, 480), np.uint8)), 1)
    with pytest.raises(ValueError, match="device"):
        GroundingPipeline(GroundingConfig(), weights=None, device="tpu", text_encoder=encoder)
    with pytest.raises(ValueError, match="does not exist"):
        GroundingPipeline(GroundingConfig(), weights="/nonexistent.safetensors", device="cpu", text_encoder=encoder)


def test_pipeline_cached_equals_uncached_and_shapes(pipeline):
    for layer in pipeline.model.weight_generator.phi:
        torch.nn.init.normal_(layer.weight, std=0.3)
    rng = np.random.default_rng(0)
    frame = CameraFrame(_camera(), rng.integers(0, 255, (270, 480, 3), dtype=np.uint8), stamp_ns=5)
    pipeline.set_command("the blue truck behind the red car")
    cached = pipeline.infer(frame, 7)
    uncached = pipeline.infer_uncached(frame, "the blue truck behind the red car", 7)
    assert cached.mask.shape == (270, 480) and cached.mask.dtype == bool
    assert cached.stamp_ns == 7 and cached.command == "the blue truck behind the red car"
    assert np.allclose(cached.box, uncached.box, atol=1e-2)
    assert cached.score == pytest.approx(uncached.score, abs=1e-4)
    assert (cached.mask != uncached.mask).mean() < 1e-3
    assert 0 <= cached.box[0] <= cached.box[2] <= 480 and 0 <= cached.box[1] <= cached.box[3] <= 270
    assert cached.found == (cached.score >= pipeline.config.score_threshold)


def test_infer_many_is_infer_on_each_frame_in_one_batch(encoder, tmp_path):
    """Several cameras' frames (different sizes) as one batch: each result as `infer` gives it alone (to float
    rounding), the box head's box where the mask is empty, the presence per frame."""
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline, save_weights
    torch.manual_seed(1)
    weights = tmp_path / "presence.safetensors"
    save_weights(VGLAW(spec_by_name("tiny", presence_head=True)), weights)
    pipe = GroundingPipeline(GroundingConfig(score_threshold=0.0, mask_threshold=0.45), weights=weights,
                             device="cpu", text_encoder=encoder)
    with pytest.raises(RuntimeError, match="no command"):
        pipe.infer_many([])
    pipe.set_command("the red car left of the bus")
    rng = np.random.default_rng(5)
    frames = [CameraFrame(_camera(w, h), rng.integers(0, 255, (h, w, 3), dtype=np.uint8), stamp_ns=10 + i)
              for i, (w, h) in enumerate(((480, 270), (640, 360), (480, 270)))]
    frames[2] = CameraFrame(frames[2].camera, np.zeros((270, 480, 3), np.uint8), 12)   # an empty view
    batch = pipe.infer_many(frames)
    assert pipe.infer_many(frames[:0]) == []
    for frame, got in zip(frames, batch):
        alone = pipe.infer(frame)
        assert got.stamp_ns == frame.stamp_ns and got.mask.shape == frame.image.shape[:2]
        assert (got.mask != alone.mask).mean() < 1e-3 and got.score == pytest.approx(alone.score, abs=1e-4)
        assert np.allclose(got.box, alone.box, atol=0.5) and got.presence == pytest.approx(alone.presence, abs=1e-4)
        assert got.found == alone.found and got.seconds == batch[0].seconds > 0
    assert len({r.presence for r in batch}) == 3 and not np.array_equal(batch[0].box, batch[1].box)
    pipe.config = GroundingConfig(score_threshold=0.0, mask_threshold=0.99)   # empty masks: the head's boxes
    heads = pipe.infer_many(frames)
    assert not any(r.mask.any() for r in heads)
    for frame, got in zip(frames, heads):
        assert np.allclose(got.box, pipe.infer(frame).box, atol=0.5)
    assert not np.allclose(heads[0].box, heads[2].box)


def test_pipeline_with_a_presence_head_needs_both_thresholds(encoder, tmp_path):
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline, save_weights
    torch.manual_seed(0)
    weights = tmp_path / "presence.safetensors"
    save_weights(VGLAW(spec_by_name("tiny", presence_head=True)), weights)
    frame = CameraFrame(_camera(), np.random.default_rng(4).integers(0, 255, (270, 480, 3), dtype=np.uint8))
    results = {}
    for presence_threshold in (0.0, 1.0):
        pipe = GroundingPipeline(GroundingConfig(score_threshold=0.0, presence_threshold=presence_threshold),
                                 weights=weights, device="cpu", text_encoder=encoder)
        pipe.set_command("the red car")
        results[presence_threshold] = pipe.infer(frame, 1)
        uncached = pipe.infer_uncached(frame, "the red car", 1)
        assert uncached.presence == pytest.approx(results[presence_threshold].presence, abs=1e-4)
    assert 0 < results[0.0].presence < 1 and results[0.0].found and not results[1.0].found
    assert np.array_equal(results[0.0].mask, results[1.0].mask)   # the head decides "found", not the mask
    plain = GroundingPipeline(GroundingConfig(score_threshold=0.0, presence_threshold=1.0), weights=None,
                              device="cpu", text_encoder=encoder)
    plain.set_command("the red car")
    result = plain.infer(frame, 1)
    assert np.isnan(result.presence) and result.found   # no head: only the score counts


def test_pipeline_runs_the_box_head_only_when_its_box_is_published(pipeline):
    """box_source "mask": the mask's tight box, and the box head's box (the same one box_source "head"
    publishes) when the mask is empty, although the head then runs only after the mask is known."""
    from vg_ros.grounding.pipeline import GroundingConfig
    from vg_ros.sim.language import mask_box
    frame = CameraFrame(_camera(), np.random.default_rng(3).integers(0, 255, (270, 480, 3), dtype=np.uint8))
    pipeline.set_command("the red car")
    config = pipeline.config
    try:
        results = {}
        for threshold in (0.01, 0.99):           # nearly every pixel passes / nothing passes (untrained head)
            for source in ("mask", "head"):
                pipeline.config = GroundingConfig(mask_threshold=threshold, box_source=source)
                results[threshold, source] = pipeline.infer(frame, 1)
    finally:
        pipeline.config = config
    assert results[0.01, "mask"].mask.any() and not results[0.99, "mask"].mask.any()
    assert np.array_equal(results[0.01, "mask"].box, mask_box(results[0.01, "mask"].mask))
    assert np.allclose(results[0.99, "mask"].box, results[0.99, "head"].box)
    assert np.allclose(results[0.01, "head"].box, results[0.99, "head"].box)   # the head ignores the mask


def test_target_region_keeps_the_heaviest_region_and_its_box():
    from vg_ros.grounding.pipeline import published_box, target_region
    prob = np.zeros((40, 60), np.float32)
    prob[5:9, 5:25] = 0.6      # large, faint: 80 px x 0.6 = 48
    prob[20:30, 40:50] = 0.95  # smaller, confident: 100 px x 0.95 = 95 -> the target
    prob[35, 0] = 0.99         # a stray pixel
    mask, score = target_region(prob, 0.35)
    assert mask.sum() == 100 and mask[20:30, 40:50].all()
    assert score == pytest.approx(0.95)
    both, score_all = target_region(prob, 0.35, single_region=False)
    assert both.sum() == 181 and score_all == pytest.approx((48 + 95 + 0.99) / 181, rel=1e-5)
    head = np.array([1.0, 2.0, 3.0, 4.0])
    assert np.array_equal(published_box(mask, head, "mask"), [40, 20, 50, 30])  # x1 / y1 exclusive
    assert np.array_equal(published_box(mask, head, "head"), head)
    empty, peak = target_region(np.full((4, 4), 0.2, np.float32), 0.35)
    assert not empty.any() and peak == pytest.approx(0.2)
    assert np.array_equal(published_box(empty, head, "mask"), head)  # nothing to box: the head's box


def test_target_region_window_equals_labelling_the_whole_map():
    """Labelling only the window around the thresholded pixels picks the same region (ties included) as
    labelling the whole map."""
    from scipy import ndimage
    from vg_ros.grounding.pipeline import target_region
    rng = np.random.default_rng(7)
    for trial in range(40):
        prob = np.zeros((30, 50), np.float32)
        for _ in range(rng.integers(1, 6)):
            r, c = rng.integers(0, 28), rng.integers(0, 48)
            prob[r:r + rng.integers(1, 6), c:c + rng.integers(1, 9)] = rng.choice([0.5, 0.7, 0.9])
        labels, count = ndimage.label(prob > 0.35)
        mass = ndimage.sum(prob, labels, np.arange(1, count + 1))
        expected = labels == 1 + int(np.argmax(mass))
        mask, score = target_region(prob, 0.35)
        assert np.array_equal(mask, expected), trial
        assert score == pytest.approx(float(prob[expected].mean()))


def test_mask_from_logits_equals_resizing_the_whole_map():
    """Resizing only the window over the logits above the threshold gives the mask and score of resizing
    the whole map with F.interpolate and thresholding its sigmoid: blobs anywhere (borders too), up- and
    down-sizing, several regions, nothing above the threshold (the score is then the whole map's peak)."""
    from vg_ros.grounding.pipeline import mask_from_logits, target_region
    rng = np.random.default_rng(8)
    sizes = [(270, 480), (176, 320), (30, 50), (301, 300)]
    for trial in range(80):
        logits = torch.from_numpy(rng.normal(-6.0, 1.0, (44, 80)).astype(np.float32))
        for _ in range(trial % 4):
            r, c = rng.integers(0, 44), rng.integers(0, 80)
            logits[max(r - 2, 0):r + rng.integers(1, 4), max(c - 3, 0):c + rng.integers(1, 5)] = float(rng.normal(1, 3))
        size = sizes[trial % len(sizes)]
        prob = F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].sigmoid()
        for single in (True, False):
            expected, expected_score = target_region(prob.numpy(), 0.35, single)
            mask, score = mask_from_logits(logits, size, 0.35, single)
            assert mask.shape == size and np.array_equal(mask, expected), (trial, single)
            assert score == pytest.approx(expected_score, abs=1e-5)


def test_coverage_map_ious_show_what_a_coarse_grid_loses():
    """A perfect map on a coarse grid: a cell-aligned block comes back whole; a target smaller than a cell
    is lost or blurred; the full-resolution grid loses nothing."""
    from vg_ros.grounding.evaluate import coverage_map_ious
    block = np.zeros((64, 96), bool)
    block[16:32, 24:48] = True            # 8-pixel cells of a (8, 12) grid: aligned
    speck = np.zeros((64, 96), bool)
    speck[21:24, 30:33] = True            # 9 px, inside one 8x8 cell
    coarse = coverage_map_ious([block, speck], (8, 12))
    assert coarse[0] > 0.85 and coarse[1] < 0.5
    assert np.allclose(coverage_map_ious([block, speck], (64, 96)), 1.0)
    assert coverage_map_ious([speck], (32, 48))[0] > coarse[1]   # a finer grid keeps more of it


def test_shipped_pipeline_publishes_one_region_and_its_box(encoder):
    """The shipped weights on a held-out simulated frame: every published mask is one region and the box
    is its tight box, and it lies inside the thresholded map that `single_region=False` publishes."""
    from scipy import ndimage
    from vg_ros.grounding.pipeline import GroundingConfig, GroundingPipeline
    from vg_ros.sim import simulate
    frame = next(iter(simulate(1000, 0.1, every=1, lidar=False, occupancy=False, expressions=6)))
    pipe = GroundingPipeline(GroundingConfig(), device="cpu", text_encoder=encoder)
    head_pipe = GroundingPipeline(GroundingConfig(box_source="head", single_region=False), device="cpu",
                                  text_encoder=encoder)
    checked = 0
    for expr in frame.expressions:
        image = CameraFrame(_camera(), np.asarray(frame.images[expr.camera]))
        pipe.set_command(expr.text)
        head_pipe.set_command(expr.text)
        result, raw = pipe.infer(image, 1), head_pipe.infer(image, 1)
        assert result.found == (result.score >= pipe.config.score_threshold)
        if not result.mask.any():
            continue
        ys, xs = np.nonzero(result.mask)
        assert np.array_equal(result.box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert ndimage.label(result.mask)[1] == 1
        assert (result.mask <= raw.mask).all()   # the published region is part of the thresholded map
        checked += 1
    assert checked >= 3


def test_save_load_roundtrip(tmp_path):
    from vg_ros.grounding.pipeline import load_weights, save_weights
    model = VGLAW(SMALL)
    save_weights(model, tmp_path / "w.safetensors", {"steps": 3})
    loaded, meta = load_weights(tmp_path / "w.safetensors")
    assert loaded.spec == SMALL and meta["steps"] == "3"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_locate_median_of_points_in_mask(pipeline):
    camera = _camera()
    mask = np.zeros((270, 480), bool)
    mask[100:170, 200:280] = True
    result = GroundingResult(1, "x", True, 0.9, np.array([200, 100, 280, 170.0]), mask)
    rng = np.random.default_rng(1)
    # target: points around (0.1, 0.05, 10) in the camera frame (= LiDAR frame here); plus background
    target = np.array([0.1, 0.05, 10.0]) + rng.normal(0, 0.1, (60, 3))
    behind = np.array([0.0, 0.0, 30.0]) + rng.normal(0, 0.3, (20, 3))   # seen through the mask, fewer
    elsewhere = np.array([8.0, 0.0, 10.0]) + rng.normal(0, 0.1, (50, 3))  # outside the mask
    points = np.vstack([target, behind, elsewhere])
    pos = pipeline.locate(result, points, np.eye(4), camera)
    assert pos is not None and np.linalg.norm(pos - [0.1, 0.05, 10.0]) < 0.1
    # a LiDAR offset: T_cam_lidar moves points 1 m along z
    T = np.eye(4)
    T[2, 3] = 1.0
    pos2 = pipeline.locate(result, points - [0, 0, 1.0], T, camera)
    assert np.linalg.norm(pos2 - [0.1, 0.05, 9.0]) < 0.1
    assert pipeline.locate(result, elsewhere, np.eye(4), camera) is None
    not_found = GroundingResult(1, "x", False, 0.1, result.box, mask)
    assert pipeline.locate(not_found, points, np.eye(4), camera) is None
    # a mask at half resolution still maps points correctly
    half = GroundingResult(1, "x", True, 0.9, result.box, mask[::2, ::2])
    assert np.linalg.norm(pipeline.locate(half, points, np.eye(4), camera) - [0.1, 0.05, 10.0]) < 0.1


def test_locate_follows_the_lens_distortion_of_the_camera(pipeline):
    """A wide lens (strong barrel distortion) moves an off-centre target's pixels towards the centre: the
    mask sits there in the raw image, and only the distorted projection finds the LiDAR points inside it."""
    import dataclasses

    from vg_ros.geometry import project_points
    lens = dataclasses.replace(_camera(), distortion=np.array([-0.35, 0.12, 0.0, 0.0, 0.0]),
                               distortion_model="plumb_bob")
    rng = np.random.default_rng(2)
    target = np.array([6.0, 1.5, 8.0]) + rng.normal(0, 0.05, (60, 3))   # far right of the view
    (u, v), = project_points(lens.K, np.eye(4), target[:1], lens.width, lens.height,
                             distortion=lens.distortion, distortion_model="plumb_bob")[0]
    (u0, v0), = project_points(lens.K, np.eye(4), target[:1], lens.width, lens.height)[0]
    assert abs(u - u0) > 30   # the lens moves it by tens of pixels
    mask = np.zeros((lens.height, lens.width), bool)
    mask[int(v) - 12:int(v) + 12, int(u) - 12:int(u) + 12] = True
    result = GroundingResult(1, "x", True, 0.9, np.array([u - 12, v - 12, u + 12, v + 12]), mask)
    pos = pipeline.locate(result, target, np.eye(4), lens)
    assert pos is not None and np.linalg.norm(pos - [6.0, 1.5, 8.0]) < 0.1
    assert pipeline.locate(result, target, np.eye(4), _camera()) is None   # the pinhole misses the mask


# -- data, training loop, evaluation (a stand-in simulator: two coloured boxes per image) ---------------------

_FAKE_OBJECTS = {1: ("car", "red"), 2: ("car", "blue"), 3: ("bus", "green")}


def _fake_frames(seed, seconds, expressions, rig, every):
    """(world, frames) as `data._frames` gives them: a red car on the left and, on the right, a blue car
    (even ticks) or a green bus (odd ticks)."""
    from types import SimpleNamespace
    from vg_ros.types import Expression
    world = SimpleNamespace(objects=[SimpleNamespace(instance_id=i, kind=k, colour=c, size="large")
                                     for i, (k, c) in _FAKE_OBJECTS.items()])

    def frames():
        rng = np.random.default_rng(seed)
        for tick in range(0, int(seconds * 10), every):
            image = np.full((270, 480, 3), 90, np.uint8)
            instance = np.zeros((270, 480), np.int32)
            exprs = []
            x_left, x_right = int(rng.integers(20, 150)), int(rng.integers(280, 400))
            right = 2 if (tick // every) % 2 == 0 else 3
            for inst, x0, colour, side in [(1, x_left, (220, 30, 30), "left"), (right, x_right, (30, 60, 220), "right")]:
                y0 = int(rng.integers(60, 180))
                image[y0:y0 + 40, x0:x0 + 60] = colour
                instance[y0:y0 + 40, x0:x0 + 60] = inst
                kind, word = _FAKE_OBJECTS[inst]
                exprs.append(Expression(f"the {word} {kind} on the {side}", "CAM_FRONT", inst,
                                        np.array([x0, y0, x0 + 60, y0 + 40.0]), instance == inst, hops=int(inst > 1)))
            yield SimpleNamespace(images={"CAM_FRONT": image}, instance={"CAM_FRONT": instance},
                                  depth={"CAM_FRONT": np.full((270, 480), 10.0, np.float32)},
                                  expressions=exprs[:expressions])
    return world, frames()


@pytest.fixture(scope="module")
def fake_splits(encoder):
    from vg_ros.grounding import data
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_frames", _fake_frames)
    try:
        train = data.render_split([0, 1], 1.0, 4, (32, 64), encoder, log=lambda *_: None, every=2)
        full = data.render_split([7], 0.4, 4, None, encoder, log=lambda *_: None, every=2)
    finally:
        mp.undo()
    return train, full


def test_mirror_text_and_seeds():
    from vg_ros.grounding.data import mirror_text, parse_seeds
    assert mirror_text("The car left of the bus, Rightmost") == "The car right of the bus, Leftmost"
    assert mirror_text("the leftmost red cone") == "the rightmost red cone"
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError):
        parse_seeds("3-1")
    with pytest.raises(ValueError):
        parse_seeds("a")


def test_render_split_layout(fake_splits, tmp_path):
    from vg_ros.grounding.data import GroundingSplit
    train, full = fake_splits
    assert train.images.shape == (10, 32, 64, 3) and len(train) == 20 and full.size == (270, 480)
    assert set(train.texts) >= {"the red car on the left", "the blue car on the right", "the red car on the right"}
    i = 0
    assert train.texts[train.mirror_index[i]] == train.texts[train.text_index[i]].replace("left", "right")
    # the other-object control pairs each expression with the other instance of the same image
    assert (train.instance[train.other] != train.instance).all()
    assert (train.expr_image[train.other] == train.expr_image).all()
    # the resized mask lies inside its normalised box
    m = train.masks(0)
    ys, xs = np.nonzero(m)
    x0, y0, x1, y1 = train.boxes[0] * [64, 32, 64, 32]
    assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
    feats, valid = train.text_batch(train.text_index[:3])
    assert feats.shape[0] == 3 and valid[:, 0].all()
    train.save(tmp_path / "s.npz")
    again = GroundingSplit.load(tmp_path / "s.npz")
    assert np.array_equal(again.masks(np.arange(3)), train.masks(np.arange(3)))


def test_load_concat_shifts_ids_and_refuses_other_sizes(fake_splits, tmp_path):
    from vg_ros.grounding.data import GroundingSplit
    train, full = fake_splits
    for name, split in (("a", train), ("b", train), ("full", full)):
        split.save(tmp_path / f"{name}.npz")
    both = GroundingSplit.load_concat([tmp_path / "a.npz", tmp_path / "b.npz"])
    n, t = len(train), len(train.texts)
    assert len(both) == 2 * n and len(both.images) == 2 * len(train.images) and len(both.texts) == 2 * t
    assert np.array_equal(both.expr_image[n:], train.expr_image + len(train.images))
    assert np.array_equal(both.texts[both.text_index[n:]], train.texts[train.text_index])
    assert np.array_equal(both.texts[both.mirror_index[n:]], train.texts[train.mirror_index])
    assert np.array_equal(both.other[n:], np.where(train.other >= 0, train.other + n, -1))
    assert np.array_equal(both.masks(np.arange(n, 2 * n)), train.masks(np.arange(n)))
    with pytest.raises(ValueError, match="images differs"):
        GroundingSplit.load_concat([tmp_path / "a.npz", tmp_path / "full.npz"])


def test_flip_augmentation_keeps_box_mask_and_text_consistent(fake_splits):
    from vg_ros.grounding.train import make_batch
    train, _ = fake_splits
    batch = make_batch(train, np.arange(len(train)), np.random.default_rng(3), augment=True)
    for b in range(len(train)):
        ys, xs = np.nonzero(batch["masks"][b].numpy())
        cx, cy, w, h = batch["boxes"][b].numpy() * [64, 32, 64, 32]
        assert abs((xs.min() + xs.max() + 1) / 2 - cx) <= 1.5 and abs((ys.min() + ys.max() + 1) / 2 - cy) <= 1.5
        # the red box stays red wherever flipping moved it
        red = batch["images"][b, 0].numpy()[ys, xs].mean() > 0.6
        assert red == (train.instance[b] == 1)


def test_absent_commands_name_nothing_in_the_image(fake_splits):
    from vg_ros.grounding.train import make_batch
    train, _ = fake_splits
    images = np.arange(len(train.images))
    texts = train.absent_texts(images, np.random.default_rng(0))
    assert (texts >= 0).all()
    for image, text in zip(images, texts):
        own = {str(train.texts[t]) for t in train.text_index[train.expr_image == image]}
        expected = "the green bus" if any("blue car" in t for t in own) else "the blue car"
        assert str(train.texts[text]).startswith(expected)
        assert not (train.present[image] & train.text_descriptors[text]).any()
    # an image holding every kind of object named in the split has no absent command
    crowded = train.present.copy()
    crowded[:] = train.present.any(0)
    full_split = dataclasses.replace(train, present=crowded)
    assert (full_split.absent_texts(images, np.random.default_rng(0)) == -1).all()
    # in a batch the swapped commands keep their image, get an empty mask and carry no box term
    batch = make_batch(train, np.arange(len(train)), np.random.default_rng(1), augment=True, absent=0.5)
    swapped = ~batch["present"].numpy()
    assert 0 < swapped.sum() < len(train)
    assert batch["masks"][swapped].sum() == 0 and (batch["masks"][~swapped].flatten(1).sum(1) > 0).all()
    out = {"boxes": torch.rand(len(train), 4) * 0.5 + 0.25, "mask_logits": torch.zeros(len(train), 32, 64)}
    moved = batch["boxes"].clone()
    moved[batch["present"] == 0] = 0.9
    assert (total_loss(out, moved, batch["masks"], present=batch["present"])["box"]
            == total_loss(out, batch["boxes"], batch["masks"], present=batch["present"])["box"])
    assert total_loss(out, moved, batch["masks"])["box"] != total_loss(out, batch["boxes"], batch["masks"])["box"]


def test_train_loop_and_evaluation_report(fake_splits):
    from vg_ros.grounding.evaluate import evaluate_split, format_report
    from vg_ros.grounding.train import train
    train_split, full = fake_splits
    model, history = train(train_split, steps=3, minutes=1, batch=4, spec=SMALL, absent=0.25, log=lambda *_: None)
    assert history["steps"] == 3 and np.isfinite(history["final_loss"])
    # evaluation resizes full-size images to the model and scores at full size
    result = evaluate_split(model, full, log=lambda *_: None)
    assert result["count"] == len(full) and result["main"]["count"]["all"] == len(full)
    assert {"phi_zero", "mismatched", "chance", "box_head", "absent"} <= set(result)
    assert result["absent"]["pairs"] == len(full.images) and "absent referent" in format_report(result)
    assert result["chance"]["prec@0.5_other_object_box"] == 0.0
    assert result["chance"]["prec@0.5_random_referred_object"] == pytest.approx(0.5)
    assert "mismatched" in format_report(result) and "box head" in format_report(result)
    from vg_ros.grounding.evaluate import format_sweep
    found = [result["threshold_sweep"][t]["found_rate"] for t in sorted(result["threshold_sweep"])]
    assert found == sorted(found, reverse=True)   # a higher threshold never publishes more
    assert len(format_sweep(result).splitlines()) == 1 + len(result["threshold_sweep"])
    assert "presence_sweep" not in result and result["thresholds"]["presence_threshold"] is None
    for key in ("prec@0.5", "miou"):   # the interval brackets the total it is about
        lo, hi = result["main_interval95"][key]
        assert 0.0 <= lo <= result["main"][key]["all"] <= hi <= 1.0
    assert "95 % interval" in format_report(result)
    # every expression has one outcome and one size bucket; the hits are the P@0.5 total
    from vg_ros.grounding.evaluate import OUTCOMES
    assert sum(result["outcomes"].values()) == pytest.approx(1.0) and set(result["outcomes"]) == set(OUTCOMES)
    assert result["outcomes"]["hit"] == pytest.approx(result["main"]["prec@0.5"]["all"])
    assert sum(b["count"] for b in result["by_size"].values()) == len(full)
    assert len(result["per_expression"]["outcome"]) == len(result["per_expression"]["target_area"]) == len(full)
    assert "by target size" in format_report(result) and "the misses" in format_report(result)
    # paired against another network: the difference of the totals, with an interval around it
    from vg_ros.grounding.evaluate import paired_difference
    other = evaluate_split(VGLAW(SMALL).eval(), full, controls=False, absent=False, log=lambda *_: None)
    same = paired_difference(result, result)
    assert all(d["difference"] == 0.0 and d["interval95"] == [0.0, 0.0] for d in same.values())
    diff = paired_difference(result, other)
    for key in ("prec@0.5", "miou"):
        assert diff[key]["difference"] == pytest.approx(result["main"][key]["all"] - other["main"][key]["all"])
        lo, hi = diff[key]["interval95"]
        assert lo <= diff[key]["difference"] <= hi


def test_eval_cli_against_other_weights_prints_and_writes_the_paired_difference(fake_splits, monkeypatch,
                                                                               tmp_path, capsys):
    from vg_ros.cli import main as vg_main
    from vg_ros.grounding import data, text
    from vg_ros.grounding.pipeline import save_weights
    _, full = fake_splits
    monkeypatch.setattr(data, "load_or_render", lambda *a, **k: full)
    monkeypatch.setattr(text, "TextEncoder", lambda *a, **k: None)
    torch.manual_seed(1)
    for name in ("a", "b"):
        save_weights(VGLAW(SMALL), tmp_path / f"{name}.safetensors", {"train_seeds": "0-1"})
    out = tmp_path / "eval.json"
    gallery = tmp_path / "gallery"
    assert vg_main(["eval", "grounding", "--seeds", "7", "--no-controls", "--no-relation-negatives",
                    "--weights", str(tmp_path / "a.safetensors"), "--against", str(tmp_path / "b.safetensors"),
                    "--json", str(out), "--gallery", str(gallery), "--gallery-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "against" in printed and "95 % interval" in printed
    written = json.loads(out.read_text())
    # the gallery: up to two pictures per outcome, each the camera image under a caption band, as listed
    from collections import Counter
    from PIL import Image
    index = json.loads((gallery / "index.json").read_text())
    per_outcome = Counter(written["per_expression"]["outcome"])
    assert Counter(e["outcome"] for e in index) == {k: min(2, n) for k, n in per_outcome.items()}
    for entry in index:
        assert entry["outcome"] == written["per_expression"]["outcome"][entry["expression"]]
        assert entry["mask_iou"] == pytest.approx(written["per_expression"]["miou"][entry["expression"]])
        picture = np.asarray(Image.open(gallery / entry["file"]))
        assert picture.shape[1:] == (480, 3) and picture.shape[0] > 270
        assert ((picture == [40, 255, 40]).all(-1)).any()   # the truth is drawn (the prediction may be empty)
    diff = written["against"]["difference"]["prec@0.5"]
    assert diff["difference"] == pytest.approx(written["main"]["prec@0.5"]["all"]
                                               - written["against"]["main"]["prec@0.5"]["all"])
    assert len(written["per_expression"]["miou"]) == len(full)
    # the other network is checked for held-out seeds as well
    save_weights(VGLAW(SMALL), tmp_path / "c.safetensors", {"train_seeds": "7"})
    assert vg_main(["eval", "grounding", "--seeds", "7", "--no-relation-negatives",
                    "--weights", str(tmp_path / "a.safetensors"), "--against", str(tmp_path / "c.safetensors")]) == 2
    assert "c.safetensors" in capsys.readouterr().err


def test_bootstrap_interval_resamples_whole_images():
    from vg_ros.grounding import metrics
    assert metrics.bootstrap_interval([0.7] * 6, [0, 0, 1, 1, 2, 2]) == pytest.approx((0.7, 0.7))
    rng = np.random.default_rng(3)
    hits = rng.random(400) < 0.75
    apart = metrics.bootstrap_interval(hits, np.arange(400))
    # binomial: 0.75 +- 1.96 * sqrt(0.75 * 0.25 / 400) = +- 0.042 around the sample's own mean
    assert apart[0] < hits.mean() < apart[1] and apart[1] - apart[0] == pytest.approx(0.085, abs=0.012)
    # the same values, but each image's expressions all right or all wrong: 20 images carry less than 400
    # independent expressions, and the interval says so
    together = metrics.bootstrap_interval(np.repeat(hits[:20], 20), np.repeat(np.arange(20), 20))
    assert together[1] - together[0] > 2.5 * (apart[1] - apart[0])
    assert metrics.bootstrap_interval(hits, np.arange(400)) == apart   # deterministic
    with pytest.raises(ValueError, match="equal"):
        metrics.bootstrap_interval([1.0, 0.0], [0])
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_interval([1.0], [0], level=1.0)


def test_ema_returns_the_moving_average_of_the_steps_weights_started_at_init(fake_splits, monkeypatch):
    from vg_ros.grounding import train as train_module
    from vg_ros.grounding.model import VGLAW
    train_split, _ = fake_splits
    torch.manual_seed(0)
    start = VGLAW(SMALL)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    seen = []   # the network after each optimiser step, read where the average reads it
    update = train_module.WeightAverage.update
    monkeypatch.setattr(train_module.WeightAverage, "update",
                        lambda self, model: (seen.append({k: v.clone() for k, v in model.state_dict().items()}),
                                             update(self, model)))
    decay = 0.8
    avg, history = train_module.train(train_split, steps=4, minutes=1, batch=4, init=start, lr=1e-3, ema=decay,
                                      log=lambda *_: None)
    raw = history.pop("raw_model")
    assert len(seen) == 4 and raw is start and avg is not raw
    for name, value in avg.state_dict().items():
        if not value.is_floating_point() or name not in dict(avg.named_parameters()):
            continue
        expected = init[name]
        for state in seen:
            expected = decay * expected + (1 - decay) * state[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in avg.parameters())
    moved = [n for n, v in raw.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[n])]
    assert moved   # the steps changed the network, so the average is a real mix of start and steps
    # a fresh network ramps the decay: its random start keeps 2/11 after one update, not 0.999
    fresh = train_module.WeightAverage(VGLAW(SMALL), 0.999, ramp=True)
    first = next(fresh.model.parameters()).clone()
    other = VGLAW(SMALL)
    fresh.update(other)
    torch.testing.assert_close(next(fresh.model.parameters()), (2 / 11) * first + (9 / 11) * next(other.parameters()))
    with pytest.raises(ValueError, match="decay"):
        train_module.WeightAverage(start, 1.0, ramp=False)


def test_presence_head_learns_absent_commands_and_leaves_the_network_alone(fake_splits):
    from vg_ros.grounding import train as train_module
    from vg_ros.grounding.evaluate import evaluate_split, format_sweep
    from vg_ros.grounding.pipeline import GroundingConfig, published_found
    train_split, full = fake_splits
    torch.manual_seed(0)
    plain = VGLAW(SMALL).eval()
    grown = VGLAW.grown_from(plain, dataclasses.replace(SMALL, presence_head=True)).eval()
    batch = train_module.make_batch(train_split, np.arange(len(train_split)), np.random.default_rng(5),
                                    augment=False, absent=0.5)
    with torch.no_grad():
        assert torch.equal(plain(batch["images"], batch["feats"], batch["valid"])["mask_logits"],
                           grown(batch["images"], batch["feats"], batch["valid"])["mask_logits"])
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    model, history = train_module.train(train_split, steps=300, minutes=1, batch=16, init=grown, lr=3e-3,
                                        presence_only=True, absent=0.5, log=lambda *_: None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) == (not k.startswith("presence.")) for k in before)
    with torch.no_grad():
        presence = model(batch["images"], batch["feats"], batch["valid"])["presence_logits"].sigmoid()
    present = batch["present"]
    assert 0 < present.sum() < len(present)
    assert presence[present].mean() > presence[~present].mean() + 0.3
    # "found" needs both thresholds; without a head (NaN presence) only the score counts
    config = GroundingConfig(score_threshold=0.5, presence_threshold=0.6)
    assert published_found([0.9, 0.9, 0.4, 0.9], [0.7, 0.5, 0.9, float("nan")], config).tolist() == \
        [True, False, False, True]
    result = evaluate_split(model, full, controls=False, log=lambda *_: None)
    assert "presence_sweep" in result
    assert result["thresholds"]["presence_threshold"] == GroundingConfig().presence_threshold
    found = [result["presence_sweep"][t]["found_rate"] for t in sorted(result["presence_sweep"])]
    assert found == sorted(found, reverse=True)
    assert "presence_threshold" in format_sweep(result)
    with pytest.raises(ValueError, match="no presence head"):
        train_module.train(train_split, steps=1, minutes=1, batch=2, init=plain, presence_only=True)


def test_relation_negatives_rerun_the_simulator_and_are_scored(fake_splits, encoder, monkeypatch, tmp_path):
    from vg_ros.grounding import data
    from vg_ros.grounding.evaluate import evaluate_split, format_report, format_sweep
    _, full = fake_splits
    monkeypatch.setattr(data, "_frames", _fake_frames)
    # the stand-in's commands ("the blue car on the right") hold no relation phrase: no negatives
    same, negatives = data.relation_negatives(full, [7], 0.4, 4, encoder, every=2)
    assert same is full and negatives.tolist() == [-1] * len(full)
    cached, again = data.relation_negatives(full, [7], 0.4, 4, encoder, every=2, cache=tmp_path / "n.npz")
    assert (tmp_path / "n.npz").exists() and again.tolist() == negatives.tolist()
    assert data.relation_negatives(full, [], 0.4, 4, encoder, cache=tmp_path / "n.npz")[1].tolist() == again.tolist()
    with pytest.raises(ValueError, match="not the split's"):
        data.relation_negatives(full, [7], 0.8, 4, encoder, every=2)   # more frames than rendered
    # scoring: any text ids work; here each expression's "negative" is the other object's command
    torch.manual_seed(0)
    result = evaluate_split(VGLAW(SMALL), full, controls=False, negatives=full.text_index[full.other],
                            log=lambda *_: None)
    rel = result["relation_negative"]
    assert rel["pairs"] == len(full) and 0 <= rel["found_rate"] <= 1 and set(rel["by_hops"]) == {"0", "1"}
    assert "relation turned around" in format_report(result) and "turned relation" in format_sweep(result)
    assert all("relation_found_rate" in r for r in result["threshold_sweep"].values())
    # in training batches a turned command keeps its image unflipped, with an empty mask and no box term
    from vg_ros.grounding.train import make_batch
    train_split, _ = fake_splits
    turned = np.where(np.arange(len(train_split)) % 2 == 0, train_split.text_index[train_split.other], -1)
    idx = np.arange(len(train_split))
    batch = make_batch(train_split, idx, np.random.default_rng(2), augment=True, relation=0.99, negatives=turned)
    swapped = ~batch["present"].numpy()
    assert swapped.tolist() == (turned >= 0).tolist() and batch["masks"][swapped].sum() == 0
    feats, _ = train_split.text_batch(turned[swapped])
    assert torch.equal(batch["feats"][swapped][:, :feats.shape[1]], feats)
    plain = make_batch(train_split, idx, np.random.default_rng(2), augment=False)
    # unflipped: the red object stays where it was (up to the small translation)
    red = lambda images: (images[:, 0] > 0.6).float().mean(1).argmax(1).float()
    assert (red(batch["images"][swapped]) - red(plain["images"][swapped])).abs().max() <= 64 / 16 + 1


def test_batches_from_worker_processes(fake_splits):
    from vg_ros.grounding.train import batches, train
    train_split, _ = fake_splits
    inline = batches(train_split, 5, np.random.default_rng(0), absent=0.0)
    stream = batches(train_split, 5, np.random.default_rng(0), absent=0.5, workers=2, seed=4)
    first, second = next(stream), next(stream)
    stream.close()
    assert first["images"].shape == next(inline)["images"].shape == (5, 3, 32, 64)
    assert first["masks"].shape == (5, 32, 64) and first["present"].dtype == torch.bool
    # the two workers draw their own streams (seeded by seed and worker id), not the same batch twice
    assert not torch.equal(first["images"], second["images"])
    # where an absent command was swapped in, its target mask is empty
    for batch in (first, second):
        assert batch["masks"][~batch["present"]].sum() == 0
    model, history = train(train_split, steps=2, minutes=1, batch=4, spec=SMALL, workers=1, log=lambda *_: None)
    assert history["steps"] == 2 and np.isfinite(history["final_loss"])
    with pytest.raises(ValueError, match="must be positive"):
        train(train_split, steps=2, minutes=-1, batch=4, spec=SMALL)


def test_train_cli_refuses_bad_numbers_and_bounds_onednn_cache(monkeypatch, capsys):
    import os
    from vg_ros.cli import main as vg_main
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    for flag, value, words in (("--workers", "-1", "--workers"), ("--absent", "1.5", "--absent"),
                               ("--minutes", "0", "must be positive"), ("--depth", "-1", "--depth"),
                               ("--ema", "1.0", "--ema"), ("--input-size", "100x100", "must divide"),
                               ("--input-size", "big", "expected HxW")):
        assert vg_main(["train", "grounding", flag, value]) == 2
        assert words in capsys.readouterr().err
    # set before the first convolution: per-shape primitives had grown a training process by 8 GB
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"


def test_ground_cli_json_png_and_errors(tmp_path, capsys):
    import json
    from PIL import Image
    from vg_ros.cli import main as vg_main
    from vg_ros.grounding.pipeline import save_weights
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_weights(VGLAW(spec_by_name("tiny")), weights)
    image_path = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (270, 480, 3), dtype=np.uint8)).save(image_path)
    png = tmp_path / "overlay.png"
    assert vg_main(["ground", str(image_path), "the red car left of the bus", "--json", "--png", str(png),
                    "--weights", str(weights), "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record) == {"box", "score", "found", "mask_area", "seconds", "presence"} and len(record["box"]) == 4
    assert record["presence"] is None   # these weights carry no presence head
    assert 0 <= record["score"] <= 1 and 0 <= record["mask_area"] <= 270 * 480
    assert np.asarray(Image.open(png)).shape == (270, 480, 3)
    assert vg_main(["ground", str(tmp_path / "missing.png"), "the car", "--weights", str(weights)]) == 2
    assert "no such image" in capsys.readouterr().err
    assert vg_main(["ground", str(image_path), "   ", "--weights", str(weights)]) == 2
    assert "command: empty" in capsys.readouterr().err
    assert vg_main(["ground", str(image_path), "the car", "--weights", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an overlay path PIL cannot write is refused before any work, not a traceback after it
    for bad, needle in ((tmp_path / "o.xyz", "unknown image extension '.xyz'"), (tmp_path, "is a folder"),
                        (image_path / "o.png", "is a file, not a folder")):
        assert vg_main(["ground", str(image_path), "the car", "--png", str(bad), "--weights", str(weights)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_one_pass_render_with_negatives_matches_two_passes(encoder, monkeypatch, tmp_path):
    """`load_with_negatives` without caches renders images and relation negatives in one run of the real
    simulator, two seeds at a time in forked processes: the same split and negatives as `render_split`
    then `relation_negatives`, one seed at a time; the second call reads both caches."""
    from vg_ros.grounding import data
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    seeds, args = [3, 4], (1.0, 12, (32, 64))
    split, negatives = data.load_with_negatives(seeds, *args, encoder, log=lambda *_: None, workers=2)
    plain = data.render_split(seeds, *args, encoder, log=lambda *_: None)
    again, turned = data.relation_negatives(plain, seeds, *args[:2], encoder)
    for key in data.GroundingSplit.__dataclass_fields__:
        assert np.array_equal(getattr(split, key), getattr(again, key)), key
    assert negatives.tolist() == turned.tolist() and (negatives >= 0).sum() > 0
    assert set(np.unique(split.image_seed)) == set(seeds)
    for i in np.flatnonzero(negatives >= 0):   # the turned command keeps the object and anchor, not the relation
        original, turned_text = str(split.texts[split.text_index[i]]), str(split.texts[negatives[i]])
        assert original != turned_text and len(original.split()) >= 4
    cached, cached_negatives = data.load_with_negatives(seeds, *args, encoder, log=lambda *_: None)
    assert cached_negatives.tolist() == negatives.tolist() and len(cached.texts) == len(split.texts)


def test_seeds_in_several_runs_are_cached_run_by_run_and_joined(encoder, monkeypatch, tmp_path):
    """`load_with_negatives` / `load_or_render` for seeds in two runs (3 and 5-6): each run is rendered and cached
    on its own and the split joined from the caches holds the same images, masks, boxes, commands, mirrored
    commands and relation negatives, expression by expression, as the two seeds rendered together."""
    from vg_ros.grounding import data
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    assert data.seed_runs([3, 5, 6, 9]) == [[3], [5, 6], [9]] and data.seed_runs([]) == []
    seeds, args = [3, 5, 6], (0.6, 12, (32, 64))
    split, negatives = data.load_with_negatives(seeds, *args, encoder, log=lambda *_: None)
    cached = sorted(p.name for p in tmp_path.glob("split_*.npz") if "relation" not in p.name)
    assert cached == sorted(data.cache_path(run, *args, "default", encoder).name for run in ([3], [5, 6]))
    together, (texts, feats, lengths, local) = data.render_with_negatives(seeds, *args, encoder, log=lambda *_: None)
    for key in ("images", "image_seed", "present", "expr_image", "boxes", "packed_masks", "hops", "instance"):
        assert np.array_equal(getattr(split, key), getattr(together, key)), key
    for index in ("text_index", "mirror_index"):
        assert split.texts[getattr(split, index)].tolist() == together.texts[getattr(together, index)].tolist()
    assert [str(split.texts[n]) if n >= 0 else None for n in negatives] == \
        [str(texts[n]) if n >= 0 else None for n in local] and (negatives >= 0).sum() > 0
    has = negatives >= 0   # a negative's features and token count are its own text's
    # (encoded in other batches: float16 rounding apart)
    assert np.allclose(split.text_feats[negatives[has]], feats[local[has]], atol=1e-2)
    assert np.array_equal(split.text_len[negatives[has]], lengths[local[has]])
    assert (split.instance[split.other] != split.instance)[split.other >= 0].all()
    assert (split.expr_image[split.other] == split.expr_image)[split.other >= 0].all()
    plain = data.load_or_render(seeds, *args, encoder, log=lambda *_: None)   # no negatives: the same join
    assert np.array_equal(plain.packed_masks, split.packed_masks) and len(plain.texts) < len(split.texts)


def test_average_weights_tool_means_two_runs_and_refuses_other_networks(tmp_path, capsys):
    """tools/average_weights.py: the parameter-wise mean of two VG-LAW files loads as a VG-LAW; a file of
    another spec or training split, or a corrupt one, is refused with a clear message (exit 2), nothing written;
    with --union-seeds other splits are taken and the output's train_seeds is their union."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from vg_ros.grounding.pipeline import load_weights, save_weights
    tool = Path(__file__).resolve().parents[1] / "tools" / "average_weights.py"
    torch.manual_seed(0)
    a, b = VGLAW(SMALL), VGLAW(SMALL)
    save_weights(a, tmp_path / "a.safetensors", {"train_seeds": "0-9", "phi_zero": "0"})
    save_weights(b, tmp_path / "b.safetensors", {"train_seeds": "0-9", "phi_zero": "0"})
    out = tmp_path / "mean.safetensors"
    done = subprocess.run([sys.executable, str(tool), str(out), str(tmp_path / "a.safetensors"),
                           str(tmp_path / "b.safetensors")], capture_output=True, text=True, check=True)
    assert "mean of 2 files" in done.stdout
    mean, meta = load_weights(out)
    for (name, pa), pb, pm in zip(a.state_dict().items(), b.state_dict().values(), mean.state_dict().values()):
        assert torch.allclose(pm, (pa + pb) / 2, atol=1e-6), name
    assert meta["train_seeds"] == "0-9" and "a.safetensors" in meta["averaged_from"]

    save_weights(b, tmp_path / "c.safetensors", {"train_seeds": "0-99", "phi_zero": "0"})
    save_weights(VGLAW(dataclasses.replace(SMALL, width=48)), tmp_path / "d.safetensors",
                 {"train_seeds": "0-9", "phi_zero": "0"})
    spec = importlib.util.spec_from_file_location("average_weights", tool)
    average_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(average_weights)
    (tmp_path / "e.safetensors").write_bytes(b"not a safetensors file")
    for other, message in (("c", "train_seeds"), ("d", "spec"), ("e", "not a readable safetensors file")):
        bad = tmp_path / f"bad_{other}.safetensors"
        assert average_weights.main([str(bad), str(tmp_path / "a.safetensors"),
                                     str(tmp_path / f"{other}.safetensors")]) == 2
        assert message in capsys.readouterr().err and not bad.exists()
    union = tmp_path / "union.safetensors"    # different training splits only when asked; the union is recorded
    assert average_weights.main([str(union), str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"),
                                 "--union-seeds"]) == 0
    assert load_weights(union)[1]["train_seeds"] == "0-99"
    assert average_weights.main([str(union), str(tmp_path / "a.safetensors"), str(tmp_path / "d.safetensors"),
                                 "--union-seeds"]) == 2 and "spec" in capsys.readouterr().err
    save_weights(b, tmp_path / "f.safetensors", {"phi_zero": "0"})     # no split named: cannot be joined
    assert average_weights.main([str(union), str(tmp_path / "a.safetensors"), str(tmp_path / "f.safetensors"),
                                 "--union-seeds"]) == 2 and "no train_seeds" in capsys.readouterr().err

    # --grow-to-depth: a file of fewer blocks is grown first, its new blocks drawn from --seed as a run with that
    # --seed draws them (the run's exact start); a deeper file is taken as it is, fewer blocks are refused
    torch.manual_seed(3)
    deep = VGLAW.grown_from(b, dataclasses.replace(SMALL, depth=3))
    save_weights(deep, tmp_path / "deep.safetensors", {"train_seeds": "0-9", "phi_zero": "0"})
    grown_mean = tmp_path / "grown_mean.safetensors"
    assert average_weights.main([str(grown_mean), str(tmp_path / "deep.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--grow-to-depth", "3", "--seed", "3"]) == 0
    grown, meta = load_weights(grown_mean)
    assert grown.spec.depth == 3 and json.loads(meta["spec"])["depth"] == 3
    for name, value in grown.state_dict().items():   # the mean of a file and itself
        assert torch.allclose(value.float(), deep.state_dict()[name].float(), atol=1e-6), name
    assert average_weights.main([str(grown_mean), str(tmp_path / "deep.safetensors"), str(tmp_path / "b.safetensors"),
                                 "--grow-to-depth", "2"]) == 2 and "cannot remove blocks" in capsys.readouterr().err


def _stop_after(steps: int):
    """A `stop` for `train`: polled once before each step, true once `steps` steps have run."""
    polls = []
    return lambda: polls.append(1) or len(polls) > steps


def test_a_stopped_run_resumed_from_its_state_ends_where_the_uninterrupted_run_ends(fake_splits, tmp_path):
    from vg_ros.checkpoint import read_training_state
    from vg_ros.grounding.train import train
    train_split, _ = fake_splits
    quiet = dict(steps=6, minutes=60, batch=4, spec=SMALL, absent=0.25, ema=0.9, seed=3, log=lambda *_: None)
    torch.manual_seed(0)
    whole, whole_history = train(train_split, **quiet)
    torch.manual_seed(0)
    state = tmp_path / "run.state.safetensors"
    first, history = train(train_split, **quiet, state_path=state, record={"note": "mine"}, stop=_stop_after(3))
    assert history["interrupted"] and history["steps"] == 3 and state.is_file()
    saved = read_training_state(state)
    assert saved["record"]["step"] == 3 and saved["record"]["caller"] == {"note": "mine"}
    assert set(saved["modules"]) == {"model", "average"}
    torch.manual_seed(123)   # whatever the process did in between
    fresh = VGLAW(SMALL)
    resumed, resumed_history = train(train_split, **quiet, init=fresh, resume=saved)
    assert resumed_history["steps"] == 6 and not resumed_history["interrupted"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)   # the same numbers, bit for bit
    for (name, a), b in zip(whole_history["raw_model"].state_dict().items(),
                            resumed_history["raw_model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # a state saved with a weight average is not resumed without one
    with pytest.raises(ValueError, match="weight average"):
        train(train_split, **{**quiet, "ema": 0.0}, init=VGLAW(SMALL), resume=saved)


def test_training_state_files_are_checked(tmp_path):
    from vg_ros.checkpoint import read_training_state, save_training_state
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "s.safetensors"
    save_training_state(path, {"model": model}, opt, {"step": 1}, {"rng": torch.get_rng_state()})
    state = read_training_state(path)
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    again.load_state_dict(state["optimizer"])
    assert again.param_groups[0]["lr"] == 1e-3 and again.param_groups[0]["betas"] == (0.8, 0.9)
    torch.testing.assert_close(again.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob("*.partial"))   # written beside, then renamed into place
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable training state"):
        read_training_state(path)
    from vg_ros.grounding.pipeline import save_weights
    save_weights(VGLAW(SMALL), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not a readable training state"):
        read_training_state(tmp_path / "w.safetensors")   # weights are not a state
    with pytest.raises(ValueError, match="does not exist"):
        read_training_state(tmp_path / "missing.safetensors")


def test_stop_request_turns_sigterm_into_a_flag_and_restores_the_handlers():
    import signal
    from vg_ros.stop_signals import StopRequest
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop()
        signal.raise_signal(signal.SIGTERM)   # the process lives on (to this thread: the handler has run on return)
        assert stop() and stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_train_cli_stopped_then_resumed_writes_what_one_run_writes(fake_splits, monkeypatch, tmp_path, capsys):
    from vg_ros.cli import main as vg_main
    from vg_ros.grounding import data, model as model_module, text, train as train_module
    from vg_ros.grounding.pipeline import load_weights
    train_split, _ = fake_splits
    monkeypatch.setattr(data, "load_or_render", lambda *a, **k: train_split)
    monkeypatch.setattr(text, "TextEncoder", lambda *a, **k: None)
    monkeypatch.setitem(model_module.SPECS, "tiny", SMALL)
    run = ["train", "grounding", "--steps", "6", "--minutes", "60", "--batch", "4", "--seed", "5", "--ema", "0.9",
           "--monitor-every", "0", "--no-eval", "--lr", "1e-3"]
    assert vg_main(run + ["--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "grounding_vglaw_tiny.state.safetensors").exists()   # complete: removed
    real_train = train_module.train

    def stopped_after_two(*args, **kwargs):   # the real loop, with a stop request after its second step
        return real_train(*args, **{**kwargs, "stop": _stop_after(2)})
    monkeypatch.setattr(train_module, "train", stopped_after_two)
    out = tmp_path / "parts"
    assert vg_main(run + ["--out", str(out)]) == 130
    state = out / "grounding_vglaw_tiny.state.safetensors"
    assert f"--resume {state}" in capsys.readouterr().out
    assert load_weights(out / "grounding_vglaw_tiny.safetensors")[1]["partial"] == "true"
    monkeypatch.setattr(train_module, "train", real_train)
    assert vg_main(["train", "grounding", "--resume", str(state), "--lr", "5e-4"]) == 2   # not the run's own
    assert "drop --lr" in capsys.readouterr().err
    assert vg_main(["train", "grounding", "--resume", str(state), "--save-every", "1"]) == 0   # may change
    assert not state.exists()
    whole, meta = load_weights(tmp_path / "whole" / "grounding_vglaw_tiny.safetensors")
    resumed, resumed_meta = load_weights(out / "grounding_vglaw_tiny.safetensors")
    assert resumed_meta["steps"] == meta["steps"] == "6" and "partial" not in resumed_meta
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    card = (out / "grounding_vglaw_tiny.md").read_text()
    assert "--seed 5" in card and "resumed" in card
    weights_not_state = tmp_path / "whole" / "grounding_vglaw_tiny.safetensors"
    assert vg_main(["train", "grounding", "--resume", str(weights_not_state)]) == 2
    assert "not a readable training state" in capsys.readouterr().err


def test_train_cli_presence_only_records_the_heads_steps_across_runs(fake_splits, monkeypatch, tmp_path):
    """`--presence-only --init W`: the network's step count stays W's; a head trained on (W has one) adds
    this run's steps to W's `presence_steps`."""
    from vg_ros.cli import main as vg_main
    from vg_ros.grounding import data, model as model_module, text
    from vg_ros.grounding.pipeline import load_weights
    train_split, _ = fake_splits
    monkeypatch.setattr(data, "load_or_render", lambda *a, **k: train_split)
    monkeypatch.setattr(text, "TextEncoder", lambda *a, **k: None)
    monkeypatch.setitem(model_module.SPECS, "tiny", SMALL)
    common = ["--minutes", "60", "--batch", "4", "--monitor-every", "0", "--no-eval"]
    assert vg_main(["train", "grounding", "--steps", "2", "--seeds", "3-4", *common,
                    "--out", str(tmp_path / "net")]) == 0
    previous = tmp_path / "net" / "grounding_vglaw_tiny.safetensors"
    for run, seed, steps, total, seeds in (("head1", "7", 3, "3", "3-4, 7"), ("head2", "8", 2, "5", "3-4, 7-8")):
        assert vg_main(["train", "grounding", "--init", str(previous), "--presence-only", "--absent", "0.5",
                        "--seeds", seed, "--steps", str(steps), *common, "--out", str(tmp_path / run)]) == 0
        previous = tmp_path / run / "grounding_vglaw_tiny.safetensors"
        model, meta = load_weights(previous)
        assert model.presence is not None and meta["steps"] == "2" and meta["presence_steps"] == total
        # every seed the network has seen, --init's included: eval refuses them all
        assert meta["train_seeds"] == seeds


def test_camera_choice_tool_scores_each_rule_on_a_bag_about_any_camera(tmp_path, capsys):
    """tools/camera_choice.py: on a `--command-camera any` drive, each frame grounded in all six cameras; the
    node's rule (`best_camera`) is one of the rules it scores, and scores what best_camera picks."""
    import importlib.util
    from pathlib import Path

    from vg_ros.grounding.pipeline import best_camera, save_weights
    from vg_ros.sim.cli import write_bag
    from vg_ros.types import GroundingResult
    spec = importlib.util.spec_from_file_location(
        "camera_choice", Path(__file__).resolve().parents[1] / "tools" / "camera_choice.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    weights = tmp_path / "presence.safetensors"
    save_weights(VGLAW(spec_by_name("tiny", presence_head=True)), weights)
    bag = write_bag(tmp_path / "any.mcap", 6, 0.4, command_every=0.1, command_camera="any", lidar_labels=False).path
    rows = tool.choices(str(bag), str(weights), every=1)
    assert len(rows) >= 3 and all(len(r["score"]) == len(r["presence"]) == 6 for r in rows)
    assert len({r["camera"] for r in rows}) >= 2
    keys = tool.rule_keys(rows)
    assert set(keys) == {"score", "found, score", "presence", "score x presence", "found, score x presence",
                         "score x presence, over the command", "score, over the command"}
    for row, key in zip(rows, keys["found, score x presence"]):
        results = [GroundingResult(0, "c", found=f, score=s, box=np.zeros(4), mask=np.zeros((1, 1), bool),
                                   presence=p) for f, s, p in zip(row["found"], row["score"], row["presence"])]
        assert best_camera(results) == int(np.argmax(key))
    assert tool.main([str(bag), "--weights", str(weights), "--every", "1", "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "found, score x presence" in printed and "own camera" in printed
    report = json.loads((tmp_path / "c.json").read_text())[str(weights)]
    assert report["frames"] == len(rows) and 0 <= report["rules"]["score"]["right_camera"] <= 1
    # the command's camera always shows the target; another may too (/gt/grounding_views): a pick there is right
    assert all(r["shows"][r["camera"]] for r in rows)
    assert all(rule["command_camera"] <= rule["right_camera"] for rule in report["rules"].values())
    assert all(iou == 0.0 for r in rows for iou, shown in zip(r["iou"], r["shows"]) if not shown)
    # --refusal: every frame of the commands (the target may be in another camera or in none) and the
    # published camera's result refused under a mean-evidence threshold
    every = tool.choices(str(bag), str(weights), every=1, all_frames=True)
    assert [r for r in every if r["visible"]] == rows and len(every) >= len(rows)
    refusal = tool.refusal_report(every, thresholds=(0.0, 1.01))
    assert refusal["frames_present"] + refusal["frames_absent"] == len(every)
    assert refusal["by_threshold"]["1.01"]["prec_at_05_present"] == 0.0   # nothing published
    assert refusal["by_threshold"]["0.00"]["prec_at_05_present"] >= 0.0
    assert tool.main([str(bag), "--weights", str(weights), "--every", "1", "--refusal",
                      "--json", str(tmp_path / "r.json")]) == 0
    assert "refusal under a mean evidence" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "r.json").read_text())[str(weights)]["refusal"]["by_threshold"]) == \
        {f"{t:.2f}" for t in tool.REFUSAL_THRESHOLDS}


def test_ground_set_leaves_out_unusable_cameras_and_publishes_the_best(pipeline):
    """grounding.messages.ground_set (node and replay): a missing camera (None) and a foreign encoding are
    left out, counted; the rest are grounded as one batch and the best returned; nothing usable: None. A
    camera without intrinsics is grounded (the 2D outputs do not need them) but marked uncalibrated, and
    `target_position` then refuses a position from it (counted `no_intrinsics`) instead of guessing one."""
    from vg_ros.convert import array_to_image
    from vg_ros.grounding.messages import ground_set, target_position
    from vg_ros.grounding.pipeline import best_camera
    from vg_ros.nodes.inputs import DropCounter
    rng = np.random.default_rng(2)
    rgb = [rng.integers(0, 255, (270, 480, 3), dtype=np.uint8) for _ in range(2)]
    msgs = [array_to_image(rgb[0], "rgb8", stamp_ns=5, frame_id="a", flavor="rosbags"), None,
            array_to_image(rng.random((270, 480), dtype=np.float32), "32FC1", stamp_ns=5, frame_id="b",
                           flavor="rosbags"),
            array_to_image(rgb[1], "rgb8", stamp_ns=6, frame_id="c", flavor="rosbags"),
            array_to_image(rgb[1], "rgb8", stamp_ns=6, frame_id="unknown", flavor="rosbags")]

    def camera_of(index, msg, image):
        return None if msg.header.frame_id == "unknown" else _camera(image.shape[1], image.shape[0])

    pipeline.set_command("the red car")
    drops = DropCounter()
    got = ground_set(pipeline, msgs[:4], [f"/cam{i}" for i in range(4)], camera_of, drops)
    assert dict(drops.drops) == {"bad_image": 1}
    results = pipeline.infer_many([CameraFrame(_camera(), rgb[0], 5), CameraFrame(_camera(), rgb[1], 6)])
    best = best_camera(results)
    assert got.msg is msgs[(0, 3)[best]] and got.frame.stamp_ns == (5, 6)[best] and got.calibrated
    assert np.array_equal(got.result.mask, results[best].mask) and got.rgb.shape == (270, 480, 3)
    assert ground_set(pipeline, [None, msgs[2]], ["/a", "/b"], camera_of, drops) is None
    assert drops.drops["bad_image"] == 2
    # an image too small for the network is left out of its set, not the whole set lost
    tiny = array_to_image(rgb[0][:4, :4], "rgb8", stamp_ns=5, frame_id="t", flavor="rosbags")
    kept = ground_set(pipeline, [tiny, msgs[0]], ["/t", "/a"], camera_of, drops)
    assert kept.msg is msgs[0] and drops.drops["bad_image"] == 3

    alone = ground_set(pipeline, [msgs[4]], ["/cam4"], camera_of, drops)
    assert not alone.calibrated and np.array_equal(alone.result.mask, results[1].mask)
    alone.result.found = True

    class Clouds:   # a cloud exactly at the image's stamp
        def nearest(self, stamp, age):
            return object(), 0.0
    assert target_position(pipeline, alone, Clouds(), 0.1, None, drops) is None
    assert drops.drops["no_intrinsics"] == 1


def test_clouds_are_parsed_on_arrival_and_a_malformed_one_never_stands_in_for_a_good_one():
    """grounding.messages.add_cloud (node and replay): a cloud without a z field is counted `bad_cloud` and
    left out of the buffer, so the image nearest it in time still meets the good cloud beside it."""
    from vg_ros.convert import scan_to_pointcloud2
    from vg_ros.grounding.messages import CloudPoints, add_cloud
    from vg_ros.nodes.inputs import DropCounter, StampedBuffer
    from vg_ros.types import LidarScan
    xyz = np.array([[1.0, 2.0, 3.0], [np.nan, 0.0, 0.0], [4.0, 5.0, 6.0]], np.float32)
    good = scan_to_pointcloud2(LidarScan(xyz=xyz, stamp_ns=100, frame_id="lidar"), flavor="rosbags")
    bad = scan_to_pointcloud2(LidarScan(xyz=xyz, stamp_ns=150, frame_id="lidar"), flavor="rosbags")
    bad.fields = [f for f in bad.fields if f.name != "z"]
    clouds, drops = StampedBuffer(4), DropCounter()
    add_cloud(clouds, bad, drops, "/lidar/points")
    add_cloud(clouds, good, drops, "/lidar/points")
    assert dict(drops.drops) == {"bad_cloud": 1}
    cloud, gap = clouds.nearest(150, 0.1)
    assert isinstance(cloud, CloudPoints) and gap == pytest.approx(50e-9)
    assert cloud.header.frame_id == "lidar" and np.array_equal(cloud.xyz, xyz[[0, 2]])   # finite points only


def test_image_camera_prefers_a_sound_camera_info_then_the_rig():
    """grounding.messages.image_camera (node and replay): CameraInfo of the image's size; a malformed one is
    counted and the rig camera of the frame used; a CameraInfo of another size is ignored; an unknown frame
    has no intrinsics (None)."""
    from vg_ros.convert import array_to_image, camera_model_to_info
    from vg_ros.grounding.messages import image_camera
    from vg_ros.nodes.inputs import DropCounter
    from vg_ros.rig import load_rig
    rig = load_rig()
    cam = rig.cameras[0]
    msg = array_to_image(np.zeros((cam.height // 2, cam.width // 2, 3), np.uint8), "rgb8", frame_id=cam.frame_id)
    w, h = cam.width // 2, cam.height // 2
    drops = DropCounter()
    info = camera_model_to_info(cam.scaled(w, h))
    info.k = [400.0, 0, w / 2, 0, 400.0, h / 2, 0, 0, 1]
    assert image_camera(msg, w, h, info, rig, drops).K[0, 0] == 400.0
    assert np.allclose(image_camera(msg, w, h, camera_model_to_info(cam), rig, drops).K, cam.scaled(w, h).K)
    info.k = [0.0] * 9
    assert np.allclose(image_camera(msg, w, h, info, rig, drops).K, cam.scaled(w, h).K)
    assert dict(drops.drops) == {"bad_camera_info": 1}
    msg.header.frame_id = "somewhere_else"
    assert image_camera(msg, w, h, None, rig, drops) is None


def test_camera_choice_sums_the_evidence_over_the_command():
    """grounding.messages.CameraChoice (node and replay): each camera's score x presence summed over the
    command's sets, an earlier set's halved per half-life of stamp (by time, not per set: a gap lets it fade,
    an out-of-order set decays nothing); a new command starts again; a camera missing from a set keeps its
    decayed sum; half-life 0 is best_camera (found first); one outside [0, 60] s is refused."""
    from vg_ros.grounding.messages import CameraChoice
    from vg_ros.grounding.pipeline import best_camera
    from vg_ros.types import GroundingResult

    def results(*scores, presence=float("nan"), found=None):
        return [GroundingResult(0, "c", found=bool(found[i]) if found else s > 0.5, score=s, box=np.zeros(4),
                                mask=np.zeros((1, 1), bool), presence=presence) for i, s in enumerate(scores)]

    ms = 1_000_000
    choice = CameraChoice(0.1)   # sets 0.1 s apart: half per set
    assert choice.choose("a", ["L", "R"], results(0.9, 0.2), 0) == 0
    assert choice.mean_evidence("L") == pytest.approx(0.9) and choice.mean_evidence("X") == 0.0
    assert choice.choose("a", ["L", "R"], results(0.3, 0.6), 100 * ms) == 0   # L 0.75 against R 0.7: not enough
    assert np.allclose([choice.sums["L"], choice.sums["R"]], [0.75, 0.7])
    # the mean: the sum over the sets' decayed count (0.5 + 1)
    assert np.allclose([choice.mean_evidence("L"), choice.mean_evidence("R")], [0.5, 0.7 / 1.5])
    assert choice.choose("a", ["L", "R"], results(0.3, 0.6), 200 * ms) == 1   # L 0.675, R 0.95
    assert choice.choose("b", ["L", "R"], results(0.5, 0.4), 300 * ms) == 0   # a new command: sums start again
    assert choice.sums == {"L": 0.5, "R": 0.4}
    assert choice.choose("b", ["R"], results(0.1), 400 * ms) == 0 and np.allclose(choice.sums["L"], 0.25)
    assert choice.choose("b", ["L", "R"], results(0.2, 0.2, presence=0.5), 500 * ms) == 1   # L 0.225, R 0.25
    assert np.allclose([choice.sums["L"], choice.sums["R"]], [0.225, 0.25])
    # an out-of-order set decays nothing; after a second without images the old evidence is all but gone
    assert choice.choose("b", ["L", "R"], results(0.1, 0.0), 450 * ms) == 0   # L 0.325, R 0.25
    assert np.allclose([choice.sums["L"], choice.sums["R"]], [0.325, 0.25]) and choice.stamp_ns == 500 * ms
    assert choice.choose("b", ["L", "R"], results(0.3, 0.31), 1500 * ms) == 1
    assert np.allclose([choice.sums["L"], choice.sums["R"]], [0.3 + 0.325 / 1024, 0.31 + 0.25 / 1024])
    # a camera twice as fast with twice the half-life in sets: the same memory in seconds
    fast = CameraChoice(0.1)
    for k in range(3):
        fast.choose("a", ["L"], results(0.4), k * 50 * ms)
    assert np.allclose(fast.sums["L"], 0.4 * (0.5 + 0.5 ** 0.5 + 1))
    with_found = results(0.4, 0.45, found=[True, False])
    assert CameraChoice(0.0).choose("c", ["L", "R"], with_found, 0) == best_camera(with_found) == 0
    for bad in (-0.1, 61.0, float("nan")):
        with pytest.raises(ValueError, match="half-life"):
            CameraChoice(bad)


def test_add_odometry_counts_what_it_cannot_use():
    """grounding.messages.add_odometry (node and replay): a pose of a known child frame goes into the
    PoseBuffer as T_odom_base; an unknown child frame or a non-finite pose is counted `bad_odometry`."""
    from vg_ros.convert import matrix_to_odometry
    from vg_ros.grounding.messages import add_odometry
    from vg_ros.nodes.extrinsics import TfOrRig
    from vg_ros.nodes.inputs import DropCounter, PoseBuffer
    from vg_ros.rig import load_rig

    extrinsics = TfOrRig(load_rig(), "base_link")
    motion, drops = PoseBuffer(), DropCounter()
    T = np.eye(4)
    T[0, 3] = 2.0
    add_odometry(motion, matrix_to_odometry(T, stamp_ns=10, child_frame_id="base_link", flavor="rosbags"),
                 extrinsics, drops, "/odom")
    assert np.allclose(motion.at(10), T)
    add_odometry(motion, matrix_to_odometry(T, stamp_ns=20, child_frame_id="nowhere", flavor="rosbags"),
                 extrinsics, drops, "/odom")
    broken = matrix_to_odometry(T, stamp_ns=30, child_frame_id="base_link", flavor="rosbags")
    broken.pose.pose.position.y = float("nan")
    add_odometry(motion, broken, extrinsics, drops, "/odom")
    assert drops.drops["bad_odometry"] == 2 and motion.at(30) is None


def test_resume_refuses_an_option_spelt_out_at_its_default_that_the_run_did_not_use(tmp_path, capsys):
    """`--resume STATE --steps 6000` of a run started with `--steps 10000`: 6000 is the parser's default, so the
    clash went unseen and the run silently went on to 10000 steps; an option given is compared, whatever its
    value."""
    from vg_ros.checkpoint import save_training_state
    from vg_ros.cli import main as vg_main
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    state = tmp_path / "run.state.safetensors"
    save_training_state(state, {"model": net}, opt, {"step": 3, "elapsed_s": 1.0, "caller": {
        "args": {"steps": 10000, "minutes": 25.0, "batch": 32}, "command": "vg-ros train grounding --steps 10000"}})
    assert vg_main(["train", "grounding", "--resume", str(state), "--steps", "6000"]) == 2   # the default
    assert "drop --steps" in capsys.readouterr().err
    assert vg_main(["train", "grounding", "--resume", str(state), "--steps", "10000", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "drop --batch" in err and "--steps" not in err.split("drop")[1]   # the run's own value: no clash


def test_average_weights_tool_unwritable_out_is_one_line(tmp_path, capsys):
    """OUT a folder, or under a file: exit 2 and one line (were tracebacks from safetensors and mkdir)."""
    import importlib.util
    from pathlib import Path

    from vg_ros.grounding.pipeline import save_weights
    tool = Path(__file__).resolve().parents[1] / "tools" / "average_weights.py"
    spec = importlib.util.spec_from_file_location("average_weights", tool)
    average_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(average_weights)
    torch.manual_seed(0)
    save_weights(VGLAW(SMALL), tmp_path / "a.safetensors", {"train_seeds": "0-9", "phi_zero": "0"})
    (tmp_path / "afile").write_text("")
    inputs = [str(tmp_path / "a.safetensors")] * 2
    for out in (tmp_path, tmp_path / "afile" / "mean.safetensors"):
        assert average_weights.main([str(out), *inputs]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("average_weights: ") and len(err.strip().splitlines()) == 1, err
