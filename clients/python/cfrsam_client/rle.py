"""Run-length encoded masks: the service's box RLE and COCO's (pycocotools-compatible)."""

import numpy as np


def decode_box_rle(width, height, counts):
    """The service's default RleMask (inside the bounding box, row-major, zeros first) as a bool array."""
    flat = np.zeros(width * height, dtype=bool)
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    if ends.size and ends[-1] != width * height:
        raise ValueError(f"RLE runs cover {int(ends[-1])} of {width * height} pixels")
    starts = np.concatenate([[0], ends[:-1]])
    for s, e in zip(starts[1::2], ends[1::2]):
        flat[s:e] = True
    return flat.reshape(height, width)


def decode_coco_rle(width, height, counts):
    """A COCO RLE (whole image, column-major, zeros first) as an (H, W) bool array."""
    flat = np.zeros(width * height, dtype=bool)
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    starts = np.concatenate([[0], ends[:-1]])
    for s, e in zip(starts[1::2], ends[1::2]):
        flat[s:e] = True
    return flat.reshape(width, height).T


def coco_counts_string(counts):
    """pycocotools' compressed counts string (rleToString)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def coco_rle_from_mask(mask):
    """COCO RLE dict {"size": [h, w], "counts": str} of an (H, W) boolean mask, as pycocotools.mask.encode."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [h, w], "counts": coco_counts_string(runs)}
