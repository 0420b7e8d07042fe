"""Annotated nuclei data: the shared set layout, crops, augmentation and batching."""

from .augment import AugmentConfig, color_jitter, flip_rotate, gaussian_blur, random_blur, random_color, stain_jitter
from .dataset import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    UNKNOWN_CLASS,
    NucleiDataset,
    collate_nuclei,
    default_data_root,
    instance_centroids,
    instance_classes,
    list_samples,
    read_image,
    read_labels,
    source_of,
    split_by_source,
)

__all__ = [
    "AugmentConfig",
    "color_jitter",
    "flip_rotate",
    "gaussian_blur",
    "random_blur",
    "random_color",
    "stain_jitter",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "UNKNOWN_CLASS",
    "NucleiDataset",
    "collate_nuclei",
    "default_data_root",
    "instance_centroids",
    "instance_classes",
    "list_samples",
    "read_image",
    "read_labels",
    "source_of",
    "split_by_source",
]
