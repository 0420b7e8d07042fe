"""The assembled CFR-SAM model and its serving stages.

Stages (each one ONNX graph of docs/architecture.md):
  detect(image)                         -> prompt learner outputs (prompter.onnx)
  encode(image)                         -> features [B, L, D, h, w] (encoder.onnx)
  prepare(features, image)              -> image_embedding, semantic, boundary_features
                                           (decoder_image.onnx: HMFM + neck + BGMR image part)
  decode_prompts(prepared..., point_coords, point_labels)
                                        -> mask_logits, window_origin, iou_predictions,
                                           coarse_logits, boundary_logits (decoder_prompts.onnx)
`forward` chains encode/prepare/decode_prompts for training on a batch of images with the same
number of prompts each.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..configs import CFRSAMConfig, resolve_prompt_learner_config
from .bgmr import BGMR, crop_windows
from .hmfm import HMFM
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .peft import inject_peft
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer


def window_origins(point_coords: torch.Tensor, point_labels: torch.Tensor, window: int, size: int) -> torch.Tensor:
    """Top-left corner (x0, y0) of each prompt's refinement window, [P, 2] int64.

    Centre: mean of the prompt's points labelled 1, 2 or 3 (positive points and box corners; the
    frame centre when there are none); origin = centre - W/2 snapped to a multiple of 4 and clamped
    so the window lies inside the frame. Tensor ops only, so it is part of the exported graph.
    """
    labels = point_labels.to(torch.float32)
    weight = ((labels >= 1.0) & (labels <= 3.0)).to(torch.float32)
    count = weight.sum(dim=1, keepdim=True)
    centre = (point_coords.to(torch.float32) * weight.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1.0)
    centre = torch.where(count > 0, centre, torch.full_like(centre, size / 2.0))
    origin = torch.round((centre - window / 2.0) / 4.0) * 4.0
    origin = origin.clamp(min=0.0, max=float(size - window))
    return origin.to(torch.long)


class CFRSAM(nn.Module):
    def __init__(
        self,
        config: CFRSAMConfig,
        image_encoder: ImageEncoderViT,
        hmfm: HMFM,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        bgmr: BGMR,
        prompt_learner: Optional[nn.Module] = None,
        point_refiner: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.hmfm = hmfm
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.bgmr = bgmr
        self.prompt_learner = prompt_learner
        self.point_refiner = point_refiner
        self.hmfm_levels = tuple(config.hmfm.levels)
        self.input_size = config.input_size

    @classmethod
    def from_config(cls, cfg: CFRSAMConfig, with_prompt_learner: bool = True) -> "CFRSAM":
        enc = cfg.image_encoder
        image_encoder = ImageEncoderViT(
            img_size=enc.img_size,
            patch_size=enc.patch_size,
            in_chans=enc.in_chans,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=enc.out_chans,
            qkv_bias=enc.qkv_bias,
            norm_layer=_layer_norm_eps6,
            use_rel_pos=enc.use_rel_pos,
            rel_pos_zero_init=True,
            window_size=enc.window_size,
            global_attn_indexes=tuple(enc.global_attn_indexes),
            conv_stem=tuple(enc.conv_stem),
        )
        inject_peft(image_encoder, cfg.peft)
        hmfm = HMFM(enc.embed_dim, len(cfg.hmfm.levels), cfg.hmfm.reduction, cfg.hmfm.aggregate)
        dec = cfg.decoder
        grid = cfg.grid_size
        prompt_encoder = PromptEncoder(
            embed_dim=dec.transformer_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=dec.mask_in_chans,
        )
        mask_decoder = MaskDecoder(
            transformer_dim=dec.transformer_dim,
            transformer=TwoWayTransformer(
                depth=dec.depth,
                embedding_dim=dec.transformer_dim,
                num_heads=dec.num_heads,
                mlp_dim=dec.mlp_dim,
            ),
            num_multimask_outputs=dec.num_multimask_outputs,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        )
        if enc.out_chans != dec.transformer_dim:
            raise ValueError(
                f"neck out_chans ({enc.out_chans}) must equal the decoder transformer_dim ({dec.transformer_dim})"
            )
        bgmr = BGMR(
            embed_dim=enc.out_chans,
            coarse_dim=cfg.coarse_dim,
            channels=cfg.bgmr.channels,
            boundary_channels=cfg.bgmr.boundary_channels,
        )
        prompt_learner = point_refiner = None
        if with_prompt_learner:
            from ..prompt_learner import PointRefiner, PointRefinerConfig, PromptLearner  # noqa: WPS433

            prompt_learner = PromptLearner(resolve_prompt_learner_config(cfg))
            if cfg.point_refiner is not None:
                point_refiner = PointRefiner(PointRefinerConfig.from_dict(cfg.point_refiner))
        return cls(cfg, image_encoder, hmfm, prompt_encoder, mask_decoder, bgmr, prompt_learner, point_refiner)

    # ---- stages ------------------------------------------------------------------------------
    def detect(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.prompt_learner is None:
            raise RuntimeError("this model was built without a prompt learner")
        return self.prompt_learner(image)

    def refine_points(
        self, image: torch.Tensor, points: torch.Tensor, image_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The kept prompt points [P, 2] moved onto their nuclei's centres (point_refiner.onnx);
        unchanged for a model without a point refiner."""
        return self.refine_and_score_points(image, points, image_index)[0]

    def refine_and_score_points(
        self, image: torch.Tensor, points: torch.Tensor, image_index: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """point_refiner.onnx's outputs: (refined points [P, 2], probability [P] that each is on a
        nucleus, class probabilities [P, K'] from the refiner); the points unchanged, ones and [P, 1]
        ones for a model without a point refiner (or without those heads)."""
        if self.point_refiner is None:
            return points, torch.ones_like(points[:, 0]), torch.ones_like(points[:, :1])
        return self.point_refiner.refine_and_score(image, points, image_index)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, S, S] (normalised) -> features [B, L, D, h, w]."""
        return self.image_encoder.hidden_states(image, self.hmfm_levels)

    def prepare(self, features: torch.Tensor, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HMFM + neck + BGMR image part -> (image_embedding, semantic, boundary_features)."""
        image_embedding = self.image_encoder.neck(self.hmfm(features))
        semantic, boundary_features = self.bgmr.image_features(image_embedding, image)
        return image_embedding, semantic, boundary_features

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        semantic: torch.Tensor,
        boundary_features: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        refinement: Optional[str] = None,
        image_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder + BGMR for P prompts of N points each.

        point_coords [P, N, 2] (x, y input pixels), point_labels [P, N]; the prepared tensors
        are for one image (shared by all prompts) or, with image_index [P], for a batch.
        Returns mask_logits [P, W, W], window_origin [P, 2] int64, iou_predictions [P],
        coarse_logits [P, S/4, S/4], boundary_logits [P, W, W]; W = S in full-frame mode.
        """
        mode = refinement or self.config.bgmr.refinement
        if mode not in ("window", "full"):
            raise ValueError(f"refinement must be 'window' or 'full', got {mode!r}")
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        sigma = self.config.decoder.prompt_heatmap_sigma
        if sigma > 0:
            dense = self.prompt_encoder.dense_from_points(point_coords, point_labels, sigma)
        else:
            dense = self.prompt_encoder.dense_no_mask(1)
        image_pe = self.prompt_encoder.get_dense_pe()
        if image_index is not None:
            image_embedding = image_embedding.index_select(0, image_index)
        coarse_logits, iou_predictions, coarse_features = self.mask_decoder.predict_single(
            image_embedding, image_pe, sparse, dense
        )
        if mode == "full":
            window_origin = torch.zeros_like(point_coords[:, 0, :], dtype=torch.long)
            mask_logits, boundary_logits = self.bgmr.refine(
                semantic, boundary_features, coarse_features, None, None, image_index=image_index
            )
        else:
            window = self.config.bgmr.window
            window_origin = window_origins(point_coords, point_labels, window, self.input_size)
            mask_logits, boundary_logits = self.bgmr.refine(
                semantic, boundary_features, coarse_features, window_origin, window, image_index=image_index
            )
        return mask_logits, window_origin, iou_predictions, coarse_logits, boundary_logits

    def forward(
        self,
        image: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        refinement: Optional[str] = None,
    ) -> Dict[str, torch.Tensor]:
        """Training path: image [B, 3, S, S], point_coords [B, P, N, 2], point_labels [B, P, N].

        Returns a dict of [B, P, ...] tensors named like the decoder_prompts outputs.
        """
        B, P = point_coords.shape[0], point_coords.shape[1]
        prepared = self.prepare(self.encode(image), image)
        image_index = torch.arange(B, device=image.device).repeat_interleave(P)
        outputs = self.decode_prompts(
            *prepared,
            point_coords.reshape(B * P, *point_coords.shape[2:]),
            point_labels.reshape(B * P, point_labels.shape[2]),
            refinement=refinement,
            image_index=image_index,
        )
        names = ("mask_logits", "window_origin", "iou_predictions", "coarse_logits", "boundary_logits")
        return {name: t.reshape(B, P, *t.shape[1:]) for name, t in zip(names, outputs)}


def _layer_norm_eps6(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


@torch.no_grad()
def refinement_agreement(
    model: CFRSAM,
    image: torch.Tensor,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
    chunk: int = 16,
) -> Dict[str, float]:
    """Agreement of window-mode and full-frame refinement inside each prompt's window.

    image [1, 3, S, S]; prompts as for decode_prompts (run `chunk` at a time). Returns the mean
    absolute difference of the mask probabilities, the mean and minimum IoU of the masks
    thresholded at the config's mask_threshold, and the same for the window's interior beyond
    BGMR's exact margin.
    """
    was_training = model.training
    model.eval()
    prepared = model.prepare(model.encode(image), image)
    window = model.config.bgmr.window
    windowed, full_in_window = [], []
    for start in range(0, point_coords.shape[0], chunk):
        coords, labels = point_coords[start : start + chunk], point_labels[start : start + chunk]
        full = model.decode_prompts(*prepared, coords, labels, refinement="full")
        win = model.decode_prompts(*prepared, coords, labels, refinement="window")
        windowed.append(win[0])
        full_in_window.append(crop_windows(full[0], win[1], window))
    model.train(was_training)
    a, b = torch.cat(windowed), torch.cat(full_in_window)
    threshold = model.config.mask_threshold
    result = _agreement(a, b, threshold)
    margin = min(model.bgmr.window_margin(), window // 2 - 1)
    inner = slice(margin, window - margin)
    interior = _agreement(a[:, inner, inner], b[:, inner, inner], threshold)
    result.update({f"interior_{k}": v for k, v in interior.items()})
    result.update({"window": window, "margin": margin, "prompts": int(point_coords.shape[0])})
    return result


def _agreement(a: torch.Tensor, b: torch.Tensor, threshold: float) -> Dict[str, float]:
    prob_diff = (torch.sigmoid(a) - torch.sigmoid(b)).abs().mean().item()
    ma, mb = a > threshold, b > threshold
    inter = (ma & mb).flatten(1).sum(1).float()
    union = (ma | mb).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {"mean_abs_prob_diff": prob_diff, "mean_iou": iou.mean().item(), "min_iou": iou.min().item()}
