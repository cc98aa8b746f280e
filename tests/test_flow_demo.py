"""The demo runs end to end on small sizes and prints its table."""

from __future__ import annotations

from meancache.examples import flow_demo as demo


def test_demo_rows_and_table(capsys):
    demo.main(["--batch", "4", "--dim", "8", "--components", "4", "--steps", "50"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    body = [line for line in lines[header + 2 :] if line.strip() and not line.startswith("evals:")]
    methods = [line.split("  ")[0].strip() for line in body]
    assert methods[0] == "full Euler, 50 steps"
    for budget in (25, 17, 10):
        assert f"MeanCache qwen-image B={budget}" in methods
        assert f"MeanCache default B={budget}" in methods
        assert f"Euler, {budget} steps" in methods
    evals = {line.split("  ")[0].strip(): int(line.split()[-4]) for line in body}
    assert evals["full Euler, 50 steps"] == 50
    assert evals["MeanCache z-image B=17"] == 17


def test_run_demo_counts_and_errors():
    rows = demo.run_demo(batch=3, dim=8, components=4, num_steps=20, budgets=(10,), presets=("qwen-image",))
    assert [r.evaluations for r in rows] == [20, 10, 10, 10]
    assert rows[0].rel_error == 0.0
    assert all(r.rel_error > 0 for r in rows[1:])
    assert all(r.seconds > 0 for r in rows)
