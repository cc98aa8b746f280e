"""Issue 20: calibration whose cost does not grow with the latent (a fixed element subset), recordings that keep
only that subset, and a search bounded for every N and budget."""

from __future__ import annotations

import pytest
import torch

import meancache
from meancache import Schedule
from meancache.calibrate import SEARCH_ELEMENTS
from meancache.calibration import Recording
from meancache.calibration.recording import SUBSET_SEED
from meancache.calibration.recording import element_subset
from meancache.flows import GaussianMixtureFlow
from meancache.flows import shifted_sigmas


def test_the_element_subset_is_fixed_sorted_and_distinct():
    a, b = element_subset(1000, 64), element_subset(1000, 64)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert bool((a[1:] > a[:-1]).all()) and 0 <= int(a.min()) and int(a.max()) < 1000
    assert element_subset(64, 64) is None and element_subset(10, 100) is None
    assert not torch.equal(element_subset(1000, 64, seed=SUBSET_SEED + 1), a)
    with pytest.raises(ValueError, match="elements=0: must be None or an int >= 1"):
        element_subset(10, 0)


def _flow():
    return GaussianMixtureFlow(dim=16, components=4, seed=2, spread=2.5)


def test_recording_a_subset_keeps_exactly_those_elements_of_the_full_recording():
    flow, sig = _flow(), shifted_sigmas(10, 3.0)
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    full = meancache.record(flow, x, sig, progress=False)
    part = meancache.record(flow, x, sig, progress=False, elements=40)
    idx = element_subset(8 * 16, 40)
    assert part.shape == (40,) and part.meta["elements"] == {"count": 40, "seed": SUBSET_SEED, "of_shape": [8, 16]}
    assert torch.equal(part.latents, full.latents.reshape(3, 11, -1)[:, :, idx])
    assert torch.equal(part.velocities, full.velocities.reshape(3, 10, -1)[:, :, idx])
    again = full.elements(40)
    assert torch.equal(again.latents, part.latents) and again.meta["elements"]["count"] == 40
    listed = meancache.record(flow, [x[0:1], x[1:2]], sig, progress=False, elements=40)
    assert torch.equal(listed.latents, part.latents[:2])


def test_the_search_reads_only_the_subset_whatever_the_latent_size(monkeypatch):
    """The cost of the search does not grow with the latent: every graph is built on SEARCH_ELEMENTS (here a
    smaller count) elements per input, for a small and a 16x larger latent alike."""
    import sys

    front = sys.modules["meancache.calibrate"]  # the module (the package exports the function under its name)
    seen = []
    original = front.joint_costs

    def spy(rec, **kwargs):
        seen.append(rec.shape)
        return original(rec, **kwargs)

    monkeypatch.setattr(front, "joint_costs", spy)
    flow, sig = _flow(), shifted_sigmas(12, 3.0)
    for tokens in (8, 128):
        x = torch.randn(4, tokens, 16, generator=torch.Generator().manual_seed(1))
        rec = meancache.record(flow, x, sig, progress=False)
        meancache.calibrate(rec, budget=5, elements=96)
    assert seen and set(seen) == {(96,)}


def test_the_subset_search_equals_the_search_on_the_subset_recording():
    flow, sig = _flow(), shifted_sigmas(12, 3.0)
    x = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(2))
    rec = meancache.record(flow, x, sig, progress=False)
    assert meancache.calibrate(rec, budget=[4, 6], elements=100) == meancache.calibrate(
        rec.elements(100), budget=[4, 6], elements=None)
    assert SEARCH_ELEMENTS >= 1024


