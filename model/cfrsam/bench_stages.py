"""Latency and throughput of each stage graph at batch sizes 1..64, in PyTorch on any device, and
the bundle's ONNX graphs in onnxruntime (Python) with whatever execution providers it has.

    python -m cfrsam.bench_stages --bundle ../models/tiny --device cuda --batches 1,2,4,8,16,32,64 \
        --precisions fp32,bf16 --onnx --out /tmp/stages.json

This is the GPU path's measurement (scripts/gpu-bench.sh runs it on the device machine; it runs on
a CPU too, slowly). The modules are the export wrappers (`export.graphs.stage_module`), so PyTorch
times the same computation the ONNX graphs hold. Batch means tiles for prompter, encoder and
decoder_image, and prompts against one prepared tile for decoder_prompts. Each point: `--warmup`
calls, then the median of `--reps` timed calls (synchronised on CUDA). From the largest batch it
also prints a whole tile's cost (prompter + encoder + decoder_image per tile + `--prompts-per-tile`
prompts) as tiles/s and megapixels/s at the model's resolution: the stages' ceiling, without
transport, tiling overlap or post-processing.
"""

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from .export import GRAPH_IO, ExportError, load_bundle_model, parity_inputs, stage_module
from .train.common import make_autocast_safe

STAGES = ("prompter", "encoder", "decoder_image", "decoder_prompts")


