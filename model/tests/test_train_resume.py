"""Training commands: a run interrupted after epoch 1 and resumed ends with exactly the weights of an
uninterrupted run, for both stages; and a few steps lower each stage's loss. Synthetic tiles in
the ../shared/data layout, so no real data is needed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfrsam.synthetic import synthetic_he_image
from cfrsam.train import stage1, stage2


def _write_set(root, n=2, size=256, prefix="tile"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, centres = synthetic_he_image(size, seed=i, nuclei=12)
        labels = np.zeros((size, size), dtype=np.uint16)
        yy, xx = np.mgrid[0:size, 0:size]
        for k, (x, y) in enumerate(centres, start=1):
            labels[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 25] = k
        Image.fromarray(rgb).save(root / f"{prefix}{i}.png")
        Image.fromarray(labels.astype(np.int32)).convert("I;16").save(root / f"{prefix}{i}.labels.png")
        classes = {str(k): k % 4 for k in range(1, int(labels.max()) + 1)}
        (root / f"{prefix}{i}.json").write_text(
            json.dumps(
                {
                    "classNames": ["other", "inflammatory", "epithelial", "spindle-shaped"],
                    "classes": classes,
                    "instances": int(labels.max()),
                }
            )
        )


def _args(data, out, epochs, extra=()):
    return [
        "--data",
        str(data),
        "--sets",
        "synth",
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "1",
        "--threads",
        "1",
        *extra,
    ]


def _weights(path):
    return torch.load(path, map_location="cpu")["model"]


@pytest.mark.parametrize("flags", [(), ("--bf16", "--channels-last")], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", [stage1, stage2], ids=["stage1", "stage2"])
def test_resume_is_exact(tmp_path, stage, flags):
    data = tmp_path / "data"
    _write_set(data / "synth")
    extra = ("--max-prompts", "4", *flags) if stage is stage2 else ("--class-weights", "balanced", *flags)
    assert stage.main(_args(data, tmp_path / "straight", 2, extra)) == 0
    # Interrupted after epoch 1 (a time budget that has run out), then resumed with the same flags.
    assert stage.main(_args(data, tmp_path / "resumed", 2, (*extra, "--time-budget", "1e-9"))) == 0
    assert stage.main(_args(data, tmp_path / "resumed", 2, (*extra, "--resume"))) == 0
    straight, resumed = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2]


@pytest.mark.parametrize("stage", [stage1, stage2], ids=["stage1", "stage2"])
def test_steps_lower_the_loss(tmp_path, stage):
    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    extra = ("--max-prompts", "4", "--lr", "1e-3") if stage is stage2 else ("--lr", "2e-3")
    assert stage.main(_args(data, tmp_path / "run", 6, extra)) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in log if r["event"] == "epoch"]
    assert len(losses) == 6
    assert min(losses[-2:]) < losses[0]


BUNDLE = Path(__file__).resolve().parents[2] / "models" / "tiny"


@pytest.mark.skipif(not (BUNDLE / "weights.pt").is_file(), reason="models/tiny is not here")
@pytest.mark.parametrize("stage", [stage1, stage2], ids=["stage1", "stage2"])
def test_init_from_a_bundle(tmp_path, stage):
    """--init takes an exported bundle: its float16 weights, widened, are where training starts."""
    from cfrsam.export import load_bundle_model

    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    # Stage 2 also takes the bundle as --stage1, and prompts with its served points.
    extra = ("--max-prompts", "4", "--stage1", str(BUNDLE), "--served-prompts", "1") if stage is stage2 else ()
    assert stage.main(_args(data, tmp_path / "run", 1, (*extra, "--init", str(BUNDLE), "--lr", "0"))) == 0
    shipped, _ = load_bundle_model(str(BUNDLE))
    trained = _weights(tmp_path / "run" / "last.pt")
    # Parameters only: BatchNorm running statistics move in a training step even at lr 0.
    for name, value in shipped.named_parameters():
        assert torch.equal(trained[name], value), name


def test_domain_adversarial_stage1_resumes_exactly(tmp_path):
    """--domain-adversarial: the source-set classifier trains (its loss is logged), its state is kept
    in last.pt so that a resumed run ends with the weights of a straight one, and it never enters the
    model's checkpoint."""
    data = tmp_path / "data"
    _write_set(data / "synth")
    _write_set(data / "other", prefix="other")
    extra = ("--sets", "synth,other", "--domain-adversarial", "0.5")
    assert stage1.main(_args(data, tmp_path / "straight", 2, extra)) == 0
    assert stage1.main(_args(data, tmp_path / "resumed", 2, (*extra, "--time-budget", "1e-9"))) == 0
    assert stage1.main(_args(data, tmp_path / "resumed", 2, (*extra, "--resume"))) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu")
    resumed = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu")
    for name in straight["model"]:
        assert torch.equal(straight["model"][name], resumed["model"][name]), name
    for name, value in straight["extra"]["auxiliary"].items():
        assert torch.equal(value, resumed["extra"]["auxiliary"][name]), name
    assert not any("adversary" in k or "domain" in k for k in straight["model"])
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert all(r["train_loss_domain"] > 0 for r in epochs)


