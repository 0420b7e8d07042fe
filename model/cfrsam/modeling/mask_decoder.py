"""SAM's mask decoder (segment-anything parameter names) plus the coarse mask features for BGMR.

The decoder keeps SAM's four mask tokens so official checkpoints load, but serving uses the
single-mask path (`multimask_output=False`, token 0). `predict_single` returns, besides the
coarse logits and IoU prediction, the per-prompt coarse mask features that BGMR fuses:
concat([upscaled_embedding * hyper_in, coarse_logit]) at S/4, [P, transformer_dim // 8 + 1,
S/4, S/4]; summing the first transformer_dim // 8 channels gives the coarse logit, so the
features carry the decoder's decision channel by channel.
"""

from typing import List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import LayerNorm2d


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def _run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens out [P, 1 + num_mask_tokens + N, C], upscaled embedding [P, C/8, 4h, 4w])."""
        num_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(num_prompts, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        # One image for all prompts: broadcast instead of repeat_interleave (same values).
        src = image_embeddings.expand(num_prompts, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(num_prompts, -1, -1, -1)
        c, h, w = src.shape[1], src.shape[2], src.shape[3]
        hs, src = self.transformer(src, pos_src, tokens)
        src = src.transpose(1, 2).reshape(num_prompts, c, h, w)
        return hs, self.output_upscaling(src)

    def predict_single(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Single-mask output -> (coarse_logits [P, 4h, 4w], iou [P], coarse_features [P, C/8 + 1, 4h, 4w])."""
        hs, upscaled = self._run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        hyper_in = self.output_hypernetworks_mlps[0](hs[:, 1, :])
        weighted = upscaled * hyper_in[:, :, None, None]
        coarse_logits = weighted.sum(dim=1)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, 0]
        coarse_features = torch.cat([weighted, coarse_logits.unsqueeze(1)], dim=1)
        return coarse_logits, iou_pred, coarse_features

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """segment-anything's interface: (masks [P, M, 4h, 4w], iou_pred [P, M])."""
        hs, upscaled = self._run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in: List[torch.Tensor] = [
            mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)
        ]
        hyper = torch.stack(hyper_in, dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]


class MLP(nn.Module):
    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x
