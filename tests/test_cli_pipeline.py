"""``meancache calibrate --pipeline`` (issue 20, item 4) on tiny diffusers pipelines written with save_pretrained and
read back offline: FLUX from prompts (with tiny text encoders) and from precomputed embeddings, Qwen-Image and
HunyuanVideo (``--frames``) from embeddings; and every argument checked before any weight is loaded.

The recordings the command writes are compared value for value with ``meancache.record`` on the saved folder
read back by the test itself, so the command's loading (null components, dtype, device), seeding and call
arguments are all checked against an independent run.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch

import meancache
from meancache import Recording
from meancache import Schedule
from meancache import cli
from meancache.examples import tiny_pipelines

PREFIX = "meancache calibrate: error: "
STEPS = 8
BUDGETS = [4, 5]
SIZE = ["--height", "32", "--width", "32"]  # the tiny pipelines' 4x4 latents (the defaults would be 1024 px)

#: Words of the tiny tokenizers: a word-level vocabulary, so prompts need no download.
WORDS = ["<pad>", "</s>", "<unk>"] + "a an the cat dog red blue green on under mat sky tree house".split()


def _tokenizer(max_length: int):
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def _flux_with_text_encoders():
    """The tiny FLUX of tiny_pipelines with tiny CLIP and T5 encoders and word-level tokenizers: a pipeline that
    turns a text prompt into embeddings of the transformer's sizes (pooled 16, joint 32)."""
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel
    from transformers import T5Config
    from transformers import T5EncoderModel

    pipe, _, _ = tiny_pipelines.build("flux")
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8))
    clip.eval(), t5.eval()  # as from_pretrained leaves them: T5's dropout (0.1) would make every call differ
    # a new pipeline object, not register_modules: FluxPipeline.__init__ reads the CLIP tokenizer's length
    text = type(pipe)(scheduler=pipe.scheduler, vae=None, text_encoder=clip, tokenizer=_tokenizer(8),
                      text_encoder_2=t5, tokenizer_2=_tokenizer(16), transformer=pipe.transformer)
    text.set_progress_bar_config(disable=True)
    return text


