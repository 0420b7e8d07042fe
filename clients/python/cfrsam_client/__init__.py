"""Python client of the CFR-SAM nuclei segmentation service.

    from cfrsam_client import Client
    result = Client("localhost:50051").segment("tile.png", mpp=0.5)
    print(len(result.nuclei), result.label_map.shape)   # numpy uint16 label map
"""

from .client import Client, Mask, SegmentResult, CfrsamError
from .geojson import QUPATH_CLASSES, to_geojson
from .images import encode_png
from .rle import coco_counts_string, coco_rle_from_mask, decode_box_rle, decode_coco_rle

__all__ = [
    "Client",
    "CfrsamError",
    "Mask",
    "SegmentResult",
    "QUPATH_CLASSES",
    "to_geojson",
    "encode_png",
    "coco_counts_string",
    "coco_rle_from_mask",
    "decode_box_rle",
    "decode_coco_rle",
]
__version__ = "0.1.0"
