"""SAM-layout checkpoints (with resizing), our own checkpoints, and their error messages."""

import pytest
import torch
import torch.nn.functional as F

from cfrsam import build_cfr_sam
from cfrsam.checkpoint import (
    CheckpointError,
    load_sam_checkpoint,
    read_checkpoint,
    resize_pos_embed,
    resize_rel_pos,
    sam_state_dict,
    save_checkpoint,
)
from cfrsam.configs import make_config
from cfrsam.modeling import CFRSAM

torch.set_num_threads(1)


def sam_like(input_size, name="tiny", **kw):
    """A SAM-layout state dict (what segment-anything's checkpoint holds) from a plain SAM model."""
    torch.manual_seed(3)
    cfg = make_config(name, input_size=input_size, window=32, peft_mode="none", **kw)
    model = CFRSAM.from_config(cfg, with_prompt_learner=False)
    with torch.no_grad():  # non-trivial position tables so resizing is observable
        model.image_encoder.pos_embed.normal_()
        for blk in model.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_()
            blk.attn.rel_pos_w.normal_()
    state = sam_state_dict(model)
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return state


def test_sam_checkpoint_loads_at_another_input_size(tmp_path):
    state = sam_like(128)
    path = tmp_path / "sam_tiny.pth"
    torch.save(state, path)
    model = build_cfr_sam("tiny", sam_checkpoint=str(path), input_size=64, window=32)
    enc = model.image_encoder
    assert enc.pos_embed.shape == (1, 4, 4, 192)
    expected = F.interpolate(
        state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(enc.pos_embed, expected, atol=1e-6)
    # global block (index 2): table resized 2 * 8 - 1 -> 2 * 4 - 1; window block (index 0) unchanged
    glob = enc.blocks[2].attn.rel_pos_h
    assert glob.shape == (7, 64)
    assert torch.allclose(glob, resize_rel_pos(state["image_encoder.blocks.2.attn.rel_pos_h"], 7))
    assert torch.equal(enc.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    assert torch.equal(model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    assert torch.equal(enc.blocks[1].attn.qkv.weight, state["image_encoder.blocks.1.attn.qkv.weight"])
    assert model.backbone_pretrained


def test_sam_checkpoint_into_lora_model_keeps_qkv_names():
    state = sam_like(64)
    model = build_cfr_sam("tiny", sam_checkpoint=state, input_size=64, window=32, peft_mode="lora")
    assert torch.equal(model.image_encoder.blocks[0].attn.qkv.weight, state["image_encoder.blocks.0.attn.qkv.weight"])


def test_b_shaped_checkpoint_with_reduced_depth():
    state = sam_like(128, name="b", depth=2)
    assert state["image_encoder.pos_embed"].shape == (1, 8, 8, 768)
    model = build_cfr_sam("b", sam_checkpoint=state, input_size=64, window=32, depth=2, with_prompt_learner=False)
    assert model.image_encoder.pos_embed.shape == (1, 4, 4, 768)


def test_missing_unexpected_and_mismatched_keys_are_listed():
    state = sam_like(64)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.blocks.99.attn.qkv.weight"] = torch.zeros(3)
    model = CFRSAM.from_config(make_config("tiny", input_size=64), with_prompt_learner=False)
    with pytest.raises(CheckpointError) as err:
        load_sam_checkpoint(model, state)
    msg = str(err.value)
    assert "missing keys (1): mask_decoder.iou_token.weight" in msg
    assert "unexpected keys (1): image_encoder.blocks.99.attn.qkv.weight" in msg
    assert "adapter" not in msg and "hmfm" not in msg and "bgmr" not in msg  # expected to be missing

    wrong = sam_like(64, name="b", depth=2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_sam_checkpoint(model, wrong)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_sam_checkpoint(model, {"foo": torch.zeros(1)})


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(str(tmp_path / "missing.pt"))


def test_own_checkpoint_round_trip(tmp_path):
    model = build_cfr_sam("tiny", input_size=64, window=32, seed=5)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, training={"epochs": 1}, metrics={"aji": 0.5})
    ckpt = read_checkpoint(str(path))
    assert ckpt["training"] == {"epochs": 1} and ckpt["metrics"] == {"aji": 0.5}
    again = build_cfr_sam(None, checkpoint=str(path), seed=6)  # config from the checkpoint
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # the SAM side at another input size: position tables resized, the rest exact (the prompt
    # learner's anchors are laid out for one input size, so it is left out here)
    bigger = build_cfr_sam("tiny", checkpoint=str(path), input_size=128, seed=6, with_prompt_learner=False)
    assert bigger.image_encoder.pos_embed.shape == (1, 8, 8, 192)
    assert torch.equal(bigger.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    with pytest.raises(CheckpointError, match="anchor_points"):
        build_cfr_sam("tiny", checkpoint=str(path), input_size=128)


def test_sam_checkpoint_given_as_our_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(sam_like(64), path)
    with pytest.raises(CheckpointError, match="--sam-checkpoint"):
        read_checkpoint(str(path))


def test_wrong_architecture_checkpoint(tmp_path):
    model = build_cfr_sam("tiny", input_size=64, window=32, peft_mode="lora")
    path = tmp_path / "lora.pt"
    save_checkpoint(str(path), model)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_cfr_sam("tiny", checkpoint=str(path), input_size=64, window=32, peft_mode="mala")


def test_resize_helpers():
    pos = torch.randn(1, 8, 8, 4)
    assert resize_pos_embed(pos, (8, 8)) is pos
    assert resize_pos_embed(pos, (16, 16)).shape == (1, 16, 16, 4)
    rel = torch.randn(15, 4)
    assert resize_rel_pos(rel, 31).shape == (31, 4)
    assert torch.equal(resize_rel_pos(rel, 15), rel)


def test_training_state_reads_as_a_checkpoint(tmp_path):
    # finalize and --init take a run's last.pt (the weights at the end of its schedule) as they
    # take best.pt: its config and weights, the optimiser state left behind.
    from cfrsam.train.common import save_training_state

    model = build_cfr_sam("tiny", input_size=64, window=32, seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path / "last.pt"
    save_training_state(path, model, optimizer, None, 3, {"epoch": 1})
    ckpt = read_checkpoint(str(path))
    assert ckpt["config"] == model.config.to_dict() and ckpt["training"]["epoch"] == 3
    assert ckpt["backbone_pretrained"] is False and "optimizer" not in ckpt
    again = build_cfr_sam(None, checkpoint=str(path), seed=9)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_without_a_conv_stem_loads_into_a_model_with_one(tmp_path):
    # The stem starts at zero, so a trained model gains one without changing what it computes
    # (stage 2's --conv-stem); a checkpoint that has a stem must still fit exactly.
    model = build_cfr_sam("tiny", input_size=64, window=32, seed=1)
    path = tmp_path / "plain.pt"
    save_checkpoint(path, model)
    stemmed = build_cfr_sam(None, checkpoint=str(path), image_encoder__conv_stem=(8, 16))
    assert stemmed.config.image_encoder.conv_stem == (8, 16)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(stemmed.encode(x), model.encode(x))
        stemmed.image_encoder.conv_stem.proj.weight.normal_()
    with_stem = tmp_path / "stem.pt"
    save_checkpoint(with_stem, stemmed)
    again = build_cfr_sam(None, checkpoint=str(with_stem))
    with torch.no_grad():
        assert torch.equal(again.encode(x), stemmed.encode(x))
    state = torch.load(with_stem, map_location="cpu")
    del state["model"]["image_encoder.conv_stem.proj.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="conv_stem.proj.weight"):
        build_cfr_sam(None, checkpoint=str(tmp_path / "partial.pt"))
