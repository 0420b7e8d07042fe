"""Model configurations as data.

A `CFRSAMConfig` fully describes the architecture of one model; `get_config(name)` returns one
of the named presets (`tiny`, `b`, `h`). Configs round-trip through `to_dict` / `from_dict` so
that checkpoints and bundle manifests can record exactly what was built.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

PEFT_MODES = ("mala", "lora", "adapter", "none")
REFINEMENT_MODES = ("window", "full")
HMFM_AGGREGATES = ("weighted", "sum")

# SAM's normalisation (RGB, 0..255); every graph of a bundle takes pixels normalised with these.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

CONSEP_CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")
CONSEP_COLORS = ("#f2c12e", "#e8463a", "#3a8fe8", "#3ec46d")
PANNUKE_CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
PANNUKE_COLORS = ("#e8463a", "#3ec46d", "#3a8fe8", "#f2c12e", "#ff7f0e")


class ConfigError(ValueError):
    """A configuration that cannot describe a buildable model."""


@dataclass
class ImageEncoderConfig:
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    out_chans: int = 256
    use_rel_pos: bool = True
    qkv_bias: bool = True
    # Channels of an optional convolutional stem beside the patch embedding (empty: none, as in SAM):
    # a patchify convolution then stride-2 3x3 convolutions reaching the patch grid, summed into the
    # patch embeddings through a zero-initialised 1x1 projection (so a trained encoder gains it
    # without changing its output). The ViT sees sub-patch detail it cannot get from one 16 px
    # linear projection, as in "Early convolutions help transformers see better" and TinyViT.
    conv_stem: Tuple[int, ...] = ()


@dataclass
class PEFTConfig:
    # mala: MALA adapter per block; lora: LoRA on q and v of every block's attention (SAC);
    # adapter: bottleneck adapter per block (Houlsby-style, one per block); none: no adapter.
    mode: str = "mala"
    mala_rank: int = 64
    mala_kernel_sizes: Tuple[int, ...] = (3, 5, 7)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    adapter_dim: int = 64


@dataclass
class HMFMConfig:
    levels: Tuple[int, ...] = (2, 5, 8, 11)
    reduction: int = 16
    # weighted: learned per-level weights initialised to (0, ..., 0, 1) so that an untrained HMFM
    # passes the last level through unchanged; sum: the paper's plain sum of the modulated levels.
    aggregate: str = "weighted"


@dataclass
class DecoderConfig:
    """Prompt encoder + two-way transformer + mask decoder (segment-anything dimensions)."""

    transformer_dim: int = 256
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    # Also give each prompt's points to the decoder as a dense prompt: a Gaussian heatmap (sigma in
    # input pixels; + for positive, - for negative points) through SAM's mask-prompt path
    # (prompt_encoder.mask_downscaling). 0 = off, SAM's behaviour. Without SAM's pretrained weights
    # the decoder must learn point -> object localisation from a few hundred tiles; the spatially
    # aligned cue makes that learnable (the coarse mask otherwise collapsed to background).
    prompt_heatmap_sigma: float = 0.0


@dataclass
class BGMRConfig:
    channels: int = 32
    boundary_channels: int = 16
    refinement: str = "window"
    window: int = 64


@dataclass
class CFRSAMConfig:
    name: str = "custom"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)
    hmfm: HMFMConfig = field(default_factory=HMFMConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    bgmr: BGMRConfig = field(default_factory=BGMRConfig)
    # A preset name of cfrsam.prompt_learner.config, or a PromptLearnerConfig instance.
    prompt_learner: Any = "femto"
    # The point refiner's fields (cfrsam.prompt_learner.point_refiner.PointRefinerConfig) as a dict,
    # or None for a model without one: its prompter serves the prompt learner's points as they are.
    point_refiner: Optional[Dict[str, Any]] = None
    class_names: Tuple[str, ...] = CONSEP_CLASSES
    class_colors: Tuple[str, ...] = CONSEP_COLORS
    mpp: float = 0.25
    pixel_mean: Tuple[float, ...] = SAM_PIXEL_MEAN
    pixel_std: Tuple[float, ...] = SAM_PIXEL_STD
    mask_threshold: float = 0.0

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def grid_size(self) -> int:
        return self.image_encoder.img_size // self.image_encoder.patch_size

    @property
    def coarse_dim(self) -> int:
        """Channels of the per-prompt coarse mask features handed to BGMR."""
        return self.decoder.transformer_dim // 8 + 1

    def feature_shape(self) -> List[int]:
        g = self.grid_size
        return [len(self.hmfm.levels), self.image_encoder.embed_dim, g, g]

    def refinement_window(self, mode: Optional[str] = None) -> int:
        mode = mode or self.bgmr.refinement
        return self.input_size if mode == "full" else self.bgmr.window

    # ---- validation / serialisation ------------------------------------------------------
    def validate(self) -> "CFRSAMConfig":
        enc = self.image_encoder
        if enc.patch_size != 16:
            raise ConfigError(f"patch_size must be 16 (SAM), got {enc.patch_size}")
        if enc.img_size < 64 or enc.img_size % 16 != 0:
            raise ConfigError(f"input size must be a multiple of 16 and at least 64, got {enc.img_size}")
        if enc.embed_dim % enc.num_heads != 0:
            raise ConfigError(f"embed_dim {enc.embed_dim} is not divisible by num_heads {enc.num_heads}")
        bad = [i for i in enc.global_attn_indexes if not 0 <= i < enc.depth]
        if bad:
            raise ConfigError(f"global_attn_indexes {bad} outside 0..{enc.depth - 1}")
        if len(enc.conv_stem) > 5:
            raise ConfigError(
                f"conv_stem takes 1 to 5 channel counts (its first stride is 16 / 2^(n-1)), got {enc.conv_stem}"
            )
        if any(c < 1 for c in enc.conv_stem):
            raise ConfigError(f"conv_stem channel counts must be positive, got {enc.conv_stem}")
        if not self.hmfm.levels:
            raise ConfigError("hmfm.levels must name at least one encoder block")
        bad = [i for i in self.hmfm.levels if not 0 <= i < enc.depth]
        if bad:
            raise ConfigError(f"hmfm.levels {bad} outside 0..{enc.depth - 1}")
        if list(self.hmfm.levels) != sorted(set(self.hmfm.levels)):
            raise ConfigError(f"hmfm.levels must be strictly increasing, got {list(self.hmfm.levels)}")
        if self.hmfm.aggregate not in HMFM_AGGREGATES:
            raise ConfigError(f"hmfm.aggregate must be one of {HMFM_AGGREGATES}, got {self.hmfm.aggregate!r}")
        if self.peft.mode not in PEFT_MODES:
            raise ConfigError(f"peft.mode must be one of {PEFT_MODES}, got {self.peft.mode!r}")
        if any(k % 2 == 0 or k < 1 for k in self.peft.mala_kernel_sizes):
            raise ConfigError(f"MALA kernel sizes must be odd, got {self.peft.mala_kernel_sizes}")
        dec = self.decoder
        if dec.transformer_dim % 8 != 0 or dec.transformer_dim % dec.num_heads != 0:
            raise ConfigError(
                f"transformer_dim {dec.transformer_dim} must be divisible by 8 and by num_heads {dec.num_heads}"
            )
        if self.bgmr.refinement not in REFINEMENT_MODES:
            raise ConfigError(f"bgmr.refinement must be one of {REFINEMENT_MODES}, got {self.bgmr.refinement!r}")
        w = self.bgmr.window
        if w % 4 != 0 or w < 8 or w > enc.img_size:
            raise ConfigError(
                f"refinement window must be a multiple of 4 between 8 and the input size {enc.img_size}, got {w}"
            )
        if len(self.class_names) < 1 or len(self.class_colors) != len(self.class_names):
            raise ConfigError("class_names must be non-empty and class_colors must have one colour per class")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            raise ConfigError("pixel_mean and pixel_std need 3 values (RGB)")
        try:
            resolve_prompt_learner_config(self)
        except ImportError:
            pass
        except ValueError as exc:
            raise ConfigError(f"prompt learner: {exc}") from exc
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        pl = self.prompt_learner
        if dataclasses.is_dataclass(pl) and not isinstance(pl, type):
            d["prompt_learner"] = dataclasses.asdict(pl)
        return _lists(d)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CFRSAMConfig":
        d = dict(d)
        kw: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d.pop(f.name)
            if f.name in _SECTIONS:
                v = _section_from_dict(_SECTIONS[f.name], v)
            elif f.name == "prompt_learner" and isinstance(v, dict):
                v = _prompt_learner_from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        if d:
            raise ConfigError(f"unknown config fields: {sorted(d)}")
        return cls(**kw)

    def replace(self, **overrides: Any) -> "CFRSAMConfig":
        """A copy with overrides applied.

        Keys are top-level fields (`mpp=0.5`), `section__field` (`image_encoder__depth=2`,
        `bgmr__window=32`), or the shortcuts `input_size`, `depth`, `peft_mode`, `refinement`,
        `window`. Reducing the depth drops global-attention indexes and HMFM levels beyond it
        (HMFM keeps at least the last block) unless those are overridden too.
        """
        cfg = copy.deepcopy(self)
        keys = {_SHORTCUTS[k][1] if k in _SHORTCUTS else k.split("__")[-1] for k in overrides}
        for key, value in overrides.items():
            if value is None:
                continue
            if key in _SHORTCUTS:
                section, name = _SHORTCUTS[key]
                key = f"{section}__{name}"
            if "__" in key:
                section, name = key.split("__", 1)
                if section not in _SECTIONS:
                    raise ConfigError(f"unknown config section {section!r} in override {key!r}")
                sub = getattr(cfg, section)
                if name not in {f.name for f in dataclasses.fields(sub)}:
                    raise ConfigError(f"unknown field {name!r} in config section {section!r}")
                setattr(sub, name, tuple(value) if isinstance(value, list) else value)
            else:
                if key not in {f.name for f in dataclasses.fields(cfg)}:
                    raise ConfigError(f"unknown config field {key!r}")
                setattr(cfg, key, tuple(value) if isinstance(value, list) else value)
        depth = cfg.image_encoder.depth
        if "depth" in keys and depth < self.image_encoder.depth:
            # A shallower encoder (tests, quick experiments) keeps the block indices that still
            # exist unless they were given explicitly.
            if "global_attn_indexes" not in keys:
                cfg.image_encoder.global_attn_indexes = tuple(
                    i for i in cfg.image_encoder.global_attn_indexes if i < depth
                )
            if "levels" not in keys:
                cfg.hmfm.levels = tuple(i for i in cfg.hmfm.levels if i < depth) or (depth - 1,)
        return cfg


_SECTIONS = {
    "image_encoder": ImageEncoderConfig,
    "peft": PEFTConfig,
    "hmfm": HMFMConfig,
    "decoder": DecoderConfig,
    "bgmr": BGMRConfig,
}

_SHORTCUTS = {
    "input_size": ("image_encoder", "img_size"),
    "img_size": ("image_encoder", "img_size"),
    "depth": ("image_encoder", "depth"),
    "peft_mode": ("peft", "mode"),
    "refinement": ("bgmr", "refinement"),
    "window": ("bgmr", "window"),
}


def _lists(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_lists(x) for x in v]
    return v


def _section_from_dict(cls, d: Any):
    if isinstance(d, cls):
        return d
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _prompt_learner_from_dict(d: Dict[str, Any]) -> Any:
    from cfrsam.prompt_learner.config import PromptLearnerConfig  # noqa: WPS433

    return PromptLearnerConfig.from_dict(d)


def resolve_prompt_learner_config(cfg: CFRSAMConfig) -> Any:
    """The PromptLearnerConfig of a model config, with K and the input size taken from the model.

    `cfg.prompt_learner` is a preset name of `cfrsam.prompt_learner.config` (looked up lazily, so
    that this module does not import the prompt learner), a dict or a PromptLearnerConfig.
    """
    from cfrsam.prompt_learner import config as pl_config  # noqa: WPS433

    pl = cfg.prompt_learner
    if isinstance(pl, str):
        return pl_config.prompt_learner_config(pl, num_classes=cfg.num_classes, input_size=cfg.input_size)
    if isinstance(pl, dict):
        pl = pl_config.PromptLearnerConfig.from_dict(pl)
    return dataclasses.replace(pl, num_classes=cfg.num_classes, input_size=cfg.input_size)


# ---- presets ------------------------------------------------------------------------------


def _tiny() -> CFRSAMConfig:
    return CFRSAMConfig(
        name="tiny",
        image_encoder=ImageEncoderConfig(
            img_size=256, embed_dim=192, depth=6, num_heads=3, window_size=8, global_attn_indexes=(2, 5), out_chans=128
        ),
        peft=PEFTConfig(mode="mala", mala_rank=32, lora_rank=4, adapter_dim=32),
        hmfm=HMFMConfig(levels=(1, 3, 5), reduction=8),
        decoder=DecoderConfig(
            transformer_dim=128, num_heads=4, mlp_dim=512, iou_head_hidden_dim=128, prompt_heatmap_sigma=6.0
        ),
        bgmr=BGMRConfig(channels=16, boundary_channels=8, refinement="window", window=64),
        prompt_learner="femto",
        class_names=CONSEP_CLASSES,
        class_colors=CONSEP_COLORS,
        mpp=0.25,
    )


def _b() -> CFRSAMConfig:
    return CFRSAMConfig(
        name="b",
        image_encoder=ImageEncoderConfig(
            img_size=1024,
            embed_dim=768,
            depth=12,
            num_heads=12,
            window_size=14,
            global_attn_indexes=(2, 5, 8, 11),
            out_chans=256,
        ),
        peft=PEFTConfig(mode="mala", mala_rank=64, lora_rank=64, adapter_dim=64),
        hmfm=HMFMConfig(levels=(2, 5, 8, 11)),
        decoder=DecoderConfig(transformer_dim=256, num_heads=8, mlp_dim=2048),
        bgmr=BGMRConfig(channels=32, boundary_channels=16, refinement="window", window=128),
        prompt_learner="small",
        class_names=PANNUKE_CLASSES,
        class_colors=PANNUKE_COLORS,
        mpp=0.25,
    )


def _h() -> CFRSAMConfig:
    cfg = _b()
    cfg.name = "h"
    cfg.image_encoder = ImageEncoderConfig(
        img_size=1024,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        window_size=14,
        global_attn_indexes=(7, 15, 23, 31),
        out_chans=256,
    )
    cfg.hmfm = HMFMConfig(levels=(7, 15, 23, 31))
    return cfg


_PRESETS = {"tiny": _tiny, "b": _b, "h": _h}
CONFIG_NAMES = tuple(_PRESETS)


def get_config(name: str) -> CFRSAMConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown config {name!r}; valid names: {', '.join(CONFIG_NAMES)}")
    return _PRESETS[name]().validate()


def make_config(config: Union[str, CFRSAMConfig, Dict[str, Any]], **overrides: Any) -> CFRSAMConfig:
    """Resolve a name, dict or config, apply overrides and validate."""
    if isinstance(config, str):
        cfg = get_config(config)
    elif isinstance(config, dict):
        cfg = CFRSAMConfig.from_dict(config)
    elif isinstance(config, CFRSAMConfig):
        cfg = config
    else:
        raise ConfigError(f"expected a config name, dict or CFRSAMConfig, got {type(config).__name__}")
    return cfg.replace(**overrides).validate()
