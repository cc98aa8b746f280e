"""``make demo`` end to end on reduced sizes (every row runs, the table prints and the PNG is written), and its
timing logic on a fake clock: round-robin rounds, what is timed, best, median and worst round. No test here times
anything."""

import os
import statistics
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from meancache.examples import demo  # noqa: E402

METHODS = list(demo.METHODS)
OURS = ("MeanCache (calibrated)", "MeanCache (published)", "plain reuse", "Euler", "AB2")
HEADER = (
    "| method | budget | full evaluations | wall s (best) | wall s (median) | wall s (worst) | speedup | PSNR dB "
    "| SSIM | class accuracy |"
)


def test_short_demo_runs_every_row_and_writes_the_picture(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "demo.png"
    rows = demo.main(
        ["--samples-per-class", "1", "--steps", "12", "--budgets", "4", "6", "--threads", "1", "--repeats", "2",
         "--out", str(out)]
    )
    assert [r.method for r in rows] == ["full"] + METHODS * 2
    assert rows[0].evaluations == 12
    for r in rows:
        assert len(r.times) == 2 and r.seconds == min(r.times)
        assert r.median == statistics.median(r.times) and r.worst == max(r.times)
        assert r.speedup == pytest.approx(rows[0].seconds / r.seconds)
        assert "a later round" not in r.note  # every round reproduced the first round's images
    for r in rows[1:]:
        assert r.budget in (4, 6)
        assert r.images.shape == (10, 8, 8) and torch.isfinite(r.images).all()
        assert r.seconds > 0 and r.speedup > 0 and 0 <= r.accuracy <= 1 and r.ssim <= 1
        if r.method in OURS:
            assert r.evaluations == r.budget, (r.method, r.evaluations)
        else:
            # tuned peers land near the budget on this batch (the table reports the real count anyway)
            assert abs(r.evaluations - r.budget) <= 2, (r.method, r.budget, r.evaluations)
            # a peer that misses the budget says so in its note
            assert (r.evaluations != r.budget) == ("the nearest to B=" in r.note), (r.method, r.note)
    text = capsys.readouterr().out
    assert HEADER in text
    assert text.count("| MagCache |") == 2
    full = rows[0]
    assert f"| full | - | 12 | {full.seconds:.2f} | {full.median:.2f} | {full.worst:.2f} | 1.00x |" in text
    assert "round 1/2: 17 rows" in text and "round 2/2: 17 rows" in text
    assert "wall s: 2 rounds" in text and "Widest spread: " in text
    assert "1 torch thread(s) on" in text and "(--threads auto)" not in text and "load average" in text
    # 12 steps: no shipped preset, so both MeanCache rows are calibrated now
    assert "MeanCache (calibrated) schedules: calibrated now on seeds 10000+ (B=4, 6)" in text
    assert "MeanCache (published) schedules: calibrated now on seeds 10000+ (B=4, 6)" in text
    assert "schedules and settings" in text and "AB2 B=4: 4 uniform steps, Adams-Bashforth 2" in text
    assert f"picture: {out.resolve()}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_meancache_beats_plain_reuse_on_the_same_steps():
    rows = demo.run_demo(samples_per_class=1, num_steps=12, budgets=[4], peers=False, repeats=1, log=lambda *a: None)
    by = {r.method: r for r in rows}
    assert by["MeanCache (published)"].psnr > by["plain reuse"].psnr, (by["MeanCache (published)"].psnr,
                                                                       by["plain reuse"].psnr)


class FakeClock:
    """A clock that advances only inside a timed call: by the next of ``durations`` (one per timed call)."""

    def __init__(self, durations, events=None):
        self.durations, self.now, self.reads, self.events = list(durations), 0.0, 0, events

    def __call__(self):
        if self.reads % 2:  # the read after a call
            self.now += self.durations.pop(0)
        self.reads += 1
        if self.events is not None:
            self.events.append("clock")
        return self.now


def test_time_interleaved_is_round_robin_and_times_only_the_call():
    events = []

    def run(name):
        @contextmanager
        def setup():
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")

        return setup, lambda: events.append(f"call {name}") or name

    clock = FakeClock([1, 2, 3, 4, 5, 6], events)
    rounds = []
    outputs, times, differing = demo.time_interleaved(
        [run("a"), run("b"), run("c")], 2, timer=clock, on_round=lambda r, s: rounds.append((r, s))
    )
    one = ["enter {0}", "clock", "call {0}", "clock", "exit {0}"]
    per_round = [e.format(n) for n in "abc" for e in one]
    assert events == per_round * 2  # a b c, a b c: never a a b b c c; set-up and tear-down outside the clock
    assert outputs == ["a", "b", "c"]
    assert times == [[1, 4], [2, 5], [3, 6]]
    assert rounds == [(0, 6), (1, 15)]
    assert differing == set()


def test_time_interleaved_keeps_the_first_output_and_flags_a_round_that_differs():
    from contextlib import nullcontext

    outs = iter([1, 10, 1, 11])  # run 0 repeats its output, run 1 does not
    runs = [(nullcontext, lambda: next(outs)) for _ in range(2)]
    outputs, times, differing = demo.time_interleaved(runs, 2, timer=FakeClock([1] * 4), same=lambda a, b: a == b)
    assert outputs == [1, 10] and differing == {1}
    with pytest.raises(ValueError, match="repeats=0"):
        demo.time_interleaved(runs, 0)


def test_run_demo_reports_best_median_worst_and_speedups_from_the_best():
    # 6 rows (full, MeanCache calibrated and published, plain reuse, Euler, AB2) x 3 rounds, in the order they
    # run: round by round
    durations = [
        [9.0, 1.0, 1.5, 2.0, 1.0, 0.75],  # round 1: the full run hit by a burst of load
        [4.0, 2.0, 1.25, 2.0, 1.5, 0.5],  # (multiples of 1/4: the clock's sums stay exact)
        [5.0, 3.0, 1.0, 2.0, 0.5, 1.0],
    ]
    clock = FakeClock([d for rnd in durations for d in rnd])
    rows = demo.run_demo(
        samples_per_class=1, num_steps=6, budgets=[3], peers=False, repeats=3, log=lambda *a: None, timer=clock
    )
    assert not clock.durations  # exactly one timed call per row and round
    assert [r.method for r in rows] == ["full"] + list(OURS)
    assert [r.times for r in rows] == [list(col) for col in zip(*durations)]
    assert [r.seconds for r in rows] == [4.0, 1.0, 1.0, 2.0, 0.5, 0.5]  # best rounds: the 9 s burst moves nothing
    assert [r.median for r in rows] == [5.0, 2.0, 1.25, 2.0, 1.0, 0.75]
    assert [r.worst for r in rows] == [9.0, 3.0, 1.5, 2.0, 1.5, 1.0]
    assert [r.speedup for r in rows] == [1.0, 4.0, 4.0, 2.0, 8.0, 8.0]
    assert [r.evaluations for r in rows] == [6, 3, 3, 3, 3, 3]
    table = demo.format_table(rows)
    assert "| full | - | 6 | 4.00 | 5.00 | 9.00 | 1.00x |" in table
    assert "| Euler | 3 | 3 | 0.50 | 1.00 | 1.50 | 8.00x |" in table
    note = demo.timing_note(rows)
    assert "wall s: 3 rounds" in note
    assert "Widest spread: MeanCache (calibrated) B=3, best 1.00 s, worst 3.00 s (+200 %)" in note
    assert "another process took CPU time" in note  # worst > 1.5 x best
    assert "another process" not in demo.timing_note(rows[3:4])  # plain reuse: 2 s in every round
    assert "thread" not in note  # machine details only when the caller gives the threads


def test_one_round_says_no_spread_was_measured():
    rows = [demo.DemoRow("full", None, 50, 2.0, times=[2.0])]
    assert "| 2.00 | 2.00 | 2.00 |" in demo.format_table(rows)
    assert "no spread was measured" in demo.timing_note(rows)


def test_help_lists_repeats_and_threads(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--repeats" in out and "--threads" in out and "auto" in out and "--gain" in out
    with pytest.raises(SystemExit):
        demo.main(["--repeats", "0"])
    assert "--repeats 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])
    assert "'0': must be an int >= 1 or auto" in capsys.readouterr().err


def test_pick_threads_alternates_the_candidates_and_keeps_the_faster():
    set_to, clock = [], FakeClock([1.5, 1.0, 0.5, 1.5])  # 2 threads, 1, 2, 1: the first 2-thread run hit by load
    chosen, best = demo.pick_threads(lambda: None, (2, 1), timer=clock, set_threads=set_to.append)
    assert set_to == [2, 1, 2, 1, 2]  # alternating, then the choice
    assert (chosen, best) == (2, {2: 0.5, 1: 1.0})
    set_to, clock = [], FakeClock([9.0, 1.0, 8.0, 1.5])  # another process holds a core: 2 threads crawl
    assert demo.pick_threads(lambda: None, (2, 1), timer=clock, set_threads=set_to.append) == (1, {2: 9.0, 1: 1.0})
    assert set_to == [2, 1, 1]  # clear after one round: no second crawl
    assert clock.durations == [8.0, 1.5]


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_auto_threads_probes_and_says_what_it_picked(keep_torch_threads):
    lines = []
    rows = demo.run_demo(samples_per_class=1, num_steps=6, budgets=[3], peers=False, repeats=1, threads="auto",
                         log=lines.append)
    [line] = [x for x in lines if x.startswith("threads: ")]
    expected = 2 if (os.cpu_count() or 1) >= 2 else 1
    assert f"{demo.PROBE_STEPS}-step probe" in line and f"{expected} thread(s)" in line
    assert torch.get_num_threads() in (1, 2) and line.startswith(f"threads: {torch.get_num_threads()} (auto")
    assert len(rows) == 6


def test_peer_tuning_memo_saves_runs_and_changes_nothing(monkeypatch):
    from meancache.examples import peer_caches
    from meancache.examples.digits import build_pipeline
    from meancache.examples.digits.model import sample_noise

    torch.set_num_threads(1)
    pipe = build_pipeline(seed=1)
    pipe.set_progress_bar_config(disable=True)
    labels, noise = [0, 1], sample_noise([0, 1])
    runs = []
    real = peer_caches._evaluations
    monkeypatch.setattr(peer_caches, "_evaluations", lambda *a: runs.append(1) or real(*a))
    peer = {p.name: p for p in peer_caches.PEERS}
    for name in ("FirstBlockCache", "MagCache"):
        runs.clear()
        plain = [peer[name].tune(pipe, labels, noise, 16, 3.0, b)[1] for b in (5, 8)]
        without = len(runs)
        runs.clear()
        memo = {}
        shared = [peer[name].tune(pipe, labels, noise, 16, 3.0, b, memo=memo)[1] for b in (5, 8)]
        assert shared == plain, name  # the same settings
        assert len(runs) < without, (name, len(runs), without)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(samples_per_class=0), "samples_per_class=0"),
        (dict(num_steps=2), "num_steps=2"),
        (dict(num_steps=10, budgets=[10]), r"budget 10: every budget must be an int in 2..9"),
        (dict(budgets=[1]), "budget 1"),
        (dict(repeats=0), "repeats=0"),
        (dict(threads=0), "threads=0"),
        (dict(threads="all"), "threads='all'"),
    ],
)
def test_run_demo_rejects_bad_arguments_before_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.run_demo(**kwargs)


