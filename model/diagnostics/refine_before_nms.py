"""The prompter's NMS before or after the point refiner (docs/model-history.md).

As served, the prompter keeps one point per 12 px (NMS over the learner's raw points, by foreground),
then refines, verifies and merges them (second NMS at the refiner's radius). On the 80 held-out
CoNSeP tiles the learner's candidates at the served threshold hold 0.895 of the nuclei and the first
NMS leaves 0.796 (`recall_breakdown.py`): neighbours' points are suppressed. Each setting here is
`pre,post,rank`: NMS at `pre` px over the raw points, refine every kept point, the score bar, then
NMS at `post` px over the refined points ranked by `rank` (fg: the learner's foreground; score: the
refiner's on-nucleus probability; prod: their product); optionally one score bar per class after
(`pre,post,rank,bar_0,...,bar_K-1`, by the served class). The whole pipeline is scored.

    cd model && python3 diagnostics/refine_before_nms.py ../runs/ship.pt "12,4,fg" "4,6,fg"
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfrsam.inference as inference  # noqa: E402
from cfrsam.inference import mix_class_probabilities, point_nms  # noqa: E402
from cfrsam.prompt_learner.prompt_learner import decode_prompts  # noqa: E402
from shared import SettingScores, model_and_tiles  # noqa: E402


def detect_variant(pre, post, rank, counter, bars=None):
    @torch.no_grad()
    def detect(model, image, min_foreground, nms_radius, class_probs=False):
        size = image.shape[-1]
        out = model.detect(image)
        det = decode_prompts(out["points"], out["logits"], min_foreground)[0]
        pts = np.clip(det["points"].float().numpy(), 0, size)
        foreground = det["foreground"].float().numpy()
        keep = point_nms(pts, foreground, pre)
        pts = pts[keep]
        scores = det["scores"].float().numpy()[keep]
        probs = out["logits"][0].float().softmax(-1)[det["anchor_index"][keep]][:, :-1]
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        refiner = model.point_refiner
        counter["refined"] += len(pts)
        if len(pts) == 0:
            return pts, np.zeros(0, np.int64), scores, foreground[keep]
        refined, on_nucleus, refiner_probs = model.refine_and_score_points(image, torch.from_numpy(pts).float())
        probs = mix_class_probabilities(probs, refiner_probs.float(), refiner.cfg.class_weight)
        classes = probs.argmax(-1).numpy()
        fg = foreground[keep]
        scores = fg * probs.max(-1).values.numpy()
        on = on_nucleus.float().numpy()
        pts = refined.float().numpy()
        bar = np.full(len(on), refiner.cfg.min_score) if bars is None else np.asarray(bars)[classes]
        verified = np.flatnonzero(on >= bar)
        ranking = {"fg": fg, "score": on, "prod": fg * on}[rank]
        again = verified[point_nms(pts[verified], ranking[verified], post)]
        counter["kept"] += len(again)
        return pts[again], classes[again], scores[again], fg[again]

    return detect


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--fg", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, tiles = model_and_tiles(args.checkpoint, args.threads)
    for setting in args.settings:
        pre, post, rank, *bars = setting.split(",")
        counter = {"refined": 0, "kept": 0}
        bars = [float(b) for b in bars] or None
        inference.detect_points = detect_variant(float(pre), float(post), rank, counter, bars)
        scores = SettingScores(model.config.num_classes)
        started = time.time()
        for idx in range(len(tiles)):
            item = tiles[idx]
            scores.add(item, *inference.segment_tile(model, item["image"][None], args.fg, 0.0))
        scores.print(setting, f" refined={counter['refined']} kept={counter['kept']} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
