"""Shapes and SAM-equivalence of the SAM-side modules for every config."""

import pytest
import torch
import torch.nn.functional as F

from cfrsam.configs import make_config
from cfrsam.modeling import CFRSAM, HMFM, MALA, BottleneckAdapter, LoRAQKV
from cfrsam.modeling.image_encoder import Attention, ConvStem, ImageEncoderViT, get_rel_pos
from cfrsam.modeling.peft import NeighbourhoodUnfold
from cfrsam.params import parameter_report

torch.set_num_threads(1)


def small(name, **kw):
    """A config of `name` at 64 x 64 input; b and h with two blocks."""
    if name != "tiny":
        kw.setdefault("depth", 2)
    return make_config(name, input_size=64, window=32, **kw)


@pytest.fixture(scope="module")
def models():
    out = {}
    for name in ("tiny", "b", "h"):
        torch.manual_seed(0)
        # The ConvNeXt-S prompt learner of b / h is slow to initialise and is tested on its own.
        out[name] = CFRSAM.from_config(small(name), with_prompt_learner=(name == "tiny")).eval()
    return out


@pytest.mark.parametrize("name", ["tiny", "b", "h"])
def test_stage_shapes(models, name):
    model = models[name]
    cfg = model.config
    S, g, L, D = 64, 4, len(cfg.hmfm.levels), cfg.image_encoder.embed_dim
    image = torch.randn(2, 3, S, S)
    with torch.no_grad():
        features = model.encode(image)
        assert features.shape == (2, L, D, g, g)
        emb, semantic, boundary = model.prepare(features[:1], image[:1])
        assert emb.shape == (1, cfg.decoder.transformer_dim, g, g)
        assert semantic.shape == (1, cfg.bgmr.channels, S // 4, S // 4)
        assert boundary.shape == (1, cfg.bgmr.boundary_channels, S, S)
        coords = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[40.0, 50.0], [44.0, 52.0]], [[5.0, 5.0], [20.0, 30.0]]])
        labels = torch.tensor([[1.0, -1.0], [1.0, 0.0], [2.0, 3.0]])
        for mode, W in (("window", 32), ("full", S)):
            mask, origin, iou, coarse, bnd = model.decode_prompts(emb, semantic, boundary, coords, labels, mode)
            assert mask.shape == (3, W, W) and bnd.shape == (3, W, W)
            assert origin.shape == (3, 2) and origin.dtype == torch.int64
            assert iou.shape == (3,) and coarse.shape == (3, S // 4, S // 4)
        if model.prompt_learner is None:
            return
        out = model.detect(image)
        A = out["points"].shape[1]
        assert out["points"].shape == (2, A, 2) and out["logits"].shape == (2, A, cfg.num_classes + 1)


@pytest.mark.parametrize("name", ["b", "h"])
def test_full_size_parameter_counts(name):
    """Full-depth b / h built on the meta device: SAM's encoder sizes and the paper's order of magnitude."""
    rep = parameter_report(name, modes=("mala",))["mala"]
    sam_encoder = {"b": 89.67e6, "h": 637.03e6}[name]
    assert abs(rep["image_encoder"]["total"] - sam_encoder) / sam_encoder < 1e-3
    assert rep["image_encoder"]["trainable"] == 0
    assert 4.0e6 < rep["mask_decoder"]["total"] < 4.1e6  # SAM's mask decoder: 4.06 M
    stage2 = rep["second_stage"]["trainable"] / 1e6
    assert {"b": 7.5 < stage2 < 9.0, "h": 15.0 < stage2 < 20.0}[name]


def test_window_origins():
    from cfrsam.modeling import window_origins

    coords = torch.tensor(
        [
            [[30.0, 31.0], [0.0, 0.0]],  # positive + padding -> centre (30, 31)
            [[2.0, 3.0], [60.0, 60.0]],  # positive + negative: the negative is ignored
            [[40.0, 40.0], [63.0, 63.0]],  # box corners -> clamped to the frame
            [[10.0, 10.0], [20.0, 20.0]],  # only negatives / padding -> frame centre
        ]
    )
    labels = torch.tensor([[1.0, -1.0], [1.0, 0.0], [2.0, 3.0], [0.0, -1.0]])
    origin = window_origins(coords, labels, 32, 64)
    assert origin.tolist() == [[16, 16], [0, 0], [32, 32], [16, 16]]
    assert (origin % 4 == 0).all()


def reference_embed_points(pe, points, labels, pad):
    """segment-anything's PromptEncoder._embed_points (in-place indexing), as the reference."""
    points = points + 0.5
    if pad:
        points = torch.cat([points, torch.zeros((points.shape[0], 1, 2))], dim=1)
        labels = torch.cat([labels, -torch.ones((labels.shape[0], 1))], dim=1)
    emb = pe.pe_layer._pe_encoding(points / torch.tensor([pe.input_image_size[1], pe.input_image_size[0]]))
    emb[labels == -1] = 0.0
    emb[labels == -1] += pe.not_a_point_embed.weight
    emb[labels == 0] += pe.point_embeddings[0].weight
    emb[labels == 1] += pe.point_embeddings[1].weight
    emb[labels == 2] += pe.point_embeddings[2].weight
    emb[labels == 3] += pe.point_embeddings[3].weight
    return emb


def test_prompt_encoder_matches_sam_semantics(models):
    pe = models["tiny"].prompt_encoder
    with torch.no_grad():
        for w in pe.point_embeddings:
            w.weight.normal_()
        pe.not_a_point_embed.weight.normal_()
    points = torch.rand(4, 3, 2) * 64
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, 0.0], [2.0, 3.0, -1.0], [-1.0, -1.0, 1.0]])
    with torch.no_grad():
        ours = pe.embed_points(points, labels, pad=True)
        ref = reference_embed_points(pe, points, labels, pad=True)
    assert ours.shape == (4, 4, pe.embed_dim)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_single_mask_path_matches_sam_forward(models):
    model = models["tiny"]
    dec, pe = model.mask_decoder, model.prompt_encoder
    emb = torch.randn(1, dec.transformer_dim, 4, 4)
    sparse = pe.embed_points(torch.rand(2, 1, 2) * 64, torch.ones(2, 1))
    dense = pe.dense_no_mask(1)
    with torch.no_grad():
        coarse, iou, feats = dec.predict_single(emb, pe.get_dense_pe(), sparse, dense)
        masks, ious = dec(emb, pe.get_dense_pe(), sparse, dense, multimask_output=False)
    assert torch.allclose(coarse, masks[:, 0], atol=1e-5)
    assert torch.allclose(iou, ious[:, 0], atol=1e-6)
    assert feats.shape == (2, dec.transformer_dim // 8 + 1, 16, 16)
    assert torch.allclose(feats[:, :-1].sum(1), feats[:, -1], atol=1e-5)


def test_rel_pos_and_attention_shapes():
    rel = torch.randn(2 * 8 - 1, 16)
    assert get_rel_pos(8, 8, rel).shape == (8, 8, 16)
    assert get_rel_pos(16, 16, rel).shape == (16, 16, 16)  # interpolated on the fly
    attn = Attention(64, num_heads=4, use_rel_pos=True, input_size=(8, 8))
    assert attn(torch.randn(2, 8, 8, 64)).shape == (2, 8, 8, 64)


def test_neighbourhood_unfold_is_unfold():
    z = torch.randn(2, 3, 6, 7)
    for k in (3, 5, 7):
        unfold = NeighbourhoodUnfold(3, k)
        expected = F.unfold(z, k, padding=k // 2).reshape(2, 3, k * k, 6, 7)
        assert torch.equal(unfold(z), expected) and torch.equal(unfold.by_convolution(z), expected)
        traced = torch.jit.trace(unfold, z)  # what ONNX export records: the convolution
        assert "conv" in str(traced.graph) and torch.equal(traced(z), expected)
    assert NeighbourhoodUnfold(3, 3).state_dict() == {}  # a constant, not a weight
    got = NeighbourhoodUnfold(3, 3)(z)
    assert got.shape == (2, 3, 9, 6, 7)
    # centre tap is the pixel itself; tap (0, 0) is the up-left neighbour (zero padded)
    assert torch.equal(got[:, :, 4], z)
    assert torch.equal(got[:, :, 0, 1:, 1:], z[:, :, :-1, :-1])
    assert (got[:, :, 0, 0, :] == 0).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: MALA(32, 8, (3, 5)),
        lambda: BottleneckAdapter(32, 8),
    ],
)
def test_adapters_start_as_identity(make):
    module = make()
    x = torch.randn(2, 5, 6, 32)
    assert torch.equal(module(x), x)
    with torch.no_grad():
        module.up.weight.normal_()
    assert not torch.allclose(module(x), x)


