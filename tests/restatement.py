"""Independent restatement of the official MeanCache sampling loop, used as a test oracle.

Written from /work/shared/design/algorithm.md (sections 2, 4, 6) only, without reading or
importing the ``meancache`` package, so that the library can be checked against a second,
separately written reading of the spec.

Deliberate differences from the official scripts (all allowed by the spec):
* everything stays in the dtype of the given latents (tests use float64), so there is no
  bf16/fp32 rounding to model and comparisons can be tight;
* a zero-length window (repeated sigmas) falls back to plain reuse instead of NaN (§3);
* a skipped step with K < 1 raises ValueError instead of an IndexError deep in the loop (§2.2).

What is kept on purpose: the full, unbounded per-step log, indexed by step number, exactly as
the official code keeps it (§2.1), so that a ring-buffer implementation can be compared with it.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "expand_official",
    "official_loop",
    "official_loop_with_log",
    "closed_form_estimate",
    "PUBLISHED",
    "PATTERNS",
    "SKIP_COUNTS",
    "check_tables",
]


# --------------------------------------------------------------------------------------------
# Schedule expansion (§6.1)
# --------------------------------------------------------------------------------------------


def expand_official(calc, edge_orders, num_steps):
    """Expand a (calc, edge_orders) schedule into per-step ``compute`` flags and ``k_at`` orders.

    ``k_at[i]`` is the order of the edge whose open interval contains skipped step ``i``;
    computed steps get 0. Orders on 1-step edges have no effect, as in the official code.
    """
    calc = [int(c) for c in calc]
    if len(edge_orders) != len(calc) - 1:
        raise ValueError(f"need len(calc)-1 = {len(calc) - 1} edge orders, got {len(edge_orders)}")
    calc_set = set(calc)
    compute = [i in calc_set for i in range(num_steps)]
    k_at = [0] * num_steps
    for (a, b), order in zip(zip(calc[:-1], calc[1:]), edge_orders):
        for i in range(a + 1, b):
            k_at[i] = int(order)
    return compute, k_at


# --------------------------------------------------------------------------------------------
# The official loop with its full history (§2.1, §2.2)
# --------------------------------------------------------------------------------------------


def _estimate_from_log(log, sigmas, i, K):
    """§2.2 read literally: finite-difference 'JVP' over the window j0..i-1 of the full log."""
    if K < 1:
        # The official code would index past the end of its log here (§2.2, §9 item 4).
        raise ValueError(f"skipped step {i} has order K={K}; K must be >= 1 on skipped steps")
    k = min(K, len(log))  # silent truncation when the history is shorter than K
    j0 = i - k
    v_last = log[i - 1]["v"]
    delta = sigmas[i] - sigmas[j0]  # negative for a strictly decreasing grid
    if delta == 0:
        # Repeated sigmas: the window has zero length, the average is undefined; reuse (§3 guard).
        return v_last
    x_i = log[-1]["x_post"]  # the official code reads the logged post-step copy, not the live latent
    x_j0 = log[j0]["x_pre"]
    avg = (x_i - x_j0) / delta
    jvp = (log[j0]["v"] - avg) / delta
    return v_last - jvp * (sigmas[i + 1] - sigmas[i])


def official_loop_with_log(velocity, latents, sigmas, calc, edge_orders):
    """Run the official MeanCache loop; return ``(final_latent, log)``.

    ``log`` has one dict per step (keys ``x_pre``, ``x_post``, ``sigma_pre``, ``sigma_post``,
    ``v``), so after the loop it holds ``num_steps`` entries: the official history never shrinks.
    """
    sigmas = [float(s) for s in sigmas]
    num_steps = len(sigmas) - 1
    compute, k_at = expand_official(calc, edge_orders, num_steps)
    dtype = latents.dtype
    x = latents
    log = []
    for i in range(num_steps):
        if compute[i]:
            # The oracle must not depend on what dtype the velocity field happens to return.
            v = velocity(x, sigmas[i]).to(dtype)
        else:
            v = _estimate_from_log(log, sigmas, i, k_at[i])
        x_next = x + (sigmas[i + 1] - sigmas[i]) * v  # plain Euler step of the scheduler
        log.append(
            {
                "x_pre": x,
                # A copy, like the official fp32 copy, so later in-place edits cannot leak back.
                "x_post": x_next.clone(),
                "sigma_pre": sigmas[i],
                "sigma_post": sigmas[i + 1],
                "v": v,
            }
        )
        x = x_next
    return x, log


def official_loop(velocity, latents, sigmas, calc, edge_orders):
    """Run the official MeanCache loop and return only the final latent."""
    return official_loop_with_log(velocity, latents, sigmas, calc, edge_orders)[0]


# --------------------------------------------------------------------------------------------
# Closed form (§2.3), a second, algebraically different route to the same estimate
# --------------------------------------------------------------------------------------------


def closed_form_estimate(vs, sigmas, i, k):
    """v̂_i = v_{i-1} + (h_i/H)(ū - v_{j0}), ū the h-weighted mean of v_{j0..i-1}.

    ``vs[m]`` is the logged velocity of step m (at least steps 0..i-1). ``k`` is truncated to
    the ``i`` steps of history, as the loop does. Uses no latents at all, which is why it is an
    independent check on the latent-difference form of the loop.
    """
    sigmas = [float(s) for s in sigmas]
    if k < 1:
        raise ValueError(f"window k={k} must be >= 1")
    k = min(k, i)
    j0 = i - k
    H = sigmas[j0] - sigmas[i]
    if H == 0:
        return vs[i - 1]
    u_bar = sum(((sigmas[m] - sigmas[m + 1]) / H) * vs[m] for m in range(j0, i))
    h_i = sigmas[i] - sigmas[i + 1]
    return vs[i - 1] + (h_i / H) * (u_bar - vs[j0])


# --------------------------------------------------------------------------------------------
# Published tables (§6.2), transcribed in the document's compact notation and expanded here
# --------------------------------------------------------------------------------------------

_LABEL_K = {"c": 0, "v": 1, "s2": 2, "s3": 3, "s4": 4, "s5": 5, "s6": 6}


def _parse_calc(text):
    """'0-16, 24, 47-49' -> [0, ..., 16, 24, 47, 48, 49] (ranges inclusive)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            out.extend(range(int(m.group(1)), int(m.group(2)) + 1))
        else:
            out.append(int(part))
    return out


