"""Boundary-Guided Mask Refinement (BGMR), paper §3.6.

BGMR is split along what depends on the prompt:

- `image_features` (once per image, `decoder_image` graph): the 1/16 image embedding upsampled to a
  1/4 semantic feature, and MCBE boundary features at full resolution from the pixels.
- `refine` (per prompt, `decoder_prompts` graph): fuse the semantic feature with the prompt's coarse
  mask features at 1/4, upsample to full resolution (F_u), BGFF with the boundary features (F_g,
  supervised boundary logits), boundary-weighted residual bottleneck and the mask head.

Every per-prompt layer is local, so `refine` can work on a W x W window around each prompt instead
of the whole frame: the prompt-independent inputs are cropped, not recomputed, and only the
per-prompt layers see the window border. Their zero padding there differs from the real neighbours
a full-frame run sees; `BGMR.window_margin()` is the distance from the border beyond which the two
modes agree (up to float rounding). An optional `halo` refines a larger window and returns its
centre, trading compute for agreement near the border.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .deform_conv import DeformConv2d, static_dim


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def deform_bn_relu(in_channels: int, out_channels: int, max_offset: float) -> nn.Sequential:
    return nn.Sequential(
        DeformConv2d(in_channels, out_channels, 3, bias=False, max_offset=max_offset),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def crop_windows(
    tensor: torch.Tensor,
    origins: torch.Tensor,
    window: int,
    scale: int = 1,
    image_index: Optional[torch.Tensor] = None,
    shared: Optional[bool] = None,
) -> torch.Tensor:
    """Crop one window per prompt, with ops that export to ONNX with a dynamic prompt count.

    tensor: [N,C,H,W] or [N,H,W] at 1/scale of the input resolution. origins: [P,2] int64 (x0, y0)
    in input pixels, multiples of `scale`, windows inside the frame (not checked here: an index
    out of range fails in Gather). window: side in input pixels, a multiple of `scale`.
    Which image each prompt reads: `image_index` [P] if given; else with `shared` (default: N == 1)
    the one image, broadcast over prompts; else prompt p reads entry p (N == P). Pass
    shared=False for per-prompt tensors: under tracing an example with one prompt would otherwise
    bake the broadcast into the graph.
    Returns [P,C,window/scale,window/scale] (or [P,...,...] for 3-D input).
    """
    squeeze = tensor.dim() == 3
    if squeeze:
        tensor = tensor.unsqueeze(1)
    channels, height, width = (static_dim(d) for d in tensor.shape[1:])
    size = window // scale
    if scale != 1:
        origins = torch.div(origins, scale, rounding_mode="trunc")  # origins are >= 0
    steps = torch.arange(size, dtype=torch.long, device=tensor.device)
    rows = origins[:, 1:2] + steps  # [P,size]
    cols = origins[:, 0:1] + steps
    flat = (rows.unsqueeze(2) * width + cols.unsqueeze(1)).reshape(-1, size * size)  # [P,size*size]
    if shared is None:
        shared = static_dim(tensor.shape[0]) == 1
    if image_index is not None:
        flat = flat + image_index.to(torch.long).unsqueeze(1) * (height * width)
        source = tensor.transpose(0, 1).reshape(channels, -1)
    elif shared:
        source = tensor.reshape(channels, height * width)
    else:
        index = flat.unsqueeze(1).expand(-1, channels, -1)
        out = torch.gather(tensor.reshape(-1, channels, height * width), 2, index)
        out = out.reshape(-1, channels, size, size)
        return out.squeeze(1) if squeeze else out
    out = source.index_select(1, flat.reshape(-1)).reshape(channels, -1, size, size).transpose(0, 1)
    return out.squeeze(1) if squeeze else out


def _per_prompt(tensor: torch.Tensor, prompts: torch.Tensor, image_index: Optional[torch.Tensor]) -> torch.Tensor:
    """The image tensor of each prompt (full-frame mode): broadcast a batch of one or pick by index."""
    if image_index is not None:
        return tensor.index_select(0, image_index.to(torch.long))
    if static_dim(tensor.shape[0]) == 1:
        return tensor.expand(prompts.shape[0], -1, -1, -1)
    return tensor


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel mean and max -> k x k conv -> sigmoid gate."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]), dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class MultiContextBoundaryEnhancement(nn.Module):
    """MCBE (§3.6.2): boundary cues from the pixels at full resolution.

    F0 = conv(image), F1 = conv(F0), F_{i+1} = conv(AvgPool3x3(F_i)); the smoothed levels go through
    Boundary Enhancement BE(X) = X - AvgPool3x3(X); [F1, BE(F2), ...] -> 1x1 conv, + F0.
    """

    def __init__(self, in_channels: int = 3, channels: int = 16, levels: int = 3) -> None:
        super().__init__()
        self.base = conv_bn_relu(in_channels, channels)
        self.shallow = conv_bn_relu(channels, channels)
        self.smoothing = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(levels))
        # Excluding the zero padding from the average keeps BE from firing on the frame edge.
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.project = nn.Sequential(
            nn.Conv2d(channels * (levels + 1), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        base = self.base(image)
        level = self.shallow(base)
        contexts = [level]
        for conv in self.smoothing:
            level = conv(self.pool(level))
            contexts.append(level - self.pool(level))
        return base + self.project(torch.cat(contexts, dim=1))


class BoundaryGuidedFeatureFusion(nn.Module):
    """BGFF (§3.6.3): the upsampled mask feature in two channel groups, each concatenated with the
    boundary features; one fused by a plain conv, one by a deformable conv; spatial attention on
    each; concatenated and fused into F_g."""

    def __init__(self, channels: int, boundary_channels: int, max_offset: float = 4.0) -> None:
        super().__init__()
        self.split = channels // 2
        group_in = self.split + boundary_channels
        self.plain = conv_bn_relu(group_in, self.split)
        self.deformable = deform_bn_relu(group_in, self.split, max_offset)
        self.plain_attention = SpatialAttention()
        self.deformable_attention = SpatialAttention()
        self.fuse = conv_bn_relu(2 * self.split, channels)

    def forward(self, upsampled: torch.Tensor, boundary_features: torch.Tensor) -> torch.Tensor:
        first, second = upsampled[:, : self.split], upsampled[:, self.split :]
        first = self.plain_attention(self.plain(torch.cat((first, boundary_features), dim=1)))
        second = self.deformable_attention(self.deformable(torch.cat((second, boundary_features), dim=1)))
        return self.fuse(torch.cat((first, second), dim=1))


class BGMR(nn.Module):
    """Boundary-Guided Mask Refinement.

    embed_dim: channels of the image embedding (1/16). coarse_dim: channels of the per-prompt coarse
    mask features (1/4) from the mask decoder. channels: width of the mask-feature path (even).
    boundary_channels: width of the MCBE features. The semantic feature has `channels` channels.
    """

    def __init__(
        self,
        embed_dim: int,
        coarse_dim: int,
        channels: int = 16,
        boundary_channels: int = 16,
        mcbe_levels: int = 3,
        max_offset: float = 4.0,
    ) -> None:
        super().__init__()
        if channels % 2 != 0 or channels < 2:
            raise ValueError(f"channels must be even (BGFF splits it in two groups), got {channels}")
        half = channels // 2
        self.embed_dim = embed_dim
        self.coarse_dim = coarse_dim
        self.semantic_dim = channels
        self.boundary_dim = boundary_channels
        # Image part (prompt-independent).
        self.semantic_upscaling = nn.ModuleList((conv_bn_relu(embed_dim, channels), conv_bn_relu(channels, channels)))
        self.mcbe = MultiContextBoundaryEnhancement(3, boundary_channels, mcbe_levels)
        # Prompt part.
        self.coarse_fusion = conv_bn_relu(channels + coarse_dim, channels)
        self.mask_upscaling = nn.ModuleList((conv_bn_relu(channels, channels), conv_bn_relu(channels, channels)))
        self.bgff = BoundaryGuidedFeatureFusion(channels, boundary_channels, max_offset)
        self.boundary_head = nn.Sequential(conv_bn_relu(channels, half), nn.Conv2d(half, 1, 1))
        self.bottleneck = nn.Sequential(
            conv_bn_relu(channels, half, kernel_size=1),
            deform_bn_relu(half, half, max_offset),
            nn.Conv2d(half, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.mask_head = nn.Sequential(
            conv_bn_relu(channels, channels), conv_bn_relu(channels, channels), nn.Conv2d(channels, 1, 1)
        )

    # ---- image part --------------------------------------------------------------------------
    def image_features(self, image_embedding: torch.Tensor, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding [B,embed_dim,S/16,S/16], image [B,3,S,S] (normalised pixels) ->
        semantic [B,channels,S/4,S/4], boundary_features [B,boundary_channels,S,S]."""
        semantic = image_embedding
        for conv in self.semantic_upscaling:
            semantic = conv(upsample2x(semantic))
        return semantic, self.mcbe(image)

    # ---- prompt part -------------------------------------------------------------------------
    def refine(
        self,
        semantic: torch.Tensor,
        boundary_features: torch.Tensor,
        coarse_features: torch.Tensor,
        window_origin: Optional[torch.Tensor] = None,
        window: Optional[int] = None,
        image_index: Optional[torch.Tensor] = None,
        halo: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Refine each prompt's coarse mask.

        semantic [1 or B,Cs,S/4,S/4], boundary_features [1 or B,Cb,S,S], coarse_features
        [P,Cc,S/4,S/4]. A batch of one is shared by all prompts; with B images, `image_index` [P]
        names each prompt's image. Full-frame mode (window None): returns mask_logits and
        boundary_logits [P,S,S]. Window mode: window_origin [P,2] int64 (x0, y0), multiples of 4,
        window inside the frame; window a multiple of 4; returns [P,W,W] for the window. halo (a
        multiple of 4) refines a window larger by `halo` on each side (kept inside the frame) and
        returns its W x W part at the origin; with halo >= window_margin() the result equals
        full-frame refinement.
        """
        size = static_dim(boundary_features.shape[-1])
        if window is None:
            semantic = _per_prompt(semantic, coarse_features, image_index)
            boundary_features = _per_prompt(boundary_features, coarse_features, image_index)
            mask, boundary = self._refine(semantic, boundary_features, coarse_features)
            return mask.squeeze(1), boundary.squeeze(1)
        if window_origin is None:
            raise ValueError("window mode needs window_origin [P,2]")
        if window % 4 != 0 or halo % 4 != 0 or not 0 < window <= size:
            raise ValueError(f"window ({window}) and halo ({halo}) must be multiples of 4, window in 4..{size}")
        window_origin = window_origin.to(torch.long)
        if not torch.jit.is_tracing():
            _check_origins(window_origin, window, size)
        extent = min(window + 2 * halo, size)
        origin = window_origin
        if extent > window:
            origin = torch.clamp(window_origin - halo, min=0, max=size - extent)
        semantic = crop_windows(semantic, origin, extent, 4, image_index)
        boundary_features = crop_windows(boundary_features, origin, extent, 1, image_index)
        coarse = crop_windows(coarse_features, origin, extent, 4, shared=False)
        mask, boundary = self._refine(semantic, boundary_features, coarse)
        if extent > window:
            both = crop_windows(torch.cat((mask, boundary), dim=1), window_origin - origin, window, shared=False)
            mask, boundary = both[:, :1], both[:, 1:]
        return mask.squeeze(1), boundary.squeeze(1)

    def _refine(
        self, semantic: torch.Tensor, boundary_features: torch.Tensor, coarse: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        fused = self.coarse_fusion(torch.cat((semantic, coarse), dim=1))
        for conv in self.mask_upscaling:
            fused = conv(upsample2x(fused))
        guided = self.bgff(fused, boundary_features)
        boundary_logits = self.boundary_head(guided)
        refined = fused + self.bottleneck(torch.sigmoid(guided) * fused)
        return self.mask_head(refined), boundary_logits

    def forward(
        self,
        image_embedding: torch.Tensor,
        image: torch.Tensor,
        coarse_features: torch.Tensor,
        window_origin: Optional[torch.Tensor] = None,
        window: Optional[int] = None,
        image_index: Optional[torch.Tensor] = None,
        halo: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_features + refine in one call (training)."""
        semantic, boundary_features = self.image_features(image_embedding, image)
        return self.refine(semantic, boundary_features, coarse_features, window_origin, window, image_index, halo)

    # ---- window geometry ---------------------------------------------------------------------
    def window_margin(self) -> int:
        """Distance (input pixels) from the window border beyond which window-mode refinement
        equals full-frame refinement, for both outputs; conservative.

        The crops of the semantic, coarse and boundary features are exact; only the per-prompt
        layers pad at the window border. Walking the layers from the inputs: a 3x3 conv moves the
        exact region in by one pixel of its resolution; a bilinear x2 upsample (align_corners=False)
        maps exact margin m to 2m + 1 one level finer.
        """
        margin = 1  # coarse_fusion at 1/4
        for _ in self.mask_upscaling:
            margin = 2 * margin + 1 + 1  # upsample, 3x3 conv
        bgff = self.bgff
        branch = max(1, bgff.deformable[0].receptive_radius()) + bgff.plain_attention.conv.kernel_size[0] // 2
        guided = branch + 1  # fuse conv
        boundary = guided + 1  # boundary head 3x3
        refined = guided + self.bottleneck[1][0].receptive_radius()
        mask = refined + 2  # two 3x3 convs in the mask head
        return margin + max(boundary, mask)


def _check_origins(origins: torch.Tensor, window: int, size: int) -> None:
    if origins.dim() != 2 or origins.shape[1] != 2:
        raise ValueError(f"window_origin must be [P,2] (x0, y0), got {tuple(origins.shape)}")
    if origins.numel() == 0:
        return
    if bool((origins % 4 != 0).any()):
        raise ValueError("window origins must be multiples of 4")
    if bool((origins < 0).any()) or bool((origins > size - window).any()):
        raise ValueError(f"windows of {window} px must lie inside the {size} px frame")
