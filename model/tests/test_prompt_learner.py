"""Prompt learner: presets, shapes, anchors, ONNX export, loss."""

import io
import json
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from cfrsam.prompt_learner import (
    PRESET_NAMES,
    PromptLearner,
    PromptLearnerConfig,
    PromptLearnerLoss,
    PrompterGraph,
    decode_prompts,
    prompt_learner_config,
    sigmoid_focal_loss,
    uniform_anchor_grid,
)
from cfrsam.prompt_learner.loss import foreground_target

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def femto(**overrides) -> PromptLearnerConfig:
    values = dict(input_size=64, num_classes=3)
    values.update(overrides)
    return prompt_learner_config("femto", **values)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_and_unknown_name():
    assert set(PRESET_NAMES) >= {"femto", "tiny", "small"}
    small = prompt_learner_config("small", num_classes=5)
    assert small.backbone_dims == (96, 192, 384, 768)
    assert small.backbone_depths == (3, 3, 27, 3)
    assert small.num_classes == 5 and small.background_index == 5
    with pytest.raises(ValueError, match="femto"):
        prompt_learner_config("huge")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by 32"):
        femto(input_size=100)
    with pytest.raises(ValueError):
        femto(anchor_stride=6)
    cfg = femto(anchors_per_cell=2)
    assert cfg.num_anchors == (64 // 8) ** 2 * 2
    assert PromptLearnerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("per_cell", [1, 2])
def test_forward_shapes(per_cell):
    cfg = femto(anchors_per_cell=per_cell)
    model = PromptLearner(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    a = cfg.num_anchors
    assert out["points"].shape == (2, a, 2)
    assert out["anchors"].shape == (2, a, 2)
    assert out["logits"].shape == (2, a, 4)
    assert out["foreground_logits"].shape == (2, 1, 16, 16)
    # Offsets start at zero: the first prediction is the uniform grid itself.
    grid = uniform_anchor_grid(64, 8, per_cell)
    assert torch.allclose(out["points"][0], grid)
    assert torch.allclose(out["anchors"][1], grid)


def test_small_preset_shapes_and_size():
    cfg = prompt_learner_config("small", num_classes=2, input_size=64)
    model = PromptLearner(cfg).eval()
    # ConvNeXt-S itself is ~49.5M parameters (50.2M in timm, with its 0.8M classifier).
    assert 49e6 < count_params(model.backbone) < 50e6
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["points"].shape == (1, 64, 2)
    assert out["logits"].shape == (1, 64, 3)


def test_uniform_anchor_grid():
    grid = uniform_anchor_grid(32, 8, 1)
    assert grid.shape == (16, 2)
    assert grid[0].tolist() == [4.0, 4.0]
    assert grid[1].tolist() == [12.0, 4.0]  # row-major: x varies fastest
    assert grid[4].tolist() == [4.0, 12.0]
    two = uniform_anchor_grid(32, 8, 2)
    assert two[:2].tolist() == [[2.0, 2.0], [6.0, 6.0]]
    four = uniform_anchor_grid(32, 8, 4)
    assert four[:4].tolist() == [[2.0, 2.0], [6.0, 2.0], [2.0, 6.0], [6.0, 6.0]]


def test_bad_input_size():
    model = PromptLearner(femto()).eval()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 64, 64))


def test_anchors_are_learnable():
    model = PromptLearner(femto())
    assert isinstance(model.anchor_points, torch.nn.Parameter)
    out = model(torch.randn(1, 3, 64, 64))
    out["points"].sum().backward()
    assert model.anchor_points.grad is not None
    assert model.anchor_points.grad.abs().sum() > 0
    fixed = PromptLearner(femto(learnable_anchors=False))
    assert "anchor_points" in dict(fixed.named_buffers())


