"""Modulated deformable convolution (DCNv2) written with F.grid_sample.

torchvision's `deform_conv2d` has no ONNX export; `grid_sample` exports as GridSample (opset 16+),
which onnxruntime runs on CPU and GPU. The convolution is computed as one bilinear sampling per kernel tap, combined
with that tap's 1x1 slice of the weight, summed. Looping over the taps keeps peak memory near one
input-sized buffer instead of the K-times-larger im2col buffer (and measured faster on CPU than
one grid_sample over all taps).

Traced for export, the taps are sampled by one grid_sample over a batch of N x K (`sample_taps_at_once`),
the per-tap weights applied first: two GridSample ops in decoder_prompts instead of eighteen, which
onnxruntime's CPU runs a little faster (the README's Benchmarks, "Graphs made cheaper"). Eager
training keeps the loop, which measured faster in PyTorch.

A layer whose weight does not shrink the channels (Cout >= Cin), where projecting first saves
nothing, exports as ONNX's own DeformConv (opset 19; onnxruntime >= 1.25 runs it on CPU and CUDA)
when `native_deform_conv_export()` is on: its im2col and matrix product ran BGMR's 8 -> 8 layer
1.8x faster than GridSample on this CPU, with the same values to 6e-6. torch 1.13 exports up to
opset 17 and checks ops against it, so the op is traced in a placeholder domain
(NATIVE_OP_DOMAIN) that `cfrsam.export.onnx_files.to_opset19` turns into the standard op.

Offsets are bounded: `max_offset * tanh(raw)`. Unbounded offsets give a layer an unbounded
receptive field; with a bound, a stack of these layers has a known receptive radius, which is what
lets BGMR refine a window around a prompt and still agree exactly with full-frame refinement away
from the window border.
"""

import contextlib
import math
import warnings
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# Export-time switch (see the module docstring): off for eager use and for exports that must run
# on onnxruntime without DeformConv.
_native_export = False

#: The placeholder domain of ops traced for a later opset than torch 1.13 exports.
NATIVE_OP_DOMAIN = "cfrsam_native"


@contextlib.contextmanager
def native_deform_conv_export(enabled: bool = True) -> Iterator[None]:
    """While tracing in this context, layers with Cout >= Cin export as a DeformConv node."""
    global _native_export
    previous, _native_export = _native_export, enabled
    try:
        yield
    finally:
        _native_export = previous


class _NativeDeformConv(torch.autograd.Function):
    """Traced as one DeformConv node (in NATIVE_OP_DOMAIN); computes `sample_taps_at_once`."""

    @staticmethod
    def forward(ctx, x, weight, offset, bias, mask, dilation: int):  # type: ignore[override]
        return sample_taps_at_once(x, offset, weight, bias, mask, dilation)

    @staticmethod
    def symbolic(g, x, weight, offset, bias, mask, dilation: int):  # type: ignore[override]
        return g.op(
            f"{NATIVE_OP_DOMAIN}::DeformConv",
            x,
            weight,
            offset,
            bias,
            mask,
            kernel_shape_i=[3, 3],
            pads_i=[dilation] * 4,
            dilations_i=[dilation, dilation],
            strides_i=[1, 1],
            group_i=1,
            offset_group_i=1,
        )


def static_dim(dim) -> int:
    """A size the graph keeps fixed (channels, kernel, frame size) as a Python int, also while
    tracing for ONNX export, where sizes are traced values (and int() warns)."""
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(dim)
    return int(dim)