def test_conv_stem_starts_at_zero_then_adds_to_the_patch_embedding():
    torch.manual_seed(0)
    plain = ImageEncoderViT(img_size=64, embed_dim=32, depth=1, num_heads=2, out_chans=16, window_size=4)
    stem = ImageEncoderViT(
        img_size=64, embed_dim=32, depth=1, num_heads=2, out_chans=16, window_size=4, conv_stem=(8, 16)
    )
    stem.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    assert stem.conv_stem(x).shape == (2, 4, 4, 32)  # the patch grid, channels last like PatchEmbed
    assert torch.equal(stem(x), plain(x))
    stem(x).square().sum().backward()
    assert stem.conv_stem.proj.weight.grad.abs().sum() > 0  # the zero projection is where it starts learning
    with torch.no_grad():
        stem.conv_stem.proj.weight.normal_()
    assert not torch.allclose(stem(x), plain(x))
    with pytest.raises(ValueError, match="stride 16"):
        ConvStem(3, (4, 8, 16, 32, 64, 128), 32)


def test_mala_is_input_adaptive():
    torch.manual_seed(0)
    mala = MALA(16, 4, (3,))
    with torch.no_grad():
        mala.up.weight.normal_()
    x = torch.randn(1, 6, 6, 16)
    # quadratic in its input: kernels are generated from the same features they are applied to
    assert not torch.allclose(mala(2 * x) - 2 * x, 2 * (mala(x) - x), atol=1e-4)