def test_ab2_rows_are_adams_bashforth_2_on_the_pipelines_own_grid():
    # the AB2 scheduler inside the pipeline gives what an AB2 loop over the same guided velocity and grid gives,
    # with exactly B evaluations; the pipeline's scheduler is put back afterwards
    from meancache.examples.digits import load_pipeline
    from meancache.examples.digits.model import guided_velocity_fn
    from meancache.examples.digits.model import sample_noise
    from meancache.examples.digits.model import sigma_grid
    from meancache.examples.peer_caches import count_evaluations

    torch.set_num_threads(1)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    noise, labels = sample_noise(range(4)), [0, 1, 2, 3]
    velocity = guided_velocity_fn(pipe, 3.0)
    original = pipe.scheduler
    for b in (1, 2, 5):
        with demo._scheduler(pipe, demo.ab2_scheduler(original)), count_evaluations(pipe.transformer) as calls:
            got = pipe(labels, num_inference_steps=b, latents=noise, output_type="latent").images
        assert pipe.scheduler is original and calls[0] == b
        s = sigma_grid(b).tolist()
        x, last = noise.clone(), None
        for i in range(b):
            v = velocity(x, s[i])
            h = s[i + 1] - s[i]
            x = x + h * (v if last is None else v + h / (2 * last[1]) * (v - last[0]))
            last = (v, h)
        # the pipeline feeds the model sigma = t / 1000 (float32), the loop sigma itself: a rounding apart
        torch.testing.assert_close(got, x, rtol=0, atol=5e-5)
        euler = pipe(labels, num_inference_steps=b, latents=noise, output_type="latent").images
        assert torch.equal(got, euler) == (b == 1)  # AB2's first step is Euler's, the second is not


def test_figure_shows_the_smallest_budget_with_difference_maps(tmp_path):
    full = demo.DemoRow("full", None, 50, 1.0, images=torch.zeros(12, 8, 8))
    rows = [full] + [
        demo.DemoRow(m, b, b, 0.1, psnr=20.0 + b, images=torch.full((12, 8, 8), 0.01 * b))
        for b in (10, 6) for m in ("Euler", "AB2")
    ]
    lines = demo._grid_rows(rows, 6, 10, 8.0)
    assert [label.split("\n")[0] for label, _, _ in lines] == [
        "full (50 ev)", "Euler", "|above - full| x8", "AB2", "|above - full| x8"
    ]
    assert all(strip.shape == (8, 80) for _, strip, _ in lines)  # 10 columns of 8x8
    assert [d for _, _, d in lines] == [False, False, True, False, True]
    torch.testing.assert_close(lines[2][1], torch.full((8, 80), 0.48))  # |0.06 - 0| x 8
    out = demo.save_figure(rows, tmp_path / "demo.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
