"""SAM's prompt encoder (segment-anything parameter names), written without in-place indexing.

Point labels follow SAM: 1 positive, 0 negative, 2 / 3 top-left / bottom-right box corner, -1 a
padding point (gets `not_a_point_embed` and no positional encoding). A box is two corner points,
so every prompt is a [N, 2] set of points with labels, and batches of prompts are [P, N, 2].
"""

from typing import Optional, Tuple, Type

import numpy as np
import torch
import torch.nn as nn

from .common import LayerNorm2d


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
        activation: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        self.num_point_embeddings: int = 4  # pos/neg point + 2 box corners
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        # Mask prompts from clients are not served; the layers carry the point heatmap
        # (dense_from_points) when the config enables it, and load from SAM checkpoints either way.
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, [1, C, h, w]."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """points [P, N, 2] (x, y input pixels), labels [P, N] -> sparse embeddings [P, N(+1), C].

        With `pad`, one padding point (label -1) is appended to every prompt, as SAM's predictor
        does for point prompts without a box.
        """
        points = points.to(torch.float32) + 0.5  # shift to the pixel centre
        labels = labels.to(torch.float32)
        if pad:
            padding_point = torch.zeros_like(points[:, :1, :])
            padding_label = -torch.ones_like(labels[:, :1])
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        point_embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels.unsqueeze(-1)
        is_pad = (labels == -1).to(point_embedding.dtype)
        point_embedding = point_embedding * (1.0 - is_pad) + self.not_a_point_embed.weight * is_pad
        for i in range(self.num_point_embeddings):
            point_embedding = point_embedding + self.point_embeddings[i].weight * (labels == i).to(
                point_embedding.dtype
            )
        return point_embedding

    def point_heatmap(self, points: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
        """points [P, N, 2] (input pixels), labels [P, N] -> [P, 1, 4h, 4w] at SAM's mask-input size:
        sum of Gaussians, + for positive (1) and - for negative (0) points; other labels add 0."""
        mh, mw = self.mask_input_size
        stride_y = self.input_image_size[0] / mh
        stride_x = self.input_image_size[1] / mw
        ys = (torch.arange(mh, dtype=torch.float32, device=points.device) + 0.5) * stride_y
        xs = (torch.arange(mw, dtype=torch.float32, device=points.device) + 0.5) * stride_x
        px = points[..., 0].to(torch.float32) + 0.5
        py = points[..., 1].to(torch.float32) + 0.5
        dy = (ys.view(1, 1, mh, 1) - py.unsqueeze(-1).unsqueeze(-1)) ** 2  # [P, N, mh, 1]
        dx = (xs.view(1, 1, 1, mw) - px.unsqueeze(-1).unsqueeze(-1)) ** 2  # [P, N, 1, mw]
        labels = labels.to(torch.float32)
        sign = (labels == 1).to(torch.float32) - (labels == 0).to(torch.float32)
        blobs = torch.exp(-(dy + dx) / (2.0 * sigma * sigma)) * sign.unsqueeze(-1).unsqueeze(-1)
        return blobs.sum(dim=1, keepdim=True)

    def dense_from_points(self, points: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
        """Dense prompt embeddings [P, C, h, w] of the points' heatmap (mask-prompt path)."""
        return self.mask_downscaling(self.point_heatmap(points, labels, sigma))

    def dense_no_mask(self, batch: int) -> torch.Tensor:
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """segment-anything's interface: (sparse [P, N, C], dense [P, C, h, w])."""
        bs = 1
        for t in (points[0] if points is not None else None, boxes, masks):
            if t is not None:
                bs = t.shape[0]
                break
        sparse = torch.empty((bs, 0, self.embed_dim), device=self.no_mask_embed.weight.device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([2.0, 3.0], device=boxes.device).expand(corners.shape[0], 2)
            sparse = torch.cat([sparse, self.embed_points(corners, corner_labels, pad=False)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.dense_no_mask(bs)
        return sparse, dense


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding using random spatial frequencies."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates normalised to [0, 1] -> [..., 2 * num_pos_feats]."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((h, w), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1))
        return pe.permute(2, 0, 1)  # C x H x W

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Positionally encode points given in pixels of an image of `image_size` (h, w)."""
        scale = torch.tensor(
            [1.0 / image_size[1], 1.0 / image_size[0]], dtype=torch.float32, device=coords_input.device
        )
        return self._pe_encoding(coords_input.to(torch.float32) * scale)
