"""The embedded digits model: packaged weights, pipeline, weight-file errors, training script, calibration."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

import meancache  # noqa: E402
from meancache.examples.digits import WEIGHTS_PATH  # noqa: E402
from meancache.examples.digits import build_pipeline  # noqa: E402
from meancache.examples.digits import load_pipeline  # noqa: E402
from meancache.examples.digits import save_weights  # noqa: E402
from meancache.examples.digits.calibration import PRESET_BUDGETS  # noqa: E402
from meancache.calibrate import DEFAULT_GAMMA  # noqa: E402
from meancache.calibrate import segment_costs  # noqa: E402
from meancache.examples.digits.calibration import calibration_recording  # noqa: E402
from meancache.examples.digits.classifier import DigitClassifier  # noqa: E402
from meancache.examples.digits.model import pack  # noqa: E402
from meancache.examples.digits.model import sample_noise  # noqa: E402
from meancache.examples.digits.train import load_data  # noqa: E402
from meancache.examples.digits.train import main as train_main  # noqa: E402
from meancache.examples.digits.train import train  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = load_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


def test_packaged_weights_are_small_and_load(pipe):
    size = WEIGHTS_PATH.stat().st_size
    assert 0.5e6 < size < 4e6, size
    out = pipe(list(range(10)), num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt")
    images = out.images
    assert images.shape == (10, 8, 8) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    latents = pipe([4, 4], num_inference_steps=3, latents=sample_noise([1, 2]), output_type="latent").images
    assert latents.shape == (2, 16, 4) and torch.isfinite(latents).all()


def test_fifty_step_samples_show_the_requested_digit(pipe, classifier):
    labels = [j % 10 for j in range(100)]
    images = pipe(labels, num_inference_steps=50, latents=sample_noise(range(100)), output_type="pt").images
    accuracy = classifier.accuracy(images, labels)
    print(f"class accuracy of 100 50-step samples (guidance 3): {accuracy:.3f}; "
          f"classifier holdout accuracy on real digits {classifier.holdout_accuracy:.3f}")
    assert classifier.holdout_accuracy >= 0.9
    assert accuracy >= 0.9


def test_same_seed_same_sample_in_any_batch(pipe):
    a = pipe([3, 5], num_inference_steps=4, latents=sample_noise([7, 8]), output_type="latent").images
    b = pipe([5], num_inference_steps=4, latents=sample_noise([8]), output_type="latent").images
    torch.testing.assert_close(a[1], b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels=[10]), "every label must be a digit 0-9"),
        (dict(class_labels=[-1, 2]), "every label must be a digit 0-9"),
        (dict(class_labels=[1.5]), "integer digits"),
        (dict(class_labels=[]), "non-empty"),
        (dict(class_labels=[1], num_inference_steps=0), "num_inference_steps=0"),
        (dict(class_labels=[1], guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(class_labels=[1], output_type="pil"), "output_type='pil'"),
        (dict(class_labels=[1, 2], latents=torch.zeros(1, 16, 4)), r"latents has shape \(1, 16, 4\)"),
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), "one generator per label"),
    ],
)
def test_pipeline_rejects_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    fresh = build_pipeline(seed=3)
    path = tmp_path / "w.safetensors"
    save_weights(fresh, path)
    loaded = load_pipeline(path)
    for name, p in fresh.transformer.state_dict().items():
        torch.testing.assert_close(loaded.transformer.state_dict()[name], p.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.class_embedding.table.weight, fresh.class_embedding.table.weight.half().float())


def _rewrite(src, dst, edit=None, metadata=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(tensors)
    save_file(tensors, str(dst), metadata=metadata if metadata is not None else meta)


def test_missing_and_corrupt_weight_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_pipeline(missing)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(WEIGHTS_PATH.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors"):
        load_pipeline(corrupt)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_pipeline(garbage)

    foreign = tmp_path / "foreign.safetensors"
    _rewrite(WEIGHTS_PATH, foreign, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="foreign.safetensors: metadata format='something-else'"):
        load_pipeline(foreign)

    def drop(t):
        del t["class_embedding.table.weight"]

    short = tmp_path / "short.safetensors"
    _rewrite(WEIGHTS_PATH, short, drop)
    with pytest.raises(ValueError, match=r"short.safetensors: tensors missing \['class_embedding.table.weight'\]"):
        load_pipeline(short)

    def reshape(t):
        t["class_embedding.table.weight"] = t["class_embedding.table.weight"][:5]

    wrong = tmp_path / "wrong.safetensors"
    _rewrite(WEIGHTS_PATH, wrong, reshape)
    with pytest.raises(ValueError, match="wrong.safetensors: tensor class_embedding.table.weight has shape"):
        load_pipeline(wrong)

    def poison(t):
        t["class_embedding.table.weight"][0, 0] = float("nan")

    nan = tmp_path / "nan.safetensors"
    _rewrite(WEIGHTS_PATH, nan, poison)
    with pytest.raises(ValueError, match="nan.safetensors: tensor class_embedding.table.weight holds non-finite"):
        load_pipeline(nan)


def test_training_script_runs_a_few_iterations(tmp_path, capsys):
    x, y = load_data()
    assert x.shape == (1797, 8, 8) and pack(x).shape == (1797, 16, 4) and y.shape == (1797,)
    pipe, losses = train(steps=3, batch_size=16, log_every=1)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert "step 3/3" in capsys.readouterr().out
    out = tmp_path / "trained.safetensors"
    train_main(["--steps", "2", "--batch-size", "8", "--threads", "1", "--out", str(out)])
    assert "trained 2 steps" in capsys.readouterr().out
    assert load_pipeline(out).transformer is not None
    with pytest.raises(ValueError, match="steps=0"):
        train(steps=0)


# How far above the optimum found here the shipped preset's path value may be. The recording itself comes from a
# float32 model run, whose rounding differs between CPUs: recorded in float64 instead, the latents move by 1.6e-6
# (relative) and the path values of the preset by 1.2e-6, so two float32 machines disagree by a few 1e-6, and one
# may find another path whose value is within that of the preset's. 5e-5 is ten times that; it still fails a preset
# that is wrong by one choice, the nearest of which (one K at B=25) costs 1.3e-4 more.
PRESET_VALUE_RTOL = 5e-5


def _path_value(per_k, schedule, gamma):
    """sum of segment cost ** gamma along the schedule, each segment at its own K (chains cost 0)."""
    steps = schedule.compute_steps
    return sum(
        float(per_k[k - 1][a, b]) ** gamma for a, b, k in zip(steps, steps[1:], schedule.orders) if b - a > 1
    )


def test_shipped_digits_preset_is_what_calibration_finds(pipe):
    """The preset file is reproducible from the packaged weights and the documented calibration recipe.

    Compared by what the search minimises, so that it holds on any CPU: the shipped schedule, priced with this
    machine's recording (every segment at the K the preset gives it), is within PRESET_VALUE_RTOL of the optimum
    found here. On this machine the two are the same schedule (printed)."""
    assert sorted(meancache.preset_names()["digits"]) == sorted(PRESET_BUDGETS)
    rec = calibration_recording(pipe)
    # what calibrate_digits(pipe) does: the published estimator only
    found = meancache.calibrate(rec, budget=list(PRESET_BUDGETS), estimators=("meancache",))
    assert all(s.published for s in found)
    per_k = [segment_costs(rec, orders=[k])[0] for k in range(1, meancache.MAX_ORDER + 1)]
    for schedule in found:
        shipped = meancache.Schedule.preset("digits", schedule.budget)
        assert shipped.num_steps == rec.num_steps and shipped.budget == schedule.budget
        best = _path_value(per_k, schedule, DEFAULT_GAMMA)
        value = _path_value(per_k, shipped, DEFAULT_GAMMA)
        same = "same schedule" if shipped == schedule else f"found {schedule.pattern()}"
        print(f"digits B={schedule.budget}: shipped {value:.8e}, optimum here {best:.8e} ({same})")
        assert value <= best * (1 + PRESET_VALUE_RTOL), (schedule.budget, value / best - 1, schedule.pattern())


#: The shipped digits-joint preset's whole-run replay error, on this machine's recording, may exceed the one of the
#: schedule the joint calibration finds here by this fraction. On the machine that wrote it they are the same
#: schedules (ratio 1); another CPU's recording moves latents by ~1e-6 relative, which can flip near-ties between
#: paths whose replay errors differ by far less than this.
JOINT_REPLAY_RTOL = 0.05


def test_shipped_digits_joint_preset_is_what_the_joint_calibration_finds(pipe):
    """``digits-joint`` (every estimator, chosen by the joint search and the replay): reproducible from the
    packaged weights, compared by the replay error that picks it so that it holds on any CPU."""
    from meancache.calibration import replay_error
    from meancache.examples.digits.calibration import JOINT_BUDGETS
    from meancache.examples.digits.calibration import JOINT_PRESET_NAME
    from meancache.examples.digits.calibration import calibrate_digits_joint

    assert sorted(meancache.preset_names()[JOINT_PRESET_NAME]) == sorted(JOINT_BUDGETS)
    rec = calibration_recording(pipe)
    for found in calibrate_digits_joint(rec):
        shipped = meancache.Schedule.preset(JOINT_PRESET_NAME, found.budget)
        assert not shipped.published and shipped.num_steps == rec.num_steps
        ours, theirs = replay_error(rec, found), replay_error(rec, shipped)
        same = "same schedule" if shipped == found else f"found {found.pattern()}"
        print(f"digits-joint B={found.budget}: shipped {theirs:.6e}, found here {ours:.6e} ({same})")
        assert theirs <= ours * (1 + JOINT_REPLAY_RTOL), (found.budget, theirs / ours - 1)


@pytest.mark.parametrize("budget", [6, 10, 25])
def test_accelerate_picks_the_digits_joint_preset(pipe, budget):
    """Issue 20: the one-liner on the digits model uses the best shipped schedule, digits-joint."""
    meancache.accelerate(pipe, budget=budget)
    try:
        out = pipe(list(range(10)), latents=sample_noise(range(10)), output_type="latent").images
        summary = meancache.summary(pipe)
    finally:
        meancache.disable(pipe)
    assert summary.schedule == meancache.Schedule.preset("digits-joint", budget)
    assert summary.model_calls == budget and summary.skipped_steps == 50 - budget
    assert torch.isfinite(out).all()


def test_the_published_digits_preset_stays_available_by_name(pipe):
    meancache.accelerate(pipe, schedule=meancache.Schedule.preset("digits", 10))
    try:
        pipe(list(range(10)), latents=sample_noise(range(10)), output_type="latent")
        summary = meancache.summary(pipe)
    finally:
        meancache.disable(pipe)
    assert summary.schedule == meancache.Schedule.preset("digits", 10) and summary.model_calls == 10


def test_preset_file_is_well_formed():
    from meancache.examples.digits.calibration import PRESET_PATH

    data = json.loads(PRESET_PATH.read_text())
    assert data["name"] == "digits" and data["num_steps"] == 50
    assert sorted(int(b) for b in data["schedules"]) == sorted(PRESET_BUDGETS)


def test_per_sample_generators_draw_the_demo_noise(pipe):
    seeds = [4, 9, 2]
    a = pipe([1, 2, 3], num_inference_steps=3, generator=[torch.Generator().manual_seed(s) for s in seeds],
             output_type="latent").images
    b = pipe([1, 2, 3], num_inference_steps=3, latents=sample_noise(seeds), output_type="latent").images
    assert torch.equal(a, b)


def test_bfloat16_and_online_mode_run(pipe):
    low = load_pipeline(dtype=torch.bfloat16)
    low.set_progress_bar_config(disable=True)
    images = low([0, 8], num_inference_steps=8, latents=sample_noise([0, 1]), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    meancache.accelerate(pipe, budget=8, mode="online")
    try:
        pipe([5, 6], num_inference_steps=24, latents=sample_noise([0, 1]), output_type="latent")
        summary = meancache.summary(pipe)
    finally:
        meancache.disable(pipe)
    assert summary.model_calls == summary.computed_steps <= 8
    assert summary.computed_steps + summary.skipped_steps == 24