def test_weight_average_follows_the_steps_and_lends_its_weights():
    from cfrsam.train.ema import WeightAverage

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # 0.5 * 1 + 0.5 * 3
    with ema.applied(model):
        assert torch.allclose(model.weight, torch.full((1, 2), 2.0))
    assert torch.allclose(model.weight, torch.full((1, 2), 3.0)), "the model's own weights come back"
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)
    # Frozen parameters are not averaged step by step: the shadow keeps what it was made from.
    model.bias.requires_grad_(False)
    frozen = WeightAverage(model, decay=0.5)
    assert "bias" in frozen.frozen and "weight" not in frozen.frozen


@pytest.mark.parametrize("stage", [stage1, stage2], ids=["stage1", "stage2"])
def test_ema_resumes_exactly(tmp_path, stage):
    """--ema: last.pt keeps the average beside the raw weights, a resumed run ends with the average
    of a straight one, and the average differs from the raw weights (it lags them)."""
    data = tmp_path / "data"
    _write_set(data / "synth")
    extra = ("--ema", "0.9", *(("--max-prompts", "4") if stage is stage2 else ()))
    assert stage.main(_args(data, tmp_path / "straight", 2, extra)) == 0
    assert stage.main(_args(data, tmp_path / "resumed", 2, (*extra, "--time-budget", "1e-9"))) == 0
    assert stage.main(_args(data, tmp_path / "resumed", 2, (*extra, "--resume"))) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu")
    resumed = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu")
    shadow = straight["extra"]["ema"]["shadow"]
    for name, value in shadow.items():
        assert torch.equal(value, resumed["extra"]["ema"]["shadow"][name]), name
    moved = [n for n, v in straight["model"].items() if v.is_floating_point() and not torch.equal(v.float(), shadow[n])]
    assert moved, "the average should lag the trained weights"


def _two_small_nuclei_batch():
    """One 32 px image holding two touching 3 x 3 nuclei, centred on (10.5, 10.5) and (13.5, 10.5)."""
    instances = torch.zeros(32, 32, dtype=torch.int64)
    instances[9:12, 9:12] = 1
    instances[9:12, 12:15] = 2
    return {"centroids": [torch.tensor([[10.5, 10.5], [13.5, 10.5]])], "instances": [instances]}


@pytest.mark.parametrize("off_nucleus", [False, True])
def test_stage2_prompt_jitter_stays_on_the_nucleus_unless_asked(off_nucleus):
    # The prompter's points sit a few pixels off the centroid, often off a small nucleus; stage 2
    # can train on such prompts (--jitter-off-nucleus) or snap them back onto the nucleus. A point
    # is never left on the other nucleus: it would ask for two masks at once.
    batch = _two_small_nuclei_batch()
    instances = batch["instances"][0]
    rng = np.random.default_rng(0)
    on_background = 0
    for _ in range(100):
        coords, labels, targets, valid = stage2.sample_prompts(batch, 4, 3.0, 32, rng, off_nucleus=off_nucleus)
        assert valid[0].tolist() == [True, True, False, False]
        for j in range(2):
            assert labels[0, j, 0] == 1.0 and float(targets[0, j].sum()) == 9.0
            own = int(instances[targets[0, j] > 0][0])
            x, y = coords[0, j, 0].tolist()
            under = int(instances[int(y), int(x)])
            assert under in (0, own)
            on_background += under == 0
    if off_nucleus:
        assert on_background > 100  # two 3 x 3 nuclei hold few draws of a 3 px jitter
    else:
        assert on_background == 0