def tap_shift(k: int, kh: int, kw: int, dilation: int) -> tuple:
    """(dy, dx) of tap k (row-major) from the output pixel, before its learned offset."""
    i, j = divmod(k, kw)
    return float((i - (kh - 1) // 2) * dilation), float((j - (kw - 1) // 2) * dilation)


def sampling_grid(py: torch.Tensor, px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample's grid [..., 2] (x, y) for pixel coordinates py, px: with align_corners=False,
    pixel index p sits at normalised (2p + 1) / size - 1."""
    return torch.stack(((2.0 * px + 1.0) / width - 1.0, (2.0 * py + 1.0) / height - 1.0), dim=-1)


def project_taps(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each tap's 1x1 slice of the weight applied to x: [N, K*Cout, H, W], tap-major (channels
    k*Cout .. (k+1)*Cout-1 are tap k)."""
    cout, _, kh, kw = (static_dim(d) for d in weight.shape)
    return F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(kh * kw * cout, -1, 1, 1))


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    dilation: int = 1,
) -> torch.Tensor:
    """Stride-1, 'same'-padded deformable convolution.

    x [N,Cin,H,W]; offset [N,2K,H,W] as (dy, dx) pairs per tap in row-major tap order (the
    torchvision layout); weight [Cout,Cin,kh,kw] with K = kh*kw; mask [N,K,H,W] or None (DCNv1).
    Samples outside the input read zero, like the zero padding of a plain convolution.

    Bilinear sampling commutes with a per-pixel linear map, so when Cout < Cin each tap's 1x1
    weight is applied first and only Cout channels are sampled per tap (grid_sample dominates the
    cost); the result is the same up to float rounding.
    """
    _, _, height, width = x.shape
    cout, cin, kh, kw = (static_dim(d) for d in weight.shape)
    taps = kh * kw
    if torch.jit.is_tracing() and _native_export and cout >= cin and kh == kw == 3 and mask is not None:
        if bias is None:
            bias = torch.zeros(cout, dtype=x.dtype, device=x.device)
        return _NativeDeformConv.apply(x, weight, offset, bias, mask, dilation)
    if torch.jit.is_tracing() and cout <= cin:
        return sample_taps_at_once(x, offset, weight, bias, mask, dilation)
    project_first = cout < cin
    if project_first:
        projected = project_taps(x, weight)
    ys = torch.arange(height, dtype=x.dtype, device=x.device).view(1, height, 1)
    xs = torch.arange(width, dtype=x.dtype, device=x.device).view(1, 1, width)
    out: Optional[torch.Tensor] = None
    for k in range(taps):
        i, j = divmod(k, kw)
        dy, dx = tap_shift(k, kh, kw, dilation)
        grid = sampling_grid(ys + dy + offset[:, 2 * k], xs + dx + offset[:, 2 * k + 1], height, width)
        if project_first:
            term = F.grid_sample(
                projected[:, k * cout : (k + 1) * cout],
                grid,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
            if mask is not None:
                term = term * mask[:, k : k + 1]
        else:
            sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if mask is not None:
                sampled = sampled * mask[:, k : k + 1]
            term = F.conv2d(sampled, weight[:, :, i : i + 1, j : j + 1])
        out = term if out is None else out + term
    assert out is not None
    if bias is not None:
        out = out + bias.view(1, cout, 1, 1)
    return out


def sample_taps_at_once(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    dilation: int = 1,
) -> torch.Tensor:
    """`deform_conv2d` for Cout <= Cin with one grid_sample for all K taps: each tap's 1x1 weight
    applied first ([N, K*Cout, H, W], tap-major), then the N*K maps of Cout channels sampled at
    once and summed over the taps. Equal to the tap loop up to float rounding (the same samples,
    summed in another order); the export's form (see the module docstring)."""
    cout, _, kh, kw = (static_dim(d) for d in weight.shape)
    height, width = static_dim(x.shape[2]), static_dim(x.shape[3])
    taps = kh * kw
    shifts = torch.tensor([tap_shift(k, kh, kw, dilation) for k in range(taps)], dtype=x.dtype, device=x.device)
    ys = torch.arange(height, dtype=x.dtype, device=x.device).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=x.dtype, device=x.device).view(1, 1, 1, width)
    py = ys + shifts[:, 0].view(1, taps, 1, 1) + offset[:, 0::2]
    px = xs + shifts[:, 1].view(1, taps, 1, 1) + offset[:, 1::2]
    grid = sampling_grid(py, px, height, width)
    sampled = F.grid_sample(
        project_taps(x, weight).reshape(-1, cout, height, width),
        grid.reshape(-1, height, width, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).reshape(-1, taps, cout, height, width)
    if mask is not None:
        sampled = sampled * mask.unsqueeze(2)
    out = sampled.sum(1)
    if bias is not None:
        out = out + bias.view(1, cout, 1, 1)
    return out


class DeformConv2d(nn.Module):
    """Deformable k x k convolution whose offsets (and DCNv2 modulation) come from a plain conv
    on the same input.

    The offset conv starts at zero, so an untrained layer is a plain convolution (scaled by 0.5 in
    the modulated variant, sigmoid(0)), as in DCNv2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        bias: bool = True,
        modulated: bool = True,
        max_offset: float = 4.0,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.modulated = modulated
        self.max_offset = float(max_offset)
        taps = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.offset_conv = nn.Conv2d(
            in_channels,
            (3 if modulated else 2) * taps,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
        )
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * taps)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def receptive_radius(self) -> int:
        """How far (pixels) an output pixel can see: a tap's reach plus the largest offset, rounded
        up to the bilinear neighbour (the offset conv's own reach is smaller)."""
        return self.dilation * (self.kernel_size // 2) + math.ceil(self.max_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.kernel_size * self.kernel_size
        raw = self.offset_conv(x)
        offset = self.max_offset * torch.tanh(raw[:, : 2 * taps])
        mask = torch.sigmoid(raw[:, 2 * taps :]) if self.modulated else None
        return deform_conv2d(x, offset, self.weight, self.bias, mask, self.dilation)

    def extra_repr(self) -> str:
        cout, cin, k, _ = self.weight.shape
        return (
            f"{cin}, {cout}, kernel_size={k}, dilation={self.dilation}, "
            f"modulated={self.modulated}, max_offset={self.max_offset}"
        )
