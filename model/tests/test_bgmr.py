"""BGMR: shapes, window crops, window/full-frame agreement, deformable conv, ONNX export."""

import io

import onnx
import pytest
import torch
import torch.nn.functional as F

from cfrsam.modeling.bgmr import BGMR, crop_windows
from cfrsam.modeling.deform_conv import DeformConv2d, deform_conv2d, sample_taps_at_once

torch.set_num_threads(1)

EMBED, COARSE, CHANNELS, BOUNDARY = 32, 9, 8, 8


def make_bgmr(seed: int = 0) -> BGMR:
    """A randomly initialised BGMR in eval mode with non-trivial deformable offsets and BN stats
    (a fresh one has zero offsets, which would hide the deformable layers' reach), and
    variance-preserving conv weights so that the output varies across pixels (with PyTorch's
    default init the logits of an untrained stack are nearly constant)."""
    torch.manual_seed(seed)
    bgmr = BGMR(EMBED, COARSE, CHANNELS, BOUNDARY)
    with torch.no_grad():
        for module in bgmr.modules():
            if isinstance(module, (torch.nn.Conv2d, DeformConv2d)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for module in bgmr.modules():
            if isinstance(module, DeformConv2d):
                module.offset_conv.weight.normal_(0.0, 0.3)
                module.offset_conv.bias.normal_(0.0, 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return bgmr.eval()


def image_inputs(size: int, batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, EMBED, size // 16, size // 16, generator=g),
        torch.randn(batch, 3, size, size, generator=g),
    )


def coarse_inputs(size: int, prompts: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(prompts, COARSE, size // 4, size // 4, generator=g)


def test_shapes_full_and_window():
    bgmr = make_bgmr()
    embedding, image = image_inputs(64, batch=2)
    with torch.no_grad():
        semantic, boundary_features = bgmr.image_features(embedding, image)
        assert semantic.shape == (2, CHANNELS, 16, 16)
        assert boundary_features.shape == (2, BOUNDARY, 64, 64)
        semantic, boundary_features = semantic[:1], boundary_features[:1]
        coarse = coarse_inputs(64, 3)
        mask, boundary = bgmr.refine(semantic, boundary_features, coarse)
        assert mask.shape == boundary.shape == (3, 64, 64)
        origins = torch.tensor([[0, 0], [32, 4], [16, 32]])
        mask, boundary = bgmr.refine(semantic, boundary_features, coarse, origins, 32)
        assert mask.shape == boundary.shape == (3, 32, 32)
        mask, boundary = bgmr.refine(semantic, boundary_features, coarse, origins, 32, halo=8)
        assert mask.shape == boundary.shape == (3, 32, 32)
        empty = bgmr.refine(semantic, boundary_features, coarse[:0], origins[:0], 32)
        assert empty[0].shape == (0, 32, 32)


def test_crop_windows_matches_slicing():
    g = torch.Generator().manual_seed(0)
    origins = torch.tensor([[0, 0], [8, 4], [12, 12], [4, 8]])
    window = 16
    per_prompt = torch.randn(4, 3, 7, 7, generator=g)  # 1/4 of a 28-pixel frame
    shared = torch.randn(1, 3, 28, 28, generator=g)
    batch = torch.randn(2, 3, 28, 28, generator=g)
    image_index = torch.tensor([1, 0, 1, 1])
    masks = torch.randn(4, 28, 28, generator=g)

    def sliced(t, p, scale=1):
        x0, y0 = (origins[p] // scale).tolist()
        s = window // scale
        return t[..., y0 : y0 + s, x0 : x0 + s]

    got = crop_windows(per_prompt, origins, window, scale=4)
    assert got.shape == (4, 3, 4, 4)
    got_shared = crop_windows(shared, origins, window)
    got_batch = crop_windows(batch, origins, window, image_index=image_index)
    got_masks = crop_windows(masks, origins, window)
    assert got_masks.shape == (4, 16, 16)
    for p in range(4):
        assert torch.equal(got[p], sliced(per_prompt[p], p, 4))
        assert torch.equal(got_shared[p], sliced(shared[0], p))
        assert torch.equal(got_batch[p], sliced(batch[image_index[p]], p))
        assert torch.equal(got_masks[p], sliced(masks[p], p))


def test_window_matches_full_frame_away_from_the_border():
    size, window = 96, 64
    bgmr = make_bgmr()
    margin = bgmr.window_margin()
    assert 2 * margin < window
    embedding, image = image_inputs(size)
    coarse = coarse_inputs(size, 3)
    origins = torch.tensor([[0, 0], [32, 32], [16, 8]])
    with torch.no_grad():
        semantic, boundary_features = bgmr.image_features(embedding, image)
        full_mask, full_boundary = bgmr.refine(semantic, boundary_features, coarse)
        mask, boundary = bgmr.refine(semantic, boundary_features, coarse, origins, window)
        halo_mask, halo_boundary = bgmr.refine(
            semantic, boundary_features, coarse, origins, window, halo=4 * -(-margin // 4)
        )
    scale = full_mask.abs().max().item()
    report = []
    for p, (x0, y0) in enumerate(origins.tolist()):
        ref_mask = full_mask[p, y0 : y0 + window, x0 : x0 + window]
        ref_boundary = full_boundary[p, y0 : y0 + window, x0 : x0 + window]
        inner = (slice(margin, window - margin),) * 2
        torch.testing.assert_close(mask[p][inner], ref_mask[inner], atol=1e-5 * max(scale, 1), rtol=0)
        torch.testing.assert_close(boundary[p][inner], ref_boundary[inner], atol=1e-5 * max(scale, 1), rtol=0)
        # A halo of at least the margin makes the whole window exact.
        torch.testing.assert_close(halo_mask[p], ref_mask, atol=1e-5 * max(scale, 1), rtol=0)
        torch.testing.assert_close(halo_boundary[p], ref_boundary, atol=1e-5 * max(scale, 1), rtol=0)
        report.append((mask[p] - ref_mask).abs().mean().item())
        # Windows touching the frame edge are exact along that edge too (same zero padding).
        if x0 == 0 and y0 == 0:
            corner = (slice(0, window - margin),) * 2
            torch.testing.assert_close(mask[p][corner], ref_mask[corner], atol=1e-5 * max(scale, 1), rtol=0)
    print(f"window/full mean abs diff over the window per prompt: {report} (max |logit| {scale:.3f})")


def test_image_index_picks_each_prompts_image_and_trains():
    bgmr = make_bgmr()
    embedding, image = image_inputs(64, batch=2)
    coarse = coarse_inputs(64, 4)
    origins = torch.tensor([[0, 0], [32, 4], [16, 32], [8, 8]])
    image_index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        semantic, boundary_features = bgmr.image_features(embedding, image)
        batched = bgmr.refine(semantic, boundary_features, coarse, origins, 32, image_index=image_index)
        batched_full = bgmr.refine(semantic, boundary_features, coarse, image_index=image_index)
        for p in range(4):
            i = image_index[p]
            one = bgmr.refine(
                semantic[i : i + 1], boundary_features[i : i + 1], coarse[p : p + 1], origins[p : p + 1], 32
            )
            one_full = bgmr.refine(semantic[i : i + 1], boundary_features[i : i + 1], coarse[p : p + 1])
            torch.testing.assert_close(batched[0][p], one[0][0])
            torch.testing.assert_close(batched_full[1][p], one_full[1][0])

    bgmr.train()
    semantic, boundary_features = bgmr.image_features(embedding, image)
    mask, boundary = bgmr.refine(semantic, boundary_features, coarse, origins, 32, image_index=image_index)
    (mask.mean() + boundary.mean()).backward()
    assert bgmr.mcbe.base[0].weight.grad is not None
    assert bgmr.semantic_upscaling[0][0].weight.grad is not None
    assert bgmr.bgff.deformable[0].offset_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("origins", [[[2, 0]], [[-4, 0]], [[0, 40]]])
def test_bad_window_origins_are_rejected(origins):
    bgmr = make_bgmr()
    semantic, boundary_features = bgmr.image_features(*image_inputs(64))
    with pytest.raises(ValueError):
        bgmr.refine(semantic, boundary_features, coarse_inputs(64, 1), torch.tensor(origins), 32)


@pytest.mark.parametrize("in_channels,out_channels", [(4, 5), (6, 2)])  # sample first / project first
def test_deform_conv_without_offsets_is_a_plain_conv(in_channels, out_channels):
    torch.manual_seed(0)
    x = torch.randn(2, in_channels, 9, 11)
    layer = DeformConv2d(in_channels, out_channels, modulated=False)  # offset conv starts at zero
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    modulated = DeformConv2d(in_channels, out_channels)
    expected = F.conv2d(x, modulated.weight, padding=1) * 0.5 + modulated.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(modulated(x), expected, atol=1e-5, rtol=1e-5)
    # Integer offsets shift the sampling grid exactly.
    offset = torch.zeros(2, 18, 9, 11)
    offset[:, 1::2] = 1.0  # dx = +1 for every tap
    shifted = deform_conv2d(x, offset, layer.weight, layer.bias)
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), layer.weight, layer.bias)
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels,dilation", [(6, 2, 1), (4, 4, 1), (4, 4, 2)])
def test_sampling_all_taps_at_once_equals_the_tap_loop(in_channels, out_channels, dilation):
    # The export's form of the deformable conv (one grid_sample over N x K maps) against the loop
    # training runs, with offsets reaching past the border and a modulation mask.
    torch.manual_seed(0)
    x = torch.randn(3, in_channels, 10, 13)
    weight = torch.randn(out_channels, in_channels, 3, 3)
    bias = torch.randn(out_channels)
    offset = 3.0 * torch.randn(3, 18, 10, 13)
    mask = torch.rand(3, 9, 10, 13)
    expected = deform_conv2d(x, offset, weight, bias, mask, dilation)
    got = sample_taps_at_once(x, offset, weight, bias, mask, dilation)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sample_taps_at_once(x, offset, weight), deform_conv2d(x, offset, weight), atol=1e-5, rtol=1e-5
    )


def test_deform_conv_receptive_radius_bounds_its_reach():
    torch.manual_seed(0)
    layer = DeformConv2d(3, 3, max_offset=2.0)
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0.0, 2.0)  # saturate tanh: offsets near +-max_offset
    radius = layer.receptive_radius()
    x = torch.randn(1, 3, 21, 21, requires_grad=True)
    layer(x)[0, :, 10, 10].sum().backward()
    reach = x.grad.abs().sum(dim=(0, 1)).nonzero()
    assert (reach - 10).abs().max().item() <= radius


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch 1.13 exporter noise about prim::Constant
def test_onnx_export_with_dynamic_prompts():
    bgmr = make_bgmr()

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bgmr = bgmr

        def forward(self, embedding, image, coarse, origins):
            semantic, boundary_features = self.bgmr.image_features(embedding, image)
            return self.bgmr.refine(semantic, boundary_features, coarse, origins, 32)

    wrapper = Wrapper().eval()
    embedding, image = image_inputs(64)
    # Traced with one prompt, run with three: nothing about P may be baked into the trace.
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (embedding, image, coarse_inputs(64, 1), torch.tensor([[8, 4]])))
        many = (embedding, image, coarse_inputs(64, 3), torch.tensor([[0, 0], [32, 16], [12, 20]]))
        for got, expected in zip(traced(*many), wrapper(*many)):
            torch.testing.assert_close(got, expected)
    inputs = (embedding, image, coarse_inputs(64, 2), torch.tensor([[0, 0], [32, 16]]))
    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper,
        inputs,
        buffer,
        opset_version=17,
        input_names=["image_embedding", "image", "coarse_features", "window_origin"],
        output_names=["mask_logits", "boundary_logits"],
        dynamic_axes={
            "coarse_features": {0: "P"},
            "window_origin": {0: "P"},
            "mask_logits": {0: "P"},
            "boundary_logits": {0: "P"},
        },
    )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model)
    ops = {node.op_type for node in model.graph.node}
    assert {"GridSample", "GatherElements", "Gather"} <= ops
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_param == "P"
