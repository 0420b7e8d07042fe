"""Freezing rules per PEFT mode, and one optimisation step of the SAM side."""

import pytest
import torch
import torch.nn.functional as F

from cfrsam import build_cfr_sam
from cfrsam.checkpoint import sam_state_dict
from cfrsam.configs import make_config
from cfrsam.modeling import CFRSAM, configure_trainable

torch.set_num_threads(1)


def tiny(**kw):
    return make_config("tiny", input_size=64, window=32, **kw)


@pytest.fixture(scope="module")
def sam_weights():
    torch.manual_seed(1)
    return sam_state_dict(CFRSAM.from_config(tiny(peft_mode="none"), with_prompt_learner=False))


@pytest.mark.parametrize("mode", ["mala", "lora", "adapter", "none"])
def test_freezing_with_pretrained_backbone(mode, sam_weights):
    model = build_cfr_sam(tiny(peft_mode=mode), sam_checkpoint=sam_weights)
    assert model.backbone_pretrained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith("image_encoder.") for n in frozen)
    assert "image_encoder.neck.0.weight" in frozen and "image_encoder.blocks.0.attn.qkv.weight" in frozen
    encoder_trainable = {n for n in trainable if n.startswith("image_encoder.")}
    expected_marker = {"mala": ".adapter.", "adapter": ".adapter.", "lora": ".lora_", "none": None}[mode]
    if expected_marker is None:
        assert not encoder_trainable
    else:
        assert encoder_trainable and all(expected_marker in n for n in encoder_trainable)
    for prefix in ("hmfm.", "prompt_encoder.", "mask_decoder.", "bgmr.", "prompt_learner."):
        assert any(n.startswith(prefix) for n in trainable)
        assert not any(n.startswith(prefix) for n in frozen)


def test_everything_trains_without_a_backbone_checkpoint():
    model = build_cfr_sam(tiny())
    assert not model.backbone_pretrained
    assert all(p.requires_grad for p in model.parameters())
    configure_trainable(model, backbone_pretrained=True)
    assert not model.image_encoder.patch_embed.proj.weight.requires_grad


@pytest.mark.parametrize("refinement", ["window", "full"])
def test_one_step_lowers_the_loss(refinement, sam_weights):
    torch.manual_seed(0)
    model = build_cfr_sam(tiny(), sam_checkpoint=sam_weights).train()
    model.prompt_learner.requires_grad_(False)
    S = 64
    image = torch.randn(2, 3, S, S)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    centres = torch.tensor([[[20.0, 20.0], [44.0, 40.0]], [[30.0, 34.0], [12.0, 50.0]]])  # [B, P, 2]
    target = (((xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2) < 36).float()
    coords = centres.unsqueeze(2)  # [B, P, 1, 2]
    labels = torch.ones(2, 2, 1)

    def loss_fn():
        out = model(image, coords, labels, refinement=refinement)
        W = out["mask_logits"].shape[-1]
        ox, oy = out["window_origin"][..., 0], out["window_origin"][..., 1]
        refined_target = torch.stack(
            [
                torch.stack([target[b, p, oy[b, p] : oy[b, p] + W, ox[b, p] : ox[b, p] + W] for p in range(2)])
                for b in range(2)
            ]
        )
        coarse_target = F.avg_pool2d(target, 4)
        return (
            F.binary_cross_entropy_with_logits(out["mask_logits"], refined_target)
            + F.binary_cross_entropy_with_logits(out["coarse_logits"], coarse_target)
            + F.binary_cross_entropy_with_logits(out["boundary_logits"], refined_target)
        )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    before = loss_fn()
    optimizer.zero_grad()
    before.backward()
    assert model.image_encoder.blocks[0].adapter.up.weight.grad.abs().sum() > 0
    assert model.image_encoder.blocks[0].attn.qkv.weight.grad is None
    optimizer.step()
    with torch.no_grad():
        after = loss_fn()
    assert after.item() < before.item()