@pytest.mark.skipif(not (BUNDLE / "weights.pt").is_file(), reason="models/tiny is not here")
def test_prompt_location_report(tmp_path):
    """The prompt-location analysis runs the serving rules with each kind of prompt and reports them."""
    from cfrsam.train import prompt_location

    data = tmp_path / "data"
    _write_set(data / "consep-train", n=2, prefix="train_3_00")
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(BUNDLE), "--data", str(data), "--val-sources", "3", "--threads", "1"]
    assert prompt_location.main([*argv, "--jitters", "0,3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tiles"] == 2
    runs = report["runs"]
    assert set(runs) == {"pipeline", "oracle_location", "gt", "gt_prompter_offsets", "gt_jitter_0", "gt_jitter_3"}
    # Ground-truth centroids with no jitter are the same prompts as "gt": the same segmentation.
    assert runs["gt_jitter_0"] == runs["gt"]
    assert report["offsets"]["paired_points"] >= 0
    for figures in runs.values():
        assert 0.0 <= figures["bpq"] <= 1.0 and 0.0 <= figures["aji"] <= 1.0


def test_stage1_dense_regression_and_point_head_rate(tmp_path):
    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    flags = ("--dense-regression", "inside", "--head-lr-mult", "10", "--lr", "1e-3")
    assert stage1.main(_args(data, tmp_path / "run", 1, flags)) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epoch = [r for r in log if r["event"] == "epoch"][0]
    assert epoch["train_loss_reg_dense"] > 0  # anchors on the synthetic nuclei were trained
    groups = torch.load(tmp_path / "run" / "last.pt", map_location="cpu")["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(10 * groups[0]["initial_lr"])


def test_stage2_interior_prompts_cover_the_nucleus():
    # --interior-prompts 1: every prompt is a point drawn over its own nucleus (SAM's sampling), so
    # the draws reach all nine pixels of a 3 x 3 nucleus, not only its centre.
    batch = _two_small_nuclei_batch()
    instances = batch["instances"][0]
    rng = np.random.default_rng(0)
    pixels = {1: set(), 2: set()}
    for _ in range(100):
        coords, labels, targets, valid = stage2.sample_prompts(batch, 4, 0.0, 32, rng, interior=1.0)
        for j in range(2):
            own = int(instances[targets[0, j] > 0][0])
            x, y = coords[0, j, 0].tolist()
            assert int(instances[int(y), int(x)]) == own
            pixels[own].add((int(x), int(y)))
    assert len(pixels[1]) == len(pixels[2]) == 9
    # With no interior share and no jitter every prompt is the centroid.
    coords, *_ = stage2.sample_prompts(batch, 4, 0.0, 32, rng, interior=0.0)
    assert sorted(coords[0, :2, 0].tolist()) == [[10.5, 10.5], [13.5, 10.5]]


@pytest.mark.skipif(not (BUNDLE / "weights.pt").is_file(), reason="models/tiny is not here")
def test_kept_anchors_report(tmp_path):
    """Every kept point is counted once, as from a matched anchor or not; offsets within the radius."""
    from cfrsam.train import kept_anchors

    data = tmp_path / "data"
    _write_set(data / "consep-train", n=2, prefix="train_3_00")
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(BUNDLE), "--data", str(data), "--val-sources", "3", "--min-foreground", "0.1"]
    assert kept_anchors.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tiles"] == 2
    kinds = [report["from_matched_anchors"], report["from_other_anchors"]]
    assert sum(k["kept"] for k in kinds) > 0
    for kind in kinds:
        assert 0 <= kind["paired"] <= kind["kept"]
        if kind["paired"]:
            assert 0.0 <= kind["median_px"] <= kind["p90_px"] <= 12.0


def test_stage2_freeze_keeps_the_named_modules(tmp_path):
    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    out = tmp_path / "run"
    assert stage2.main(_args(data, out, 1, ("--max-prompts", "4", "--freeze", "image_encoder,hmfm"))) == 0
    first = _weights(out / "last.pt")
    assert (
        stage2.main(_args(data, tmp_path / "again", 2, ("--max-prompts", "4", "--freeze", "image_encoder,hmfm"))) == 0
    )
    second = _weights(tmp_path / "again" / "last.pt")
    # Same seed: after one more step the frozen modules are where they were, the decoder moved.
    params = [k for k in first if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(first[k], second[k]) for k in params if k.startswith(("image_encoder.", "hmfm.")))
    assert any(not torch.equal(first[k], second[k]) for k in params if k.startswith("mask_decoder."))
    with pytest.raises(SystemExit, match="no parameters under encoder"):
        stage2.main(_args(data, tmp_path / "typo", 1, ("--max-prompts", "4", "--freeze", "encoder")))


class _PointsAt(torch.nn.Module):
    """A prompt learner that answers fixed points, one per ground-truth centroid plus an offset."""

    def __init__(self, centroids, offset):
        super().__init__()
        self.points = torch.as_tensor(centroids, dtype=torch.float32) + torch.tensor(offset, dtype=torch.float32)

    def forward(self, image):
        n = self.points.shape[0]
        logits = torch.full((image.shape[0], n, 5), -10.0)
        logits[..., 1] = 10.0  # confidently "inflammatory", never background
        return {"points": self.points.expand(image.shape[0], n, 2), "logits": logits}


@pytest.mark.parametrize("offset,placed", [((3.0, 0.0), 1.0), ((3.0, 4.0), 0.0)])
def test_stage1_validation_reports_where_points_sit(offset, placed):
    centroids = np.array([[40.0, 40.0], [120.0, 60.0], [200.0, 200.0]], dtype=np.float32)
    batch = {
        "image": torch.zeros(1, 3, 256, 256),
        "centroids": [torch.from_numpy(centroids)],
        "classes": [torch.tensor([1, 1, 2])],
    }
    model = torch.nn.Module()
    model.prompt_learner = _PointsAt(centroids, offset)
    val = stage1.validate(model, [batch], torch.device("cpu"), radius=12, min_foreground=0.3, nms_radius=4)
    distance = float(np.hypot(*offset))
    assert val["det_f1"] == 1.0
    assert val["type_accuracy"] == pytest.approx(2 / 3)
    assert val["placement_mean"] == pytest.approx(distance)
    assert val["placement_median"] == pytest.approx(distance)
    # Within stage1.PLACED_RADIUS (4 px) or not: 3 px off counts, 5 px off does not.
    assert val["det_f1_placed"] == placed


def test_stage2_negatives_are_the_neighbouring_centroids():
    # Two nuclei 3 px apart: with --negatives 2 each prompt carries the other nucleus' centroid as a
    # negative point (label 0) and one padding slot (label -1); beyond the radius, only padding.
    batch = _two_small_nuclei_batch()
    rng = np.random.default_rng(0)
    coords, labels, targets, valid = stage2.sample_prompts(batch, 4, 0.0, 32, rng, negatives=2, negative_radius=5.0)
    assert coords.shape == (1, 4, 3, 2) and labels.shape == (1, 4, 3)
    for j in range(2):
        assert labels[0, j].tolist() == [1.0, 0.0, -1.0]
        own, other = coords[0, j, 0].tolist(), coords[0, j, 1].tolist()
        assert own != other and sorted([own, other]) == [[10.5, 10.5], [13.5, 10.5]]
    _, far_labels, *_ = stage2.sample_prompts(batch, 4, 0.0, 32, rng, negatives=2, negative_radius=2.0)
    assert far_labels[0, :2].tolist() == [[1.0, -1.0, -1.0]] * 2


def test_epochs_within_budget_judges_by_the_first_epoch():
    from cfrsam.train.common import epochs_within_budget

    assert epochs_within_budget(6.0, 40.0, 200, 1) == 9  # 360 s / 40 s
    assert epochs_within_budget(6.0, 40.0, 5, 1) == 5  # never more than asked for
    assert epochs_within_budget(0.1, 40.0, 200, 1) == 1  # never fewer than done


def test_fit_to_budget_ends_the_cosine_schedule_with_the_budget(tmp_path):
    """--fit-to-budget: a budget that ends after epoch 1 shortens the schedule to that epoch (its
    learning rate reaches 0 there, and last.pt keeps the fitted length for --resume); without the
    flag the budget only stops the run and the schedule keeps --epochs (test_resume_is_exact)."""
    from cfrsam.train.common import WarmupCosine

    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    for name, flags in (("fitted", ("--fit-to-budget",)), ("stopped", ())):
        extra = ("--time-budget", "1e-9", *flags)
        assert stage1.main(_args(data, tmp_path / name, 50, extra)) == 0
    fitted = torch.load(tmp_path / "fitted" / "last.pt", map_location="cpu")["scheduler"]["lr_lambdas"][0]
    stopped = torch.load(tmp_path / "stopped" / "last.pt", map_location="cpu")["scheduler"]["lr_lambdas"][0]
    assert fitted["total"] == 1 and stopped["total"] == 50
    schedule = WarmupCosine(50, fitted["total"])
    assert schedule(1) == 0.0 and schedule(0) > 0.0


def test_served_prompt_targets_follow_the_nucleus_under_each_point():
    instances = torch.zeros(32, 32, dtype=torch.int64)
    instances[4:10, 4:10] = 1
    instances[20:26, 20:26] = 2
    centroids = np.array([[7.0, 7.0], [23.0, 23.0]])
    points = np.array([[5.5, 8.5], [19.0, 19.0], [30.0, 2.0]])  # on nucleus 1, beside nucleus 2, on nothing
    coords, targets = stage2.prompt_targets(points, instances, centroids, radius=6.0, false_points=False)
    assert coords == [(5.5, 8.5), (19.0, 19.0)]
    assert torch.equal(targets[0], instances == 1) and torch.equal(targets[1], instances == 2)
    coords, targets = stage2.prompt_targets(points, instances, centroids, radius=6.0, false_points=True)
    assert len(coords) == 3 and not targets[2].any()  # a false detection asks for no nucleus
    # The points come from the model's own prompter (an untrained one here, so from anywhere).
    from cfrsam import build_cfr_sam

    model = build_cfr_sam("tiny", input_size=64, window=32, seed=0)
    big = torch.zeros(64, 64, dtype=torch.int64)
    big[:32, :32] = instances
    batch = {"image": torch.randn(1, 3, 64, 64), "instances": [big], "centroids": [torch.from_numpy(centroids)]}
    rng = np.random.default_rng(0)
    chosen = stage2.served_prompts(model, batch, 3, 64, rng, 1.0, 0.0, 2.0, 64.0, True, "cpu")
    coords, masks = chosen[0]
    assert coords.shape == (3, 2) and masks.shape == (3, 64, 64)
    assert stage2.served_prompts(model, batch, 3, 64, rng, 0.0, 0.0, 2.0, 64.0, True, "cpu") == {}


def test_stage2_served_prompts_with_a_conv_stem(tmp_path):
    data = tmp_path / "data"
    _write_set(data / "synth", n=1)
    flags = (
        "--max-prompts", "4", "--served-prompts", "1", "--served-false-points", "--min-foreground", "0.0",
        "--conv-stem", "8,16", "--freeze", "image_encoder.pos_embed,image_encoder.blocks",
    )  # fmt: skip
    assert stage2.main(_args(data, tmp_path / "one", 1, flags)) == 0
    assert stage2.main(_args(data, tmp_path / "two", 2, flags)) == 0
    first, second = _weights(tmp_path / "one" / "last.pt"), _weights(tmp_path / "two" / "last.pt")
    assert torch.equal(first["image_encoder.pos_embed"], second["image_encoder.pos_embed"])  # one parameter frozen
    assert not torch.equal(first["image_encoder.conv_stem.proj.weight"], second["image_encoder.conv_stem.proj.weight"])
    config = torch.load(tmp_path / "two" / "last.pt", map_location="cpu")["config"]
    assert tuple(config["image_encoder"]["conv_stem"]) == (8, 16)