def export_prompter(model: PromptLearner, batch: int = 1) -> bytes:
    graph = PrompterGraph(model).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            torch.randn(batch, 3, model.cfg.input_size, model.cfg.input_size),
            f,
            opset_version=17,
            input_names=["image"],
            output_names=list(PrompterGraph.output_names),
            dynamic_axes={"image": {0: "B"}, "points": {0: "B"}, "logits": {0: "B"}},
        )
    return f.getvalue()


def test_onnx_export_dynamic_batch():
    model = PromptLearner(femto(anchors_per_cell=2)).eval()
    proto = onnx.load_from_string(export_prompter(model))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["points", "logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "B"
    for output in proto.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "B"
    ops = {node.op_type for node in proto.graph.node}
    # The anchors' features are sampled by row gathers (sample_border_by_rows), not GridSample.
    assert "Gather" in ops and "GridSample" not in ops


ORT_NODE = REPO / "node_modules" / "onnxruntime-node"

_ORT_SCRIPT = r"""
const ort = require(process.argv[2]);
const fs = require('fs');
const read = f => { const b = fs.readFileSync(f); return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length)); };
(async () => {
  const spec = JSON.parse(fs.readFileSync(process.argv[3]));
  const session = await ort.InferenceSession.create(spec.model);
  const result = await session.run({ image: new ort.Tensor('float32', read(spec.image), spec.shape) });
  const diffs = {};
  for (const [name, file] of Object.entries(spec.outputs)) {
    const ref = read(file); let d = 0;
    for (let i = 0; i < ref.length; i++) d = Math.max(d, Math.abs(ref[i] - result[name].data[i]));
    diffs[name] = { maxdiff: d, dims: result[name].dims };
  }
  console.log(JSON.stringify(diffs));
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.mark.skipif(
    shutil.which("node") is None or not ORT_NODE.is_dir(),
    reason="node or node_modules/onnxruntime-node not installed (run npm install at the repo root)",
)
def test_onnx_matches_pytorch_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = PromptLearner(femto(anchors_per_cell=2)).eval()
    with torch.no_grad():  # non-zero offsets, so both sampling passes matter
        for head in (model.offset_head, model.regression_head):
            head.fc2.weight.normal_(0, 0.5)
            head.fc2.bias.normal_(0, 3.0)
    (tmp_path / "p.onnx").write_bytes(export_prompter(model, batch=1))
    image = torch.randn(3, 3, 64, 64)  # exported at batch 1, run at batch 3
    with torch.no_grad():
        out = model(image)
    image.numpy().tofile(tmp_path / "image.bin")
    out["points"].numpy().tofile(tmp_path / "points.bin")
    out["logits"].numpy().tofile(tmp_path / "logits.bin")
    spec = {
        "model": str(tmp_path / "p.onnx"),
        "image": str(tmp_path / "image.bin"),
        "shape": [3, 3, 64, 64],
        "outputs": {"points": str(tmp_path / "points.bin"), "logits": str(tmp_path / "logits.bin")},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "run.cjs").write_text(_ORT_SCRIPT)
    proc = subprocess.run(
        ["node", str(tmp_path / "run.cjs"), str(ORT_NODE), str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    diffs = json.loads(proc.stdout)
    assert diffs["points"]["dims"] == [3, model.cfg.num_anchors, 2]
    assert diffs["points"]["maxdiff"] < 1e-3  # pixels
    assert diffs["logits"]["maxdiff"] < 1e-4


def test_decode_prompts_drops_background():
    points = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 4.0, 1.0]]])  # K = 2
    (prompts,) = decode_prompts(points, logits)
    assert prompts["anchor_index"].tolist() == [0, 2]
    assert prompts["classes"].tolist() == [0, 1]
    assert prompts["points"].tolist() == [[1.0, 2.0], [5.0, 6.0]]


# ----------------------------------------------------------------------------------------------
# Loss


def test_classification_loss_is_weighted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    matches = [(torch.tensor([1, 4]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    classes = [torch.tensor([2, 0]), torch.tensor([1])]
    loss = PromptLearnerLoss(background_weight=0.4)
    target = torch.full((2, 6), 3)
    target[0, 1], target[0, 4], target[1, 2] = 0, 2, 1
    expected = F.cross_entropy(logits.transpose(1, 2), target, weight=torch.tensor([1.0, 1.0, 1.0, 0.4]))
    assert torch.allclose(loss.classification_loss(logits, matches, classes), expected)


def test_class_weights_are_cross_entropy_weights():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    matches = [(torch.tensor([1, 4]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    classes = [torch.tensor([2, 0]), torch.tensor([1])]
    loss = PromptLearnerLoss(background_weight=0.4, class_weights=[3.0, 0.5, 2.0])
    target = torch.full((2, 6), 3)
    target[0, 1], target[0, 4], target[1, 2] = 0, 2, 1
    expected = F.cross_entropy(logits.transpose(1, 2), target, weight=torch.tensor([3.0, 0.5, 2.0, 0.4]))
    assert torch.allclose(loss.classification_loss(logits, matches, classes), expected)
    # Unknown-class nuclei keep weight 1 whatever the class weights.
    unknown = PromptLearnerLoss(class_weights=[5.0, 5.0]).classification_loss(
        torch.tensor([[[2.0, 1.0, 0.5]]]), [(torch.tensor([0]), torch.tensor([0]))], [torch.tensor([-1])]
    )
    p = torch.tensor([2.0, 1.0, 0.5]).softmax(-1)
    assert torch.allclose(unknown, -torch.log(p[0] + p[1]))
    with pytest.raises(ValueError):
        PromptLearnerLoss(class_weights=[1.0]).classification_loss(logits, matches, classes)


def test_unknown_class_trains_nucleus_vs_background():
    logits = torch.tensor([[[2.0, 1.0, 0.5]]])  # K = 2
    loss = PromptLearnerLoss(background_weight=0.4)
    value = loss.classification_loss(logits, [(torch.tensor([0]), torch.tensor([0]))], [torch.tensor([-1])])
    p = logits.softmax(-1)[0, 0]
    assert torch.allclose(value, -torch.log(p[0] + p[1]))


def test_focal_loss_and_foreground_target():
    logits = torch.tensor([[[[0.0, 2.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    manual = torch.stack(
        [-((1 - p[0, 0, 0, 0]) ** 2) * torch.log(p[0, 0, 0, 0]), -((p[0, 0, 0, 1]) ** 2) * torch.log(1 - p[0, 0, 0, 1])]
    ).mean()
    assert torch.allclose(sigmoid_focal_loss(logits, target), manual)
    full = torch.zeros(1, 8, 8)
    full[0, :4, :4] = 1
    full[0, 4:, 4:6] = 1  # half of a 4x4 cell counts as foreground
    full[0, :4, 4] = 1  # a quarter does not
    down = foreground_target(full, (2, 2))
    assert down[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def synthetic_batch(size=64, seed=0):
    """Bright disks on a dark background, with their centres as centroids."""
    rng = np.random.default_rng(seed)
    images, fgs, cents, classes = [], [], [], []
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(2):
        n = int(rng.integers(3, 7))
        c = rng.uniform(6, size - 6, size=(n, 2)).astype(np.float32)
        fg = np.zeros((size, size), dtype=np.float32)
        for x, y in c:
            fg[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = 1.0
        images.append(torch.from_numpy(np.repeat(fg[None] * 2 - 1, 3, axis=0)))
        fgs.append(torch.from_numpy(fg))
        cents.append(torch.from_numpy(c))
        classes.append(torch.from_numpy(rng.integers(0, 3, size=n)))
    return torch.stack(images), {"centroids": cents, "classes": classes, "foreground": torch.stack(fgs)}


def test_loss_decreases_with_training():
    torch.manual_seed(0)
    model = PromptLearner(femto())
    criterion = PromptLearnerLoss()
    image, targets = synthetic_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    totals = []
    for _ in range(10):
        losses = criterion(model(image), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        totals.append(losses["loss"].item())
    assert set(losses) == {"loss", "loss_cls", "loss_reg", "loss_mask", "num_matched"}
    assert losses["num_matched"].item() == sum(len(c) for c in targets["centroids"])
    assert np.isfinite(totals).all()
    assert np.mean(totals[-3:]) < 0.7 * totals[0], totals


def test_loss_with_no_nuclei():
    model = PromptLearner(femto()).eval()
    targets = {
        "centroids": [torch.zeros(0, 2)],
        "classes": [torch.zeros(0, dtype=torch.long)],
        "foreground": torch.zeros(1, 64, 64),
    }
    losses = PromptLearnerLoss()(model(torch.randn(1, 3, 64, 64)), targets)
    assert losses["loss_reg"].item() == 0.0
    assert losses["num_matched"].item() == 0
    assert torch.isfinite(losses["loss"])


def test_loss_rejects_out_of_range_classes():
    model = PromptLearner(femto()).eval()
    targets = {
        "centroids": [torch.tensor([[10.0, 10.0]])],
        "classes": [torch.tensor([3])],  # K = 3: valid classes are 0..2
        "foreground": torch.zeros(1, 64, 64),
    }
    with pytest.raises(ValueError, match="out of range"):
        PromptLearnerLoss()(model(torch.randn(1, 3, 64, 64)), targets)


def test_row_gather_sampling_equals_grid_sample_at_any_batch():
    from cfrsam.prompt_learner.prompt_learner import sample_border_by_rows

    def reference(f, g):
        return F.grid_sample(f, g, mode="bilinear", padding_mode="border", align_corners=False)

    torch.manual_seed(0)
    feature, grid = torch.randn(2, 5, 7, 9), torch.rand(2, 4, 6, 2) * 2.4 - 1.2  # some points past the border
    assert torch.allclose(sample_border_by_rows(feature, grid), reference(feature, grid), atol=1e-5)
    # Traced (as the ONNX export records it) at batch 2, run at batch 3: the batch stays dynamic.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(sample_border_by_rows, (feature, grid))
    feature3, grid3 = torch.randn(3, 5, 7, 9), torch.rand(3, 4, 6, 2) * 2 - 1
    assert torch.allclose(traced(feature3, grid3), reference(feature3, grid3), atol=1e-5)


def _one_nucleus_loss_inputs(anchors, points, logits, nucleus_class=0, foreground=None):
    """PromptLearnerLoss inputs for one 64 x 64 image with one nucleus centred at (32, 32)."""
    outputs = {"points": points, "anchors": anchors, "logits": logits, "foreground_logits": torch.zeros(1, 1, 16, 16)}
    targets = {
        "centroids": [torch.tensor([[32.0, 32.0]])],
        "classes": [torch.tensor([nucleus_class])],
        "foreground": torch.zeros(1, 64, 64) if foreground is None else foreground,
    }
    return outputs, targets


def test_dense_regression_trains_the_neighbours_of_a_nucleus():
    # Three anchors: one on the nucleus (the matched one), one 5 px away whose point sits 3 px off
    # the centroid, one 20 px away (outside the 12 px radius) whose point is far off.
    anchors = torch.tensor([[[32.0, 32.0], [37.0, 32.0], [52.0, 32.0]]])
    points = torch.tensor([[[32.0, 32.0], [35.0, 32.0], [60.0, 40.0]]], requires_grad=True)
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0]]])  # K = 1: nucleus, background
    outputs, targets = _one_nucleus_loss_inputs(anchors, points, logits)
    plain = PromptLearnerLoss()(outputs, targets)
    assert "loss_reg_dense" not in plain
    assert plain["loss_reg"].item() == 0.0  # the matched anchor is exact: nothing else is trained
    dense = PromptLearnerLoss(dense_regression="radius", dense_regression_weight=0.01)(outputs, targets)
    assert dense["loss_reg_dense"].item() == pytest.approx(9.0)  # (35 - 32)^2, over one nucleus
    assert dense["loss"].item() == pytest.approx(plain["loss"].item() + 0.09, abs=1e-5)
    dense["loss"].backward()
    # Only the neighbour inside the radius is pulled, towards the centroid (-x).
    assert points.grad[0, 1, 0].item() > 0 and points.grad[0, 1, 1].item() == 0
    assert torch.count_nonzero(points.grad[0, 2]) == 0


def test_dense_regression_inside_follows_the_instance_map():
    # A nucleus (instance 1) covering x 28..39; anchor 0 on it (matched), anchor 1 on it with its
    # point 3 px off, anchor 2 just beside it (5 px from the centroid, on background).
    instances = torch.zeros(1, 64, 64, dtype=torch.long)
    instances[0, 28:37, 28:40] = 1
    anchors = torch.tensor([[[32.0, 32.0], [38.0, 32.0], [32.0, 27.0]]])
    points = torch.tensor([[[32.0, 32.0], [35.0, 32.0], [32.0, 27.0]]], requires_grad=True)
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0]]])
    outputs, targets = _one_nucleus_loss_inputs(anchors, points, logits, foreground=(instances > 0).float())
    targets["instances"] = instances
    inside = PromptLearnerLoss(dense_regression="inside")(outputs, targets)
    assert inside["loss_reg_dense"].item() == pytest.approx(9.0)  # only anchor 1: (35 - 32)^2
    near = PromptLearnerLoss(dense_regression="radius", dense_regression_radius=6.0)(outputs, targets)
    assert near["loss_reg_dense"].item() == pytest.approx(9.0 + 25.0)  # anchor 2 is within 6 px
    with pytest.raises(ValueError, match="instances"):
        PromptLearnerLoss(dense_regression="inside")(outputs, {k: v for k, v in targets.items() if k != "instances"})
    with pytest.raises(ValueError, match="dense_regression"):
        PromptLearnerLoss(dense_regression="everywhere")


def test_quality_targets_rank_the_neighbours_by_where_their_points_land():
    # Anchor 0 is matched (exact point); anchor 1's point is 2 px off the centroid, anchor 2's 10 px
    # (beyond 3 sigma at sigma 2), so only anchor 1 gets a soft target: q = exp(-4 / 8).
    anchors = torch.tensor([[[32.0, 32.0], [36.0, 32.0], [44.0, 32.0]]])
    points = torch.tensor([[[32.0, 32.0], [34.0, 32.0], [42.0, 32.0]]])
    logits = torch.zeros(1, 3, 3, requires_grad=True)  # K = 2 classes + background, all p = 1/3
    outputs, targets = _one_nucleus_loss_inputs(anchors, points, logits, nucleus_class=1)
    plain = PromptLearnerLoss()(outputs, targets)
    quality = PromptLearnerLoss(quality_sigma=2.0)(outputs, targets)
    # With uniform probabilities every anchor's loss is log 3 either way: the loss value is equal.
    assert quality["loss_cls"].item() == pytest.approx(plain["loss_cls"].item())
    quality["loss"].backward()
    q = math.exp(-0.5)
    grad = logits.grad[0]
    # Soft CE gradient is p - t: anchor 1 is pulled towards class 1 by q and background by 1 - q.
    weight_sum = 1.0 + 2 * 0.4  # the matched anchor (class weight 1) and two background-weighted ones
    assert grad[1, 1].item() == pytest.approx(0.4 * (1 / 3 - q) / weight_sum, abs=1e-5)
    assert grad[1, 2].item() == pytest.approx(0.4 * (1 / 3 - (1 - q)) / weight_sum, abs=1e-5)
    assert grad[2, 2].item() == pytest.approx(0.4 * (1 / 3 - 1) / weight_sum, abs=1e-5)  # still background
    with pytest.raises(ValueError, match="quality_sigma"):
        PromptLearnerLoss(quality_sigma=-1.0)