def batched_inputs(inputs: Dict[str, Dict[str, np.ndarray]], graph: str, batch: int) -> Dict[str, np.ndarray]:
    """The parity inputs of `graph` repeated to `batch` tiles, or `batch` prompts for decoder_prompts."""
    base = inputs[graph]
    if graph == "decoder_prompts":
        reps = -(-batch // base["point_coords"].shape[0])
        return dict(
            base,
            point_coords=np.concatenate([base["point_coords"]] * reps)[:batch],
            point_labels=np.concatenate([base["point_labels"]] * reps)[:batch],
        )
    return {k: np.concatenate([v] * batch) for k, v in base.items()}


def time_calls(fn: Callable[[], object], warmup: int, reps: int, sync: Callable[[], None]) -> float:
    """Median milliseconds of `reps` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bench_torch(
    model, inputs, device, batches: List[int], precision: str, warmup: int, reps: int
) -> Dict[str, Dict[int, float]]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # As in training: normalisation layers take autocast's half-precision activations in float32.
    hooks = make_autocast_safe(model) if dtype is not None else []
    out: Dict[str, Dict[int, float]] = {}
    for graph in STAGES:
        module = stage_module(model, graph).eval().to(device)
        out[graph] = {}
        for batch in batches:
            feeds = batched_inputs(inputs, graph, batch)
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in GRAPH_IO[graph][0]]

            def call():
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    return module(*args)

            try:
                out[graph][batch] = time_calls(call, warmup, reps, sync)
            except RuntimeError as e:  # e.g. out of memory at a large batch: record and go on
                print(f"  {graph} batch {batch} {precision}: {e}", file=sys.stderr)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            print(f"  torch {precision:4s} {graph:16s} batch {batch:3d}: {out[graph][batch]:9.2f} ms", file=sys.stderr)
    for hook in hooks:
        hook.remove()
    return out


def bench_onnx(bundle: str, manifest, inputs, batches: List[int], warmup: int, reps: int):
    """The bundle's graphs in onnxruntime, fp32, with its best available provider (None without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("  onnxruntime (Python) is not installed: ONNX graphs skipped", file=sys.stderr)
        return None, []
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    out: Dict[str, Dict[int, float]] = {}
    for graph in STAGES:
        session = ort.InferenceSession(f"{bundle}/{manifest['graphs'][graph]['file']}", providers=providers)
        out[graph] = {}
        for batch in batches:
            feeds = batched_inputs(inputs, graph, batch)
            feed = {n: np.ascontiguousarray(feeds[n]) for n in GRAPH_IO[graph][0]}
            try:
                session.run(None, feed)
            except Exception as exc:  # onnxruntime's InvalidArgument
                # A graph with a fixed batch dimension (decoder_image holds one tile's features) runs
                # only at that batch; the PyTorch rows cover the others.
                print(
                    f"  onnx {graph:16s} batch {batch:3d}: skipped ({str(exc).splitlines()[0][:90]})", file=sys.stderr
                )
                continue
            out[graph][batch] = time_calls(lambda: session.run(None, feed), warmup, reps, lambda: None)
            print(
                f"  onnx {graph:16s} batch {batch:3d}: {out[graph][batch]:9.2f} ms ({session.get_providers()[0]})",
                file=sys.stderr,
            )
    return out, providers


def tile_ceiling(ms: Dict[str, Dict[int, float]], prompts_per_tile: int, tile_px: int) -> Dict[str, float]:
    """Per-tile cost from each stage's largest measured batch (ms per item x items per tile)."""
    per_item = {}
    for graph, by_batch in ms.items():
        if not by_batch:
            return {}
        b = max(by_batch)
        per_item[graph] = by_batch[b] / b
    tile_ms = (
        per_item["prompter"]
        + per_item["encoder"]
        + per_item["decoder_image"]
        + prompts_per_tile * per_item["decoder_prompts"]
    )
    return {"ms_per_tile": tile_ms, "tiles_per_s": 1000 / tile_ms, "mpx_per_s": tile_px / 1e6 * 1000 / tile_ms}


def markdown(results: Dict[str, Dict[str, Dict[int, float]]], batches: List[int]) -> str:
    lines = ["| runtime | graph | " + " | ".join(f"batch {b} (ms; items/s)" for b in batches) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(batches))
    for runtime, by_graph in results.items():
        for graph, by_batch in by_graph.items():
            cells = [f"{by_batch[b]:.2f}; {1000 * b / by_batch[b]:.0f}" if b in by_batch else "-" for b in batches]
            lines.append(f"| {runtime} | {graph} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="../models/tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--precisions", default="fp32,bf16", help="PyTorch precisions: fp32, bf16, fp16 (autocast)")
    parser.add_argument("--onnx", action="store_true", help="also time the bundle's ONNX graphs in onnxruntime")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--prompts-per-tile", type=int, default=20, help="nuclei per tile for the ceiling (CoNSeP: ~22)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", help="JSON file to write (a markdown table goes beside it as .md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, manifest = load_bundle_model(args.bundle)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    inputs = parity_inputs(model)
    model = model.to(device).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"bundle {manifest['version']} on {name}, torch {torch.__version__}", file=sys.stderr)

    results: Dict[str, Dict[str, Dict[int, float]]] = {}
    for precision in args.precisions.split(","):
        results[f"torch {precision}"] = bench_torch(model, inputs, device, batches, precision, args.warmup, args.reps)
    providers: List[str] = []
    if args.onnx:
        onnx_ms, providers = bench_onnx(args.bundle, manifest, inputs, batches, args.warmup, args.reps)
        if onnx_ms is not None:
            results[f"onnxruntime {providers[0] if providers else ''}".strip()] = onnx_ms
    tile_px = manifest["input_size"] ** 2
    ceilings = {runtime: tile_ceiling(ms, args.prompts_per_tile, tile_px) for runtime, ms in results.items()}

    table = markdown(results, batches)
    print(table)
    for runtime, c in ceilings.items():
        if c:
            print(
                f"{runtime}: a tile with {args.prompts_per_tile} nuclei {c['ms_per_tile']:.2f} ms at the largest batch: "
                f"{c['tiles_per_s']:.0f} tiles/s, {c['mpx_per_s']:.1f} Mpx/s at the model's resolution"
            )
    if args.out:
        record = {
            "bundle": manifest["version"],
            "device": name,
            "torch": torch.__version__,
            "onnxruntime_providers": providers,
            "batches": batches,
            "ms": results,
            "tile_ceiling": ceilings,
            "prompts_per_tile": args.prompts_per_tile,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