def _call_args(name: str, count: int, seed: int) -> list[dict]:
    """``count`` dicts of a tiny pipeline's prompt arguments (its embeddings, fresh per input), nothing else the
    command sets itself."""
    out = []
    for i in range(count):
        _, kw, _ = tiny_pipelines.build(name, seed=seed + i)
        out.append({k: v for k, v in kw.items()
                    if k not in ("generator", "num_inference_steps", "output_type", "height", "width", "num_frames",
                                 "guidance_scale")})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders written with save_pretrained, the in-memory pipelines they hold, and --call-args files."""
    root = tmp_path_factory.mktemp("pipelines")
    pipes = {"flux-text": _flux_with_text_encoders()}
    for name in ("flux", "qwen-image", "hunyuan-video"):
        pipes[name] = tiny_pipelines.build(name)[0]
    for name, pipe in pipes.items():
        pipe.save_pretrained(root / name)
    args = {}
    for name, count in (("flux", 3), ("qwen-image", 2), ("hunyuan-video", 2)):
        args[name] = _call_args(name, count, seed=10)
        torch.save(args[name], root / f"{name}.pt")
    (root / "prompts.txt").write_text("a red cat on the mat\n\n   \n  a blue dog under the tree  \nthe green house\n",
                                      encoding="utf-8")
    return {"root": root, "pipes": pipes, "args": args}


@pytest.fixture
def offline(monkeypatch):
    """One process, and every from_pretrained call of the command seen: a saved folder is read with
    local_files_only=True (no hub; HF_HUB_OFFLINE would come too late, huggingface_hub reads it when imported)."""
    from diffusers import DiffusionPipeline

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    original = DiffusionPipeline.from_pretrained

    def seen(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", seen)
    yield calls
    assert all(call.get("local_files_only") is True for call in calls), calls


def _run(argv, capsys) -> list[dict]:
    code = cli.main(["calibrate", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def _loaded(folder: pathlib.Path, pipe):
    """The saved folder read back by the test itself, its absent components named from the in-memory ``pipe``.

    Not the in-memory pipeline: a model built from its config and the same model read back by from_pretrained
    differ in the last bits (Qwen-Image's and FLUX's transformers, transformers' text encoders), which a bitwise
    comparison would see."""
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                               **{k: None for k, v in pipe.components.items() if v is None})
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _reference(pipe, inputs: list[dict], seed: int, **common) -> Recording:
    """meancache.record of ``pipe``, each input seeded as the command documents (seed + i)."""
    calls = [dict(own, generator=torch.Generator("cpu").manual_seed(seed + i)) for i, own in enumerate(inputs)]
    return meancache.record(pipe, calls, progress=False, **common)


def _check_outputs(out: pathlib.Path, lines: list[dict], want: Recording, plots: bool) -> None:
    """The files of the command against the reference recording and a search on it."""
    got = Recording.load(out / "recording.pt")
    assert got.sigmas == want.sigmas
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=0)
    torch.testing.assert_close(got.velocities, want.velocities, rtol=0, atol=0)
    report: list = []
    schedules = meancache.calibrate(want, budget=BUDGETS, max_len=8, report=report, progress=False)
    assert [line["budget"] for line in lines] == BUDGETS
    for line, schedule in zip(lines, schedules):
        assert Schedule.load(line["json"]) == schedule and line["pattern"] == schedule.pattern()[0]
        png = out / f"schedule-B{schedule.budget}.png"
        assert (line["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n") if plots else \
            (line["plot"] is None and not png.exists())
    written = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [e["budget"] for e in written["budgets"]] == BUDGETS
    for entry, expected in zip(written["budgets"], report):
        assert entry["chosen"] == expected["chosen"]
        if "start" in expected:  # a Schedule in the report: written as Schedule.to_dict, readable back
            assert Schedule.from_dict(entry["start"]) == expected["start"]
            assert entry["scores"] == pytest.approx({k: v for k, v in expected["scores"].items()})


# -- end to end ------------------------------------------------------------------------------------------------------


def test_prompts_file_on_a_saved_flux_with_text_encoders(saved, offline, tmp_path, capsys):
    """--prompts: one input per non-blank line (stripped), seeded with --seed + i; --guidance reaches the call."""
    out = tmp_path / "out"
    lines = _run(["--pipeline", str(saved["root"] / "flux-text"), "--prompts", str(saved["root"] / "prompts.txt"),
                  "--steps", str(STEPS), *SIZE, "--guidance", "2.5", "--seed", "7", "--device", "cpu", "--dtype",
                  "float32", "--budget", *map(str, BUDGETS), "--out", str(out), "--quiet"], capsys)
    prompts = ["a red cat on the mat", "a blue dog under the tree", "the green house"]
    pipe = _loaded(saved["root"] / "flux-text", saved["pipes"]["flux-text"])
    want = _reference(pipe, [{"prompt": p} for p in prompts], seed=7, num_inference_steps=STEPS, guidance_scale=2.5,
                      height=32, width=32)
    _check_outputs(out, lines, want, plots=True)
    # loaded once, from the folder, offline (the fixture checks local_files_only), in the dtype asked for
    assert len(offline) == 2 and offline[0].get("torch_dtype", offline[0].get("dtype")) is torch.float32
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["pipeline_class"] == "FluxPipeline" and settings["inputs"] == 3 and settings["steps"] == STEPS
    assert (settings["guidance"], settings["seed"], settings["dtype"], settings["world_size"]) == (2.5, 7, "float32", 1)
    # the text reaches the model: another prompt, same noise, another trajectory
    other = _reference(pipe, [{"prompt": "the sky"}], seed=7, num_inference_steps=STEPS, guidance_scale=2.5,
                       height=32, width=32)
    assert not torch.equal(other.latents[0, -1], want.latents[0, -1])


@pytest.mark.parametrize("name, extra, common", [
    ("flux", ["--guidance", "3.5"], {"guidance_scale": 3.5}),
    ("qwen-image", [], {}),
    ("hunyuan-video", ["--frames", "5"], {"num_frames": 5}),
], ids=["flux", "qwen-image", "hunyuan-video-frames"])
def test_call_args_on_saved_pipelines_without_text_encoders(saved, offline, tmp_path, capsys, name, extra, common):
    """--call-args: the tiny pipelines as tiny_pipelines builds them (no text encoder, no VAE: saved as null
    components) run from their precomputed embeddings."""
    out = tmp_path / "out"
    lines = _run(["--pipeline", str(saved["root"] / name), "--call-args", str(saved["root"] / f"{name}.pt"),
                  "--steps", str(STEPS), *SIZE, *extra, "--budget", *map(str, BUDGETS), "--out", str(out),
                  "--no-plot", "--quiet"], capsys)
    want = _reference(_loaded(saved["root"] / name, saved["pipes"][name]), saved["args"][name], seed=0, num_inference_steps=STEPS, height=32,
                      width=32, **common)
    _check_outputs(out, lines, want, plots=False)
    rec = Recording.load(out / "recording.pt")
    assert rec.num_inputs == len(saved["args"][name]) and rec.num_steps == STEPS
    if name == "hunyuan-video":  # 5 frames -> 2 latent frames of 4x4
        assert rec.shape == (1, 16, 2, 4, 4)


def test_the_saved_recording_resumes_with_recording(saved, offline, tmp_path, capsys):
    """recording.pt is written for --recording: the same schedules without the pipeline."""
    out = tmp_path / "out"
    first = _run(["--pipeline", str(saved["root"] / "qwen-image"), "--call-args", str(saved["root"] / "qwen-image.pt"),
                  "--steps", str(STEPS), *SIZE, "--budget", "5", "--out", str(out), "--no-plot", "--quiet"], capsys)
    again = _run(["--recording", str(out / "recording.pt"), "--budget", "5", "--out", str(tmp_path / "again"),
                  "--no-plot"], capsys)
    assert Schedule.load(first[0]["json"]) == Schedule.load(again[0]["json"])


# -- every argument checked before the model loads -------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch, offline):
    """Loading the weights (or recording) is work the checks must come before: fail the test if it starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    import diffusers

    monkeypatch.setattr(cli, "_load_pipeline", forbidden)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", forbidden)
    monkeypatch.setattr(cli, "record_sharded", forbidden)
    monkeypatch.setattr(cli, "calibrate", forbidden)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0][len(PREFIX):]


