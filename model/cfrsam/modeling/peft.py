"""Parameter-efficient fine-tuning of the SAM encoder: MALA, LoRA and a bottleneck adapter.

`inject_peft(encoder, cfg)` installs the configured kind into every block. All three start as
the identity on the pretrained model (zero-initialised up-projection / LoRA B), so an adapted
model with untrained adapters computes exactly what the frozen SAM encoder computes.

`configure_trainable(model, backbone_pretrained)` applies the freezing rules.
"""

import math
from typing import Iterable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import PEFTConfig


class MALA(nn.Module):
    """Multi-scale Adaptive Local-aware Adapter (CFR-SAM §3.4), on [B, H, W, D] tokens.

    LayerNorm -> down-projection D -> r -> adaptive multi-scale depth-wise convolution (for each
    kernel size k a generator conv predicts a k x k kernel per channel and per pixel, applied to
    the k x k neighbourhood of that pixel; scales averaged, plus a residual) -> 1x1 conv plus a
    residual -> GELU -> up-projection r -> D -> residual onto the block output.

    Kernels are per channel (not per channel group): the generator for size k is a grouped k x k
    conv with groups = r and r * k * k outputs, i.e. each channel's kernel is predicted from that
    channel's own k x k neighbourhood. This reproduces the paper's trainable-parameter counts for
    ranks 16 / 32 / 64 / 128 (Table 9: 5.6 / 6.5 / 8.3 / 12.1 M for SAM-B, see README).
    The neighbourhoods are gathered by a fixed depth-wise convolution (NeighbourhoodUnfold).
    """

    def __init__(self, dim: int, rank: int, kernel_sizes: Sequence[int] = (3, 5, 7)) -> None:
        super().__init__()
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.rank = rank
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, rank)
        self.kernel_generators = nn.ModuleList(
            nn.Conv2d(rank, rank * k * k, kernel_size=k, padding=k // 2, groups=rank) for k in self.kernel_sizes
        )
        self.unfolds = nn.ModuleList(NeighbourhoodUnfold(rank, k) for k in self.kernel_sizes)
        self.mix = nn.Conv2d(rank, rank, kernel_size=1)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adaptive_conv(self, z: torch.Tensor) -> torch.Tensor:
        """Average over kernel sizes of the per-pixel depth-wise convolution of z [B, r, H, W]."""
        B, r, H, W = z.shape
        total = torch.zeros_like(z)
        for k, generator, unfold in zip(self.kernel_sizes, self.kernel_generators, self.unfolds):
            kernels = generator(z).reshape(B, r, k * k, H, W)
            total = total + (kernels * unfold(z)).sum(dim=2)
        return total / len(self.kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(self.norm(x)).permute(0, 3, 1, 2)
        z = z + self.adaptive_conv(z)
        z = z + self.mix(z)
        z = self.act(z).permute(0, 2, 3, 1)
        return x + self.up(z)


class NeighbourhoodUnfold(nn.Module):
    """[B, C, H, W] -> [B, C, k * k, H, W]: the zero-padded k x k neighbourhood of every pixel.

    Eager PyTorch (training) uses F.unfold. In an exported graph it is a depth-wise convolution
    with k * k one-hot kernels per channel (`by_convolution`), equal to F.unfold exactly since each
    output is one input value times 1: F.unfold exports as Gather ops with 6-D outputs that
    onnxruntime's CPU kernel copies element by element, a third of the encoder's time for under
    0.1 % of its FLOPs, while the convolution runs in MLAS. (In bf16 training the convolution was
    11-20 % slower per MALA layer than F.unfold, hence two paths.)
    """

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.channels, self.k = channels, k
        # A constant, not a weight: kept out of the state dict.
        taps = torch.eye(k * k).reshape(k * k, 1, k, k).repeat(channels, 1, 1, 1)
        self.register_buffer("taps", taps, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            return self.by_convolution(z)
        B, _, H, W = z.shape
        return F.unfold(z, self.k, padding=self.k // 2).reshape(B, self.channels, self.k * self.k, H, W)

    def by_convolution(self, z: torch.Tensor) -> torch.Tensor:
        B, _, H, W = z.shape
        out = F.conv2d(z, self.taps.to(z.dtype), padding=self.k // 2, groups=self.channels)
        return out.reshape(B, self.channels, self.k * self.k, H, W)


class BottleneckAdapter(nn.Module):
    """Houlsby-style adapter after the block: x + up(GELU(down(LN(x))))."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(self.norm(x))))


class LoRAQKV(nn.Linear):
    """The fused qkv projection plus low-rank updates of q and v (SAMed / SAC).

    Subclasses nn.Linear so the frozen weights keep the names `qkv.weight` and `qkv.bias`; the
    low-rank factors are `qkv.lora_{q,v}_{a,b}.weight`. B is zero-initialised.
    """

    def __init__(self, dim: int, rank: int, alpha: float, bias: bool = True) -> None:
        super().__init__(dim, dim * 3, bias=bias)
        self.dim = dim
        self.scaling = alpha / rank
        self.lora_q_a = nn.Linear(dim, rank, bias=False)
        self.lora_q_b = nn.Linear(rank, dim, bias=False)
        self.lora_v_a = nn.Linear(dim, rank, bias=False)
        self.lora_v_b = nn.Linear(rank, dim, bias=False)
        for a in (self.lora_q_a, self.lora_v_a):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_q_b.weight)
        nn.init.zeros_(self.lora_v_b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRAQKV":
        module = cls(linear.in_features, rank, alpha, bias=linear.bias is not None)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        dq = self.lora_q_b(self.lora_q_a(x)) * self.scaling
        dv = self.lora_v_b(self.lora_v_a(x)) * self.scaling
        zeros = torch.zeros_like(dq)
        return qkv + torch.cat([dq, zeros, dv], dim=-1)


PEFT_MODULE_TYPES = (MALA, BottleneckAdapter)


def inject_peft(encoder: nn.Module, cfg: PEFTConfig) -> None:
    """Install the adapters of `cfg.mode` into every block of an ImageEncoderViT."""
    if cfg.mode == "none":
        return
    for block in encoder.blocks:
        dim = block.norm1.normalized_shape[0]
        if cfg.mode == "mala":
            block.adapter = MALA(dim, cfg.mala_rank, cfg.mala_kernel_sizes)
        elif cfg.mode == "adapter":
            block.adapter = BottleneckAdapter(dim, cfg.adapter_dim)
        elif cfg.mode == "lora":
            block.attn.qkv = LoRAQKV.from_linear(block.attn.qkv, cfg.lora_rank, cfg.lora_alpha)
        else:
            raise ValueError(f"unknown PEFT mode {cfg.mode!r}")


def is_peft_parameter(name: str) -> bool:
    """True for parameters that belong to adapters inside the image encoder."""
    return ".adapter." in name or ".lora_" in name


def configure_trainable(model: nn.Module, backbone_pretrained: bool) -> List[str]:
    """Apply the freezing rules and return the names of the trainable parameters.

    With a pretrained backbone (a SAM checkpoint was loaded) the image encoder is frozen, neck
    included, except for its adapters; HMFM, prompt encoder, mask decoder, BGMR and the prompt
    learner (trained in stage 1, its own model) train. Without one, everything trains (full
    training of a small config from scratch).
    """
    trainable = []
    for name, param in model.named_parameters():
        if not backbone_pretrained:
            train = True
        elif name.startswith("image_encoder."):
            train = is_peft_parameter(name)
        else:
            train = True
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable


def count_parameters(params: Iterable[nn.Parameter], trainable_only: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)