def test_lora_keeps_weights_and_starts_as_identity():
    linear = torch.nn.Linear(32, 96)
    lora = LoRAQKV.from_linear(linear, rank=4, alpha=4.0)
    x = torch.randn(3, 32)
    assert torch.allclose(lora(x), linear(x), atol=1e-6)
    assert {"weight", "bias"} <= set(dict(lora.named_parameters()))
    with torch.no_grad():
        lora.lora_v_b.weight.normal_()
    delta = lora(x) - linear(x)
    assert delta[:, :64].abs().max() == 0  # q and k untouched, v changed
    assert delta[:, 64:].abs().max() > 0


def test_hmfm_untrained_reproduces_sam_embedding(models):
    """weighted HMFM at init + SAM's neck == neck(last level): training starts at SAM."""
    model = models["tiny"]
    features = torch.randn(1, 3, 192, 4, 4)
    with torch.no_grad():
        ours = model.image_encoder.neck(model.hmfm(features))
        sam = model.image_encoder.neck(features[:, -1])
    assert torch.allclose(ours, sam, atol=1e-4)
    plain = HMFM(192, 3, aggregate="sum")
    assert plain(features).shape == (1, 192, 4, 4)
    assert plain.level_weights is None


def test_window_and_full_refinement_agree_in_the_interior(models):
    from cfrsam.modeling import refinement_agreement

    model = models["tiny"]
    coords = torch.tensor([[[20.0, 22.0]], [[40.0, 36.0]]])
    labels = torch.ones(2, 1)
    result = refinement_agreement(model, torch.randn(1, 3, 64, 64), coords, labels)
    assert result["window"] == 32 and result["prompts"] == 2
    assert result["interior_mean_abs_prob_diff"] < 1e-5
    assert 0.0 <= result["mean_iou"] <= 1.0
