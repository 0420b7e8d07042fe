"""What every diagnostic here starts from: a model from a checkpoint (or bundle) and the 80 held-out
CoNSeP validation tiles the training commands validate on."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfrsam.build import build_cfr_sam  # noqa: E402
from cfrsam.train import common  # noqa: E402


def model_and_tiles(checkpoint: str, threads: int):
    """(model in eval mode, validation tiles); torch uses `threads` threads."""
    torch.set_num_threads(threads)
    model = build_cfr_sam(None, checkpoint=common.read_init(checkpoint)).eval()
    sources = ",".join(map(str, common.DEFAULT_VAL_SOURCES))
    tiles = common.validation_set(None, sources, 0, model.config.class_names, model.config.input_size)
    return model, tiles
