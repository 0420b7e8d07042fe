"""What every diagnostic here starts from: a model from a checkpoint (or bundle) and the 80 held-out
CoNSeP validation tiles the training commands validate on; the arguments and score lines of those
that compare serving settings."""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfrsam.build import build_cfr_sam  # noqa: E402
from cfrsam.inference import decode_batches, detect_points  # noqa: E402
from cfrsam.metrics import MetricAccumulator  # noqa: E402
from cfrsam.train import common  # noqa: E402


def model_and_tiles(checkpoint: str, threads: int):
    """(model in eval mode, validation tiles); torch uses `threads` threads."""
    torch.set_num_threads(threads)
    model = build_cfr_sam(None, checkpoint=common.read_init(checkpoint)).eval()
    sources = ",".join(map(str, common.DEFAULT_VAL_SOURCES))
    tiles = common.validation_set(None, sources, 0, model.config.class_names, model.config.input_size)
    return model, tiles


SCORES = ("bpq", "aji", "mpq", "det_f1", "det_precision", "det_recall")
SOURCE_SCORES = ("bpq", "aji", "det_f1")


def first_tiles(tiles, limit: int):
    """The validation items to score: all of them, or the first `limit` when it is positive."""
    return [tiles[i] for i in range(len(tiles) if limit <= 0 else min(limit, len(tiles)))]


def settings_parser(doc: str) -> argparse.ArgumentParser:
    """checkpoint, settings..., and the served prompter's threshold and NMS radius, threads, --limit."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--fg", type=float, default=0.25, help="the served prompter threshold")
    parser.add_argument("--nms", type=float, default=12.0, help="the served prompter NMS radius")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="first N tiles only (a quick check)")
    return parser


class SettingScores:
    """One setting's scores over the tiles, overall and per source image (CoNSeP's train_N)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.overall = MetricAccumulator(num_classes=num_classes, radius=12.0)
        self.per_source = {}

    def add(self, item, pred, pred_classes) -> None:
        gt = item["instances"].numpy()
        gt_classes = {i + 1: int(c) for i, c in enumerate(item["classes"].tolist())}
        source = item["name"].rsplit("_", 1)[0]
        self.overall.add(gt, pred, gt_classes, pred_classes)
        if source not in self.per_source:
            self.per_source[source] = MetricAccumulator(num_classes=self.num_classes, radius=12.0)
        self.per_source[source].add(gt, pred, gt_classes, pred_classes)

    def print(self, label: str, suffix: str = "") -> None:
        s = self.overall.summary()
        print(f"{label:18s} " + " ".join(f"{k}={s[k]:.4f}" for k in SCORES) + suffix, flush=True)
        for source, acc in sorted(self.per_source.items()):
            t = acc.summary()
            print(f"  {source:24s} " + " ".join(f"{k}={t[k]:.4f}" for k in SOURCE_SCORES), flush=True)


def decode_points(model, prepared, points):
    """Single-point prompts [N, 2] decoded against a prepared tile: (mask logits [N, W, W], window
    origins [N, 2], predicted IoUs [N])."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    batches = list(decode_batches(model, prepared, points[:, None, :], np.ones((len(points), 1), np.float32)))
    return tuple(np.concatenate(parts) for parts in zip(*batches))


@torch.no_grad()
def served_tile(model, image, fg: float, nms: float):
    """The served pipeline's prompts for one tile and their decoded masks: (points [N, 2] as the
    decoder takes them, classes [N], class confidences [N], prepared tile, mask logits [N, W, W],
    window origins [N, 2], predicted IoUs [N]); the last three None when the prompter finds nothing."""
    size = image.shape[-1]
    pts, classes, class_scores, _ = detect_points(model, image, fg, nms)
    pts = np.clip(pts, 0, size - 1e-3).astype(np.float32).reshape(-1, 2)
    prepared = model.prepare(model.encode(image), image)
    if len(pts) == 0:
        return pts, classes, class_scores, prepared, None, None, None
    return (pts, classes, class_scores, prepared) + decode_points(model, prepared, pts)