def _bad_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    files = {"binary": root / "binary.txt", "blank": root / "blank.txt", "dict": root / "dict.pt",
             "not-dicts": root / "not-dicts.pt", "garbage": root / "garbage.pt", "generator": root / "generator.pt",
             "steps": root / "steps.pt", "guidance": root / "guidance.pt", "frames": root / "frames.pt",
             "one": root / "one.txt"}
    files["binary"].write_bytes(b"a cat\n\xff\xfe dog\n")
    files["blank"].write_text("\n   \n\t\n", encoding="utf-8")
    files["one"].write_text("a cat\n", encoding="utf-8")
    torch.save({"prompt_embeds": torch.zeros(1)}, files["dict"])
    torch.save([{"prompt_embeds": torch.zeros(1)}, "a cat"], files["not-dicts"])
    files["garbage"].write_bytes(bytes(range(256)))
    torch.save([{"prompt_embeds": torch.zeros(1), "output_type": "pil"}], files["generator"])
    torch.save([{"num_inference_steps": 4}], files["steps"])
    torch.save([{"guidance_scale": 2.0}], files["guidance"])
    torch.save([{"prompt_embeds": torch.zeros(1), "num_frames": 5}], files["frames"])
    return files


def test_every_pipeline_argument_is_checked_before_loading(saved, no_loading, tmp_path, capsys):
    root = saved["root"]
    flux, text, qwen = str(root / "flux"), str(root / "flux-text"), str(root / "qwen-image")
    args, prompts = str(root / "flux.pt"), str(root / "prompts.txt")
    bad = _bad_files(tmp_path)
    no_index = tmp_path / "not-a-pipeline"
    no_index.mkdir()
    unipc = tmp_path / "unipc"
    shutil.copytree(root / "flux", unipc)
    index = json.loads((unipc / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (unipc / "model_index.json").write_text(json.dumps(index))
    stochastic = tmp_path / "stochastic"
    shutil.copytree(root / "flux", stochastic)
    config = json.loads((stochastic / "scheduler" / "scheduler_config.json").read_text())
    config["stochastic_sampling"] = True
    (stochastic / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    cases = [
        # the source
        (["--pipeline", str(tmp_path / "nope" / "flux"), "--prompts", prompts],
         f"--pipeline {tmp_path / 'nope' / 'flux'}: no such folder, and not a Hub model id (owner/name)"),
        (["--pipeline", str(root / "prompts.txt"), "--prompts", prompts],
         f"--pipeline {root / 'prompts.txt'}: is a file; give a folder written by save_pretrained"),
        (["--pipeline", str(no_index), "--prompts", prompts],
         f"--pipeline {no_index}: the folder has no model_index.json: not a pipeline written by save_pretrained"),
        (["--pipeline", str(unipc), "--call-args", args],
         f"--pipeline {unipc}: its scheduler is UniPCMultistepScheduler; meancache records pipelines whose "
         "scheduler is FlowMatchEulerDiscreteScheduler"),
        (["--pipeline", str(stochastic), "--call-args", args],
         f"--pipeline {stochastic}: pipe.scheduler has stochastic_sampling=True"),
        # the inputs
        (["--pipeline", flux], f"--pipeline {flux}: give the calibration inputs as exactly one of --prompts"),
        (["--pipeline", flux, "--prompts", prompts, "--call-args", args], f"--pipeline {flux}: give the calibration"),
        (["--pipeline", flux, "--prompts", str(tmp_path / "missing.txt")],
         f"--prompts {tmp_path / 'missing.txt'}: no such file; give a UTF-8 text file with one prompt per line"),
        (["--pipeline", flux, "--prompts", str(tmp_path)], f"--prompts {tmp_path}: is not a file"),
        (["--pipeline", flux, "--prompts", str(bad["binary"])],
         f"--prompts {bad['binary']}: byte 6 is not UTF-8 text (invalid start byte)"),
        (["--pipeline", flux, "--prompts", str(bad["blank"])],
         f"--prompts {bad['blank']}: holds no prompt (every line is blank)"),
        (["--pipeline", flux, "--prompts", str(bad["one"])],
         f"--prompts {bad['one']}: the pipeline was saved without a text_encoder: it cannot encode prompts; give "
         "--call-args"),
        (["--pipeline", flux, "--call-args", str(bad["dict"])],
         f"--call-args {bad['dict']}: holds a dict; give a list of dicts of call arguments saved with torch.save"),
        (["--pipeline", flux, "--call-args", str(bad["not-dicts"])],
         f"--call-args {bad['not-dicts']}: input 1 is a str"),
        (["--pipeline", flux, "--call-args", str(bad["garbage"])],
         f"--call-args {bad['garbage']}: not readable with torch.load(weights_only=True)"),
        (["--pipeline", flux, "--call-args", str(bad["generator"])],
         f"--call-args {bad['generator']}: input 0 sets output_type: the recording needs the latents"),
        (["--pipeline", flux, "--call-args", str(bad["steps"])],
         f"--call-args {bad['steps']}: input 0 sets num_inference_steps: give --steps"),
        (["--pipeline", flux, "--call-args", str(bad["guidance"]), "--guidance", "3"],
         f"--call-args {bad['guidance']}: input 0 sets guidance_scale, and so does --guidance: give it in one place"),
        (["--pipeline", flux, "--call-args", str(bad["frames"])],
         f"--call-args {bad['frames']} (input 0): FluxPipeline.__call__ takes no num_frames argument"),
        (["--pipeline", flux, "--call-args", args, "--inputs", "4"], "--inputs 4: applies to --flow and --model"),
        # options the pipeline does not take
        (["--pipeline", flux, "--call-args", args, "--frames", "5"],
         "--frames 5: FluxPipeline.__call__ takes no num_frames argument (--frames is for video pipelines)"),
        # numbers, budgets against the steps (given, or the pipeline's default), seeds
        (["--pipeline", flux, "--call-args", args, "--steps", "1"], "--steps 1: must be >= 2"),
        (["--pipeline", flux, "--call-args", args, "--steps", "8", "--budget", "9"],
         "--budget 9 (with --steps 8): must be an int with 2 <= budget <= num_steps=8"),
        (["--pipeline", flux, "--call-args", args, "--budget", "40"],
         "--budget 40 (with FluxPipeline's default 28 steps): must be an int with 2 <= budget <= "
         "num_steps=28"),
        (["--pipeline", flux, "--call-args", args, "--guidance", "-1"],
         "--guidance -1.0: must be a finite number >= 0"),
        (["--pipeline", flux, "--call-args", args, "--guidance", "nan"], "--guidance nan: must be a finite number"),
        (["--pipeline", flux, "--call-args", args, "--height", "0"], "--height 0: must be an int >= 1 (pixels)"),
        (["--pipeline", flux, "--call-args", args, "--width", "-32"], "--width -32: must be an int >= 1 (pixels)"),
        (["--pipeline", flux, "--call-args", args, "--frames", "0"], "--frames 0: must be an int >= 1 (video frames)"),
        (["--pipeline", text, "--prompts", prompts, "--seed", str(2**64 - 2)],
         f"--seed {2**64 - 2}: must be <= {2**64 - 3} with 3 inputs (input i is seeded with --seed + i"),
        # dtype and device
        (["--pipeline", flux, "--call-args", args, "--dtype", "float64"],
         "--dtype float64: must be one of float32, float16, bfloat16"),
        (["--pipeline", flux, "--call-args", args, "--device", "gpu0"], "--device gpu0: not a torch device"),
        # an option of --pipeline given with another source
        (["--flow", "gaussian-mixture", "--dtype", "float16"], "--dtype float16: applies to --pipeline only"),
        (["--flow", "gaussian-mixture", "--prompts", prompts], f"--prompts {prompts}: applies to --pipeline only"),
        # --out that cannot be created
        (["--pipeline", flux, "--call-args", args, "--out", str(root / "prompts.txt" / "out")],
         f"--out {root / 'prompts.txt' / 'out'}: cannot be created: {root / 'prompts.txt'} is not a folder"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--pipeline", flux, "--call-args", args, "--device", "cuda"],
                      "--device cuda: CUDA is not available here"))
    for argv, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "o")]
        if "--budget" not in argv:
            argv = [*argv, "--budget", "4"]
        if "--steps" not in argv and "--budget" in argv and argv[argv.index("--budget") + 1] == "4":
            argv = [*argv, "--steps", "8"]
        assert cli.main(["calibrate", *argv, "--quiet"]) == 2, argv
        line = _one_error_line(capsys)
        assert line.startswith(message), (argv, line)
        assert not (tmp_path / "o").exists()


def test_a_hub_id_is_read_from_the_hub_and_its_failure_is_one_line(saved, no_loading, monkeypatch, tmp_path, capsys):
    """owner/name that is no folder here: model_index.json is asked of the hub (local_files_only=False), and a
    failure to reach it (this machine has no network) is one error line, before any weight is loaded."""
    from diffusers import DiffusionPipeline

    asked = []

    def unreachable(source, **kwargs):
        asked.append((source, kwargs))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(DiffusionPipeline, "load_config", unreachable)
    assert cli.main(["calibrate", "--pipeline", "owner/some-model", "--prompts", str(saved["root"] / "prompts.txt"),
                     "--steps", "8", "--budget", "4", "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys) == ("--pipeline owner/some-model: cannot read its model_index.json (OSError: We "
                                       "couldn't connect to 'https://huggingface.co' to load the files)")
    assert asked == [("owner/some-model", {"local_files_only": False})]


def test_validate_runs_on_a_saved_pipeline(saved, offline, tmp_path, capsys):
    """--validate runs: the candidates are scored by real runs of the pipeline from each input's seeded noise, as
    calibrate(pipe, validate="runs") does; recording.pt and report.json are still written."""
    out = tmp_path / "out"
    lines = _run(["--pipeline", str(saved["root"] / "qwen-image"), "--call-args", str(saved["root"] / "qwen-image.pt"),
                  "--steps", str(STEPS), *SIZE, "--budget", "5", "--validate", "runs", "--out", str(out), "--no-plot",
                  "--quiet"], capsys)
    pipe = _loaded(saved["root"] / "qwen-image", saved["pipes"]["qwen-image"])
    calls = [dict(own, generator=torch.Generator("cpu").manual_seed(i))
             for i, own in enumerate(saved["args"]["qwen-image"])]
    report: list = []
    want = meancache.calibrate(pipe, calls, budget=5, validate="runs", report=report, progress=False,
                               num_inference_steps=STEPS, height=32, width=32)
    assert Schedule.load(lines[0]["json"]) == want
    written = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert written["settings"]["validate"] == "runs"
    assert written["budgets"][0]["measure"] == "runs" == report[0]["measure"]
    assert written["budgets"][0]["scores"] == pytest.approx(report[0]["scores"])
    assert Recording.load(out / "recording.pt").num_inputs == len(calls)


def test_validate_runs_is_refused_under_torchrun_before_loading(saved, no_loading, monkeypatch, tmp_path, capsys):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    code = cli.main(["calibrate", "--pipeline", str(saved["root"] / "qwen-image"), "--call-args",
                     str(saved["root"] / "qwen-image.pt"), "--steps", str(STEPS), "--budget", "5", "--device", "cpu",
                     "--validate", "runs", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--validate runs under torchrun (world size 2)" in err[0] and "--validate replay" in err[0]
