"""MeanCache schedules for the embedded digits model, and the shipped ``digits`` preset.

``python -m meancache.examples.digits.calibration`` records the uncached 50-step sampler on the calibration inputs below,
runs the PSSP search (:func:`meancache.calibrate`) at budgets 10, 17 and 25, and writes
``meancache/presets/digits.json``. The calibration noise (seeds from 10,000) never overlaps the demo's (seeds from
0), so the demo measures the schedules on inputs they were not fitted to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...calibrate import Recording
from ...calibrate import calibrate
from ...calibrate import record
from ...schedule import PRESET_FORMAT
from ...schedule import Schedule
from .model import DEFAULT_GUIDANCE
from .model import NUM_CLASSES
from .model import sample_noise

__all__ = [
    "PRESET_BUDGETS",
    "PRESET_PATH",
    "calibrate_digits",
    "calibration_inputs",
    "calibration_recording",
    "main",
    "preset_document",
]

PRESET_NAME = "digits"
PRESET_BUDGETS = (25, 17, 10)
PRESET_STEPS = 50
PRESET_PATH = Path(__file__).parents[2] / "presets" / f"{PRESET_NAME}.json"
CALIBRATION_SEED = 10_000
#: Calibration inputs: each is one batch of the ten digits with its own noise.
CALIBRATION_INPUTS = 4


def calibration_inputs(num_inputs: int = CALIBRATION_INPUTS) -> list[dict]:
    """Call arguments for :func:`meancache.record`: ``num_inputs`` batches of digits 0-9, noise ``(10, 16, 4)``.

    >>> [tuple(i["latents"].shape) for i in calibration_inputs(2)]
    [(10, 16, 4), (10, 16, 4)]
    """
    return [
        {
            "class_labels": list(range(NUM_CLASSES)),
            "latents": sample_noise(range(CALIBRATION_SEED + NUM_CLASSES * i, CALIBRATION_SEED + NUM_CLASSES * (i + 1))),
        }
        for i in range(num_inputs)
    ]


def calibration_recording(
    pipe,
    *,
    num_steps: int = PRESET_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inputs: int = CALIBRATION_INPUTS,
    progress: bool = False,
) -> Recording:
    """The uncached runs of ``pipe`` on the calibration inputs: what :func:`calibrate_digits` searches.

    Example::

        >>> from meancache.examples.digits import load_pipeline
        >>> pipe = load_pipeline(); pipe.set_progress_bar_config(disable=True)
        >>> calibration_recording(pipe, num_steps=6, num_inputs=1)
        Recording(num_inputs=1, num_steps=6, shape=(10, 16, 4))
    """
    return record(
        pipe,
        calibration_inputs(num_inputs),
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        progress=progress,
    )


def calibrate_digits(
    pipe,
    budgets=PRESET_BUDGETS,
    *,
    num_steps: int = PRESET_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inputs: int = CALIBRATION_INPUTS,
    progress: bool = False,
) -> list[Schedule]:
    """Calibrated schedules of ``pipe`` (a :class:`~meancache.examples.digits.DigitsPipeline`), one per budget.

    Example::

        >>> from meancache.examples.digits import load_pipeline
        >>> pipe = load_pipeline(); pipe.set_progress_bar_config(disable=True)
        >>> [s.budget for s in calibrate_digits(pipe, [4, 6], num_steps=12, num_inputs=1)]
        [4, 6]
    """
    rec = calibration_recording(
        pipe, num_steps=num_steps, guidance_scale=guidance_scale, num_inputs=num_inputs, progress=progress
    )
    return calibrate(rec, budget=list(budgets))


def preset_document(schedules: list[Schedule]) -> dict:
    """The preset file's content for ``schedules`` (all of one step count), as ``meancache/presets/*.json``.

    >>> from meancache import Schedule
    >>> doc = preset_document([Schedule.default(4, 10)])
    >>> doc["name"], doc["num_steps"], list(doc["schedules"])
    ('digits', 10, ['4'])
    """
    return {
        "format": PRESET_FORMAT,
        "version": 1,
        "name": PRESET_NAME,
        "source": (
            "meancache.examples.digits.calibration: meancache.calibrate on the embedded digits model "
            f"(guidance {DEFAULT_GUIDANCE}, {CALIBRATION_INPUTS} x {NUM_CLASSES} calibration samples, "
            f"seeds {CALIBRATION_SEED}+)"
        ),
        "num_steps": schedules[0].num_steps,
        "orders_legend": "0 = chain (1-step segment), 1 = plain reuse, 2..6 = JVP window K",
        "schedules": {
            str(s.budget): {"compute_steps": list(s.compute_steps), "orders": list(s.orders)} for s in schedules
        },
    }


def format_preset(document: dict) -> str:
    """JSON text of a preset document with each step list on one line, like the published preset files.

    >>> print(format_preset({"schedules": {"2": {"compute_steps": [0, 2], "orders": [2]}}}))
    {
      "schedules": {
        "2": {
          "compute_steps": [0, 2],
          "orders": [2]
        }
      }
    }
    <BLANKLINE>
    """
    lists = {}

    def stash(value):
        # lists are replaced by placeholders, dumped indented, then put back on one line each
        if isinstance(value, list):
            key = f"@list{len(lists)}@"
            lists[key] = json.dumps(value)
            return key
        if isinstance(value, dict):
            return {k: stash(v) for k, v in value.items()}
        return value

    text = json.dumps(stash(document), indent=2)
    for key, dumped in lists.items():
        text = text.replace(f'"{key}"', dumped)
    return text + "\n"


def main(argv=None) -> None:
    """Command line: calibrate the packaged model and write the ``digits`` preset."""
    from .model import load_pipeline

    parser = argparse.ArgumentParser(prog="python -m meancache.examples.digits.calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(PRESET_PATH))
    args = parser.parse_args(argv)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    schedules = calibrate_digits(pipe, progress=True)
    Path(args.out).write_text(format_preset(preset_document(schedules)), encoding="utf-8")
    for s in schedules:
        print(f"B={s.budget:2d}  {s.pattern()[0]}\n      {s.pattern()[1]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