def test_a_model_target_records_only_the_subset_and_refines_on_it():
    flow, sig = _flow(), shifted_sigmas(12, 3.0)
    x = torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(3))
    report = []
    found = meancache.calibrate(flow, x, sigmas=sig, budget=5, elements=64, refine=100, report=report,
                                progress=False)
    assert found.budget == 5 and report[0]["score"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recording_on_the_gpu_moves_only_the_subset():
    flow, sig = _flow(), shifted_sigmas(8, 3.0)
    x = torch.randn(2, 64, 16, device="cuda")
    rec = meancache.record(lambda z, s: flow(z, s), x, sig, progress=False, elements=50)
    assert rec.latents.device.type == "cpu" and rec.shape == (50,)


def test_many_steps_and_every_budget_are_bounded():
    """N = 2000 (the published search and the joint graph would be large): the safe schedules and what fits under
    the caps are weighed; budgets 2, a middle one and N answer."""
    sig = torch.linspace(1, 0, 2001)
    rec = meancache.record(lambda z, s: torch.sin(3 * z) - s, torch.randn(2, 3), sig, progress=False)
    found = meancache.calibrate(rec, budget=[2, 40, 2000])
    assert [s.budget for s in found] == [2, 40, 2000] and found[2] == Schedule.full(2000)


def test_elements_is_checked_before_any_work():
    with pytest.raises(ValueError, match="elements=0: must be None or an int >= 1"):
        meancache.calibrate(lambda z, s: z, torch.zeros(2, 3), budget=2, sigmas=[1.0, 0.5, 0.0], elements=0)
    rec = Recording([1.0, 0.5, 0.0], torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="elements=True"):
        rec.elements(True)


def _mapped(path) -> bool:
    """Whether this process maps ``path`` (Linux: /proc/self/maps), that is, reads it without copying it in."""
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


def test_a_recording_streamed_to_disk_equals_the_one_in_memory_and_is_read_mapped(tmp_path):
    flow, sig = _flow(), shifted_sigmas(10, 3.0)
    x = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    held = meancache.record(flow, x, sig, progress=False, elements=40)
    out = tmp_path / "rec.pt"
    streamed = meancache.record(flow, x, sig, progress=False, elements=40, out=out)
    assert torch.equal(streamed.latents, held.latents) and torch.equal(streamed.velocities, held.velocities)
    assert streamed.meta == held.meta and sorted(p.name for p in tmp_path.iterdir()) == ["rec.pt"]  # no part file
    assert _mapped(out)  # the returned recording is mapped from the file, not a copy in memory
    again = Recording.load(out, mmap=True)
    assert torch.equal(again.latents, held.latents)
    assert meancache.calibrate(again, budget=[4, 6]) == meancache.calibrate(held, budget=[4, 6])
    # recording to the same file again replaces it without truncating the file the first recording maps
    other = meancache.record(flow, -x, sig, progress=False, elements=40, out=out)
    assert torch.equal(streamed.latents, held.latents) and not torch.equal(other.latents, held.latents)
    listed = meancache.record(flow, list(x[:, None]), sig, progress=False, out=tmp_path / "list.pt")
    assert torch.equal(listed.latents[:, :, 0], meancache.record(flow, x, sig, progress=False).latents)


def test_a_failed_streamed_recording_leaves_no_file(tmp_path):
    flow, sig = _flow(), shifted_sigmas(10, 3.0)
    calls = [0]

    def breaks(x, s):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("the model failed at its fourth call")
        return flow(x, s)

    with pytest.raises(RuntimeError, match="fourth call"):
        meancache.record(breaks, torch.randn(2, 16), sig, progress=False, out=tmp_path / "rec.pt")
    assert list(tmp_path.iterdir()) == []
    # a part file that an interrupted process left behind is not read as data
    (tmp_path / "rec.pt.latents.part").write_bytes(b"\xff" * 4096)
    rec = meancache.record(flow, torch.zeros(2, 16), sig, progress=False, out=tmp_path / "rec.pt")
    assert torch.equal(rec.latents, meancache.record(flow, torch.zeros(2, 16), sig, progress=False).latents)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.pt"]


@pytest.mark.parametrize("out,rule", [(".", "must name a file in an existing folder"),
                                      ("no/such/folder/rec.pt", "must name a file in an existing folder"),
                                      (3, "must be None or a file path")])
def test_out_is_checked_before_any_model_evaluation(tmp_path, monkeypatch, out, rule):
    monkeypatch.chdir(tmp_path)
    calls = []
    with pytest.raises(ValueError, match=rf"out={out!r}: {rule}"):
        meancache.record(lambda x, s: calls.append(1) or x, torch.zeros(2, 4), [1.0, 0.5, 0.0], progress=False,
                         out=out)
    assert calls == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="mmap=1: must be True or False"):
        Recording.load(tmp_path / "x.pt", mmap=1)


def test_calibrate_keeps_its_recording_in_out(tmp_path):
    """calibrate(model, out=path) writes the recording it searched, equal to record()'s; searching it again gives
    the same schedule as the replay choice; out is refused with a Recording and checked before any evaluation."""
    flow = GaussianMixtureFlow(dim=6, components=3, seed=4)
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    sig = shifted_sigmas(12, 2.0)
    path = tmp_path / "cal.pt"
    got = meancache.calibrate(flow, noise, sigmas=sig, budget=4, validate="replay", out=path, progress=False)
    kept = Recording.load(path)
    want = meancache.record(flow, noise, sig, progress=False)
    torch.testing.assert_close(kept.latents, want.latents, rtol=0, atol=0)
    torch.testing.assert_close(kept.velocities, want.velocities, rtol=0, atol=0)
    assert meancache.calibrate(kept, budget=4) == got
    with pytest.raises(ValueError, match=r"out=.* given with a Recording"):
        meancache.calibrate(kept, budget=4, out=tmp_path / "again.pt")
    calls = []

    def counted(x, sigma):
        calls.append(sigma)
        return flow(x, sigma)

    with pytest.raises(ValueError, match="out"):
        meancache.calibrate(counted, noise, sigmas=sig, budget=4, out=tmp_path, progress=False)  # a folder
    assert calls == []
