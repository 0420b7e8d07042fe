"""Parameter counts per component, config and PEFT mode.

    python -m cfrsam.params [--config tiny|b|h|all] [--json]

For every PEFT mode the backbone is frozen as with a SAM checkpoint loaded (only adapters, HMFM,
prompt encoder, mask decoder, BGMR and the prompt learner train); the `full` row is training
from scratch (everything trains). "second stage" is everything except the prompt learner, the
number the paper reports as the trainable parameters of the SAM adaptation (8.3 M for B, 19.1 M
for H). Models are built on PyTorch's meta device, so even `h` costs no memory.
"""

import argparse
import contextlib
import json
import sys
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .configs import CONFIG_NAMES, PEFT_MODES, ConfigError, make_config
from .modeling.cfr_sam import CFRSAM
from .modeling.peft import configure_trainable, is_peft_parameter

COMPONENTS = ("image_encoder", "adapters", "hmfm", "prompt_encoder", "mask_decoder", "bgmr", "prompt_learner")
SECOND_STAGE = ("image_encoder", "adapters", "hmfm", "prompt_encoder", "mask_decoder", "bgmr")


class _MetaFactories(TorchFunctionMode):
    """Allocate parameters on the meta device (shapes only, no memory, no init cost)."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    with _MetaFactories():
        yield


def component_of(name: str) -> str:
    if is_peft_parameter(name):
        return "adapters"
    return name.split(".", 1)[0]


def count_by_component(model: nn.Module) -> Dict[str, Dict[str, int]]:
    counts = {c: {"total": 0, "trainable": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        c = counts.setdefault(component_of(name), {"total": 0, "trainable": 0})
        c["total"] += p.numel()
        if p.requires_grad:
            c["trainable"] += p.numel()
    for key in ("total", "trainable"):
        counts.setdefault("second_stage", {"total": 0, "trainable": 0})[key] = sum(counts[c][key] for c in SECOND_STAGE)
        counts.setdefault("all", {"total": 0, "trainable": 0})[key] = sum(counts[c][key] for c in COMPONENTS)
    return counts


def parameter_report(config_name: str, modes: Sequence[str] = PEFT_MODES + ("full",)) -> Dict[str, Dict]:
    report = {}
    for mode in modes:
        cfg = make_config(config_name, peft_mode="none" if mode == "full" else mode)
        with meta_init():
            model = CFRSAM.from_config(cfg)
        configure_trainable(model, backbone_pretrained=(mode != "full"))
        report[mode] = count_by_component(model)
    return report


def _m(n: int) -> str:
    return f"{n / 1e6:8.3f}"


def format_report(config_name: str, report: Dict[str, Dict]) -> str:
    cols = list(COMPONENTS) + ["second_stage", "all"]
    lines = [f"config {config_name}: parameters in millions, trainable / total"]
    header = f"{'mode':8s}" + "".join(f"{c:>22s}" for c in cols)
    lines.append(header)
    for mode, counts in report.items():
        row = f"{mode:8s}"
        for c in cols:
            row += f"{_m(counts[c]['trainable'])} /{_m(counts[c]['total'])}   "
        lines.append(row.rstrip())
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cfrsam.params", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="all", help=f"{', '.join(CONFIG_NAMES)} or all")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    names = list(CONFIG_NAMES) if args.config == "all" else [args.config]
    try:
        reports = {name: parameter_report(name) for name in names}
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(format_report(name, rep) for name, rep in reports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