def _parse_edges(text):
    """'c×16, v×3, s5' -> [0]*16 + [1]*3 + [5]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        label, _, count = part.partition("×")
        out.extend([_LABEL_K[label]] * (int(count) if count else 1))
    return out


# Copied from algorithm.md §6.2, one line per table: (budget, calc, edges).
_COMPACT = {
    "qwen-image": [
        (25, "0-16, 24, 32, 40, 43, 45, 47-49", "c×16, v×3, s5×3, c×2"),
        (17, "0-8, 10, 17, 24, 31, 38, 45, 48, 49", "c×8, s2, v×5, s4, c"),
        (10, "0, 1, 3, 7, 14, 21, 28, 35, 42, 49", "c, s2, v×6, s4"),
    ],
    "qwen-image-2512": [
        (25, "0-15, 23, 31, 37, 44-49", "c×15, s2×3, v×3, s5×2, c"),
        (17, "0-9, 11, 19, 27, 35, 43, 47, 49", "c×9, s2, v×4, s5×2"),
        (10, "0, 2, 4, 7, 14, 21, 28, 35, 42, 49", "v, s3, v×6, s4"),
    ],
    "z-image": [
        (25, "0-6, 8, 10-13, 15-18, 20, 22, 29, 37, 42, 45, 47-49",
         "c×6, s2×2, c×3, s2, c×3, s5×2, v×3, s5×2, c×2"),
        (20, "0-4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 30, 38, 43, 46, 48, 49",
         "c×4, s2×5, s5, s4, s5×2, v×3, s5, s2, c"),
        (17, "0-4, 6, 8, 10, 12, 14, 19, 27, 35, 43, 46, 48, 49", "c×4, s2×5, v×4, s5, s2, c"),
        (15, "0-3, 5, 7, 10, 12, 17, 25, 33, 41, 45, 48, 49", "c×3, s2×4, v×4, s5, s4, c"),
        (13, "0-3, 5, 9, 15, 22, 29, 36, 43, 47, 49", "c×3, s2, v×6, s5, s2"),
    ],
}

PUBLISHED = {
    model: {b: (_parse_calc(calc), _parse_edges(edges)) for b, calc, edges in rows}
    for model, rows in _COMPACT.items()
}

# algorithm.md §6.3, copied character for character: (computed/skipped line, K line).
PATTERNS = {
    ("qwen-image", 25): (
        "CCCCCCCCCCCCCCCCC.......C.......C.......C..C.C.CCC",
        "-----------------1111111-1111111-1111111-55-5-5---",
    ),
    ("qwen-image", 17): (
        "CCCCCCCCC.C......C......C......C......C......C..CC",
        "---------2-111111-111111-111111-111111-111111-44--",
    ),
    ("qwen-image", 10): (
        "CC.C...C......C......C......C......C......C......C",
        "--2-111-111111-111111-111111-111111-111111-444444-",
    ),
    ("qwen-image-2512", 25): (
        "CCCCCCCCCCCCCCCC.......C.......C.....C......CCCCCC",
        "----------------2222222-2222222-22222-111111------",
    ),
    ("qwen-image-2512", 17): (
        "CCCCCCCCCC.C.......C.......C.......C.......C...C.C",
        "----------2-1111111-1111111-1111111-1111111-555-5-",
    ),
    ("qwen-image-2512", 10): (
        "C.C.C..C......C......C......C......C......C......C",
        "-1-3-11-111111-111111-111111-111111-111111-444444-",
    ),
    ("z-image", 25): (
        "CCCCCCC.C.CCCC.CCCC.C.C......C.......C....C..C.CCC",
        "-------2-2----2----5-5-111111-1111111-1111-55-5---",
    ),
    ("z-image", 20): (
        "CCCCC.C.C.C.C.C.C.C.C.C.......C.......C....C..C.CC",
        "-----2-2-2-2-2-5-4-5-5-1111111-1111111-1111-55-2--",
    ),
    ("z-image", 17): (
        "CCCCC.C.C.C.C.C....C.......C.......C.......C..C.CC",
        "-----2-2-2-2-2-1111-1111111-1111111-1111111-55-2--",
    ),
    ("z-image", 15): (
        "CCCC.C.C..C.C....C.......C.......C.......C...C..CC",
        "----2-2-22-2-1111-1111111-1111111-1111111-555-44--",
    ),
    ("z-image", 13): (
        "CCCC.C...C.....C......C......C......C......C...C.C",
        "----2-111-11111-111111-111111-111111-111111-555-2-",
    ),
}

# The trailing "skipped n: K1 a, K>=2 b" summaries of §6.3, as a third cross-check.
SKIP_COUNTS = {
    ("qwen-image", 25): (25, 21, 4),
    ("qwen-image", 17): (33, 30, 3),
    ("qwen-image", 10): (40, 33, 7),
    ("qwen-image-2512", 25): (25, 6, 19),
    ("qwen-image-2512", 17): (33, 28, 5),
    ("qwen-image-2512", 10): (40, 33, 7),
    ("z-image", 25): (25, 17, 8),
    ("z-image", 20): (30, 18, 12),
    ("z-image", 17): (33, 25, 8),
    ("z-image", 15): (35, 25, 10),
    ("z-image", 13): (37, 32, 5),
}

NUM_STEPS = 50  # the only step count the published tables exist for


def check_tables():
    """Assert the §6.1 invariants and the §6.3 expansions for every published table."""
    assert set(PATTERNS) == {(m, b) for m, t in PUBLISHED.items() for b in t}
    for model, tables in PUBLISHED.items():
        for budget, (calc, orders) in tables.items():
            name = f"{model} B={budget}"
            assert len(calc) == budget, name
            assert len(orders) == budget - 1, name
            assert calc[0] == 0 and calc[-1] == NUM_STEPS - 1, name
            assert all(a < b for a, b in zip(calc, calc[1:])), name
            assert all(0 <= k <= 6 for k in orders), name
            # Invariants the document states for all eleven tables.
            lengths = [b - a for a, b in zip(calc, calc[1:])]
            assert max(lengths) <= 8, name
            assert all(k >= 1 for k, n in zip(orders, lengths) if n > 1), name  # no multi-step chain

            compute, k_at = expand_official(calc, orders, NUM_STEPS)
            line1 = "".join("C" if c else "." for c in compute)
            line2 = "".join("-" if c else str(k) for c, k in zip(compute, k_at))
            assert (line1, line2) == PATTERNS[(model, budget)], name
            skipped = [k_at[i] for i in range(NUM_STEPS) if not compute[i]]
            assert all(k <= i for i, k in enumerate(k_at) if not compute[i]), name  # no truncation
            counts = (len(skipped), sum(k == 1 for k in skipped), sum(k >= 2 for k in skipped))
            assert counts == SKIP_COUNTS[(model, budget)], name
    return True


if __name__ == "__main__":
    check_tables()
    print("all published tables check out")
