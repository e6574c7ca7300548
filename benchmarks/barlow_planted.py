"""Planted failure rules under label noise: do held-out-significant leaves keep the true ones?

    python benchmarks/barlow_planted.py

Synthetic groups (classes) of Gaussian features. In half of the groups the model's errors are
concentrated where one feature passes a threshold (`x_a > its 0.75 quantile`) or where two do
(`x_a > median and x_b <= median`): the model errs with probability `--rate-in` there and
`--rate-out` elsewhere. In the other half (null groups) errors are independent of the features,
with the planted groups' overall error rate. Label noise then flips each example's error
indicator with probability eta (0 %, 5 %, 10 %): a wrong label turns a correct prediction into an
error and back.

Per seed, Algorithm 1 (`failure_trees`, every feature, depth 2, delta 0.1, tau 0.2) is fitted on
one sample of every group (the validation split) and `leaf_evidence` measures every leaf on a
second, independent sample (the test split): Benjamini-Yekutieli q-values over all leaves of all
groups, significant where q <= 0.05.

A leaf is a *true failure* when, on the population (a large third sample of the same
distribution, noise included), its error rate exceeds its group's by more than delta = 0.1, the
paper's own margin. Against that truth, for each set of reported leaves:

- all leaves: every leaf of every tree (the unfiltered candidates);
- valid leaves: Algorithm 1's output L, ER > BER + delta and EC > tau on the fitted rows (the
  paper's unfiltered report);
- significant leaves (BY, jfail's default) and, for comparison, significant under
  Benjamini-Hochberg;

precision = true failures reported / leaves reported, recall = true failures reported / true
failures among all leaves, planted rules found = planted groups with at least one true failure
reported, and false leaves in null groups per seed. Counts are pooled over seeds; the spread is
the standard deviation of the per-seed value.

Writes `<out-dir>/barlow_planted.json` and `<out-dir>/barlow_planted.md`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np
import sklearn

from jfail.barlow import failure_trees, leaf_evidence
from jfail.keys import numpy_generator

try:
    from benchmarks.machine import write_results
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this folder is on the path
    from machine import write_results

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
DELTA, TAU, ALPHA = 0.1, 0.2, 0.05
SETS = ("all", "valid", "significant_by", "significant_bh")
SET_NAMES = {
    "all": "all leaves (every candidate)",
    "valid": "valid leaves (Algorithm 1's output, scored on the fitted rows)",
    "significant_by": "significant on held-out rows, Benjamini-Yekutieli (default)",
    "significant_bh": "significant on held-out rows, Benjamini-Hochberg",
}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write the JSON and Markdown results and print the table."""
    args = _parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/barlow_planted.py", *(sys.argv[1:] if argv is None else argv)]
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    levels = {}
    for noise in args.noise:
        per_seed = [_one_seed(args, noise, seed) for seed in range(args.seeds)]
        levels[f"{noise:g}"] = _summarise(per_seed, noise)
        line = ", ".join(
            f"{name} P {levels[f'{noise:g}'][name]['precision']:.3f}"
            f" R {levels[f'{noise:g}'][name]['recall']:.3f}"
            for name in SETS
        )
        print(f"noise {noise:g}: {line}", flush=True)
    result = {
        "benchmark": "barlow_planted",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {
            "seeds": args.seeds,
            "groups": args.groups,
            "planted_groups": args.groups // 2,
            "rows_fit_per_group": args.rows,
            "rows_heldout_per_group": args.rows,
            "rows_population_per_group": args.population,
            "features": args.features,
            "rate_in": args.rate_in,
            "rate_out": args.rate_out,
            "noise_levels": list(args.noise),
            "max_depth": 2,
            "delta": DELTA,
            "tau": TAU,
            "alpha": ALPHA,
            "screen": None,
        },
        "levels": levels,
        "seconds": time.perf_counter() - started,
        "environment": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    markdown = _markdown(result)
    write_results(args.out_dir, "barlow_planted", result, markdown)
    print(markdown)
    return result


# --------------------------------------------------------------------------------------------
# Data


def _draw(rng, args, noise, rows):
    """`rows` examples of every group: features [G * rows, D], errors, group ids, and each
    example's error probability after noise."""
    groups = np.repeat(np.arange(args.groups), rows)
    x = rng.standard_normal((len(groups), args.features)).astype(np.float32)
    probability = np.empty(len(groups))
    for g in range(args.groups):
        rows_g = groups == g
        probability[rows_g] = _error_probability(x[rows_g], g, args)
    probability = probability * (1 - noise) + (1 - probability) * noise
    errors = rng.random(len(groups)) < probability
    return x, errors, groups, probability


def _error_probability(x, group, args) -> np.ndarray:
    """Group g < G/2 is planted: even g, `x_g > q(0.75)`; odd g, `x_g > 0 and x_{g+1} <= 0`
    (both rules cover a quarter of the group). Null groups err at the planted groups' overall
    rate, independent of x."""
    planted = args.groups // 2
    if group >= planted:
        return np.full(len(x), 0.25 * args.rate_in + 0.75 * args.rate_out)
    a = group % args.features
    if group % 2 == 0:
        holds = x[:, a] > 0.6744897501960817  # the standard normal's 0.75 quantile
    else:
        holds = (x[:, a] > 0) & (x[:, (a + 1) % args.features] <= 0)
    return np.where(holds, args.rate_in, args.rate_out)


# --------------------------------------------------------------------------------------------
# One seed


def _one_seed(args, noise, seed) -> dict:
    rng = numpy_generator(seed)
    fit_x, fit_e, fit_g, _ = _draw(rng, args, noise, args.rows)
    held_x, held_e, held_g, _ = _draw(rng, args, noise, args.rows)
    pop_x, _, pop_g, pop_p = _draw(rng, args, noise, args.population)

    trees = failure_trees(
        fit_x, fit_e, fit_g, max_depth=2, delta=DELTA, tau=TAU, key=seed, progress=False
    )
    by = leaf_evidence(trees, held_x, held_e, held_g, method="by", alpha=ALPHA)
    bh = leaf_evidence(trees, held_x, held_e, held_g, method="bh", alpha=ALPHA)

    # the truth of every candidate, on the population
    group_rate = {g: pop_p[pop_g == g].mean() for g in trees}
    true = np.zeros(by.num_candidates, bool)
    for i, (g, leaf) in enumerate(zip(by.groups, by.leaves)):
        rows = pop_g == g
        inside = np.logical_and.reduce([c.holds(pop_x[rows]) for c in leaf.conditions])
        true[i] = inside.any() and pop_p[rows][inside].mean() > group_rate[g] + DELTA
    planted = np.asarray([g < args.groups // 2 for g in by.groups])
    reported = {
        "all": np.ones(by.num_candidates, bool),
        "valid": np.asarray([leaf.valid for leaf in by.leaves]),
        "significant_by": by.significant,
        "significant_bh": bh.significant,
    }
    out = {"candidates": by.num_candidates, "true": int(true.sum())}
    for name, chosen in reported.items():
        found = {g for g, t, c in zip(by.groups, true, chosen) if t and c}
        out[name] = {
            "reported": int(chosen.sum()),
            "true_reported": int((chosen & true).sum()),
            "planted_found": len(found),
            "null_reported": int((chosen & ~planted).sum()),
        }
    return out


def _summarise(per_seed: list[dict], noise: float) -> dict:
    summary = {
        "noise": noise,
        "candidates_per_seed": float(np.mean([s["candidates"] for s in per_seed])),
        "true_failures_per_seed": float(np.mean([s["true"] for s in per_seed])),
    }
    true_total = sum(s["true"] for s in per_seed)
    for name in SETS:
        reported = sum(s[name]["reported"] for s in per_seed)
        hits = sum(s[name]["true_reported"] for s in per_seed)
        precision = [
            s[name]["true_reported"] / s[name]["reported"] for s in per_seed if s[name]["reported"]
        ]
        recall = [s[name]["true_reported"] / s["true"] for s in per_seed if s["true"]]
        summary[name] = {
            "reported_per_seed": reported / len(per_seed),
            "precision": hits / reported if reported else None,
            "precision_sd": float(np.std(precision)) if precision else None,
            "recall": hits / true_total if true_total else None,
            "recall_sd": float(np.std(recall)) if recall else None,
            "planted_found_per_seed": float(np.mean([s[name]["planted_found"] for s in per_seed])),
            "null_reported_per_seed": float(np.mean([s[name]["null_reported"] for s in per_seed])),
            "seeds_with_a_null_leaf": int(sum(s[name]["null_reported"] > 0 for s in per_seed)),
        }
    return summary


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value, spread=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if spread is None else f"{value:.3f} ± {spread:.3f}"


def _markdown(result: dict) -> str:
    setup, env = result["setup"], result["environment"]
    planted = setup["planted_groups"]
    lines = [
        "# Barlow: planted failure rules, held-out evidence and label noise",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Run {result['date']} on {env['cpu_count']} CPU cores, jax {env['jax']}, scikit-learn"
        f" {env['sklearn']}, in {result['seconds']:.0f} s; load average"
        f" {env['load_average_before']} before and {env['load_average_after']} after.",
        "",
        f"Data, per seed ({setup['seeds']} seeds): {setup['groups']} groups of"
        f" {setup['features']} standard normal features; {planted} groups have a planted rule"
        f" (half on one feature, `x_a > q(0.75)`, half on two, `x_a > 0 and x_b <= 0`, each"
        f" covering a quarter of the group) inside which the model errs with probability"
        f" {setup['rate_in']} against {setup['rate_out']} outside; the other"
        f" {setup['groups'] - planted} groups err independently of the features at the same"
        " overall rate. Label noise flips each error indicator with probability eta."
        f" Algorithm 1 (every feature, depth {setup['max_depth']}, delta = {setup['delta']},"
        f" tau = {setup['tau']}) is fitted on {setup['rows_fit_per_group']} rows per group; every"
        f" leaf is measured by its rule on {setup['rows_heldout_per_group']} other rows per group"
        f" (significant: q <= {setup['alpha']} over all leaves of all groups). A leaf is a true"
        f" failure when, on {setup['rows_population_per_group']:,} population rows per group,"
        f" its error rate exceeds its group's by more than delta.",
        "",
        "Precision: true failures among the leaves reported. Recall: true failures reported"
        " among the true failures of all leaves. Pooled over seeds, ± the standard deviation of"
        " the per-seed value.",
        "",
    ]
    for level in result["levels"].values():
        lines += [
            f"## Label noise {100 * level['noise']:.0f} %",
            "",
            f"{level['candidates_per_seed']:.1f} candidate leaves per seed, of which"
            f" {level['true_failures_per_seed']:.1f} are true failures.",
            "",
            "| leaves reported | per seed | precision | recall | planted rules found (of"
            f" {planted}) | leaves in null groups per seed | seeds with a null-group leaf |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in SETS:
            row = level[name]
            lines.append(
                f"| {SET_NAMES[name]} | {row['reported_per_seed']:.1f} |"
                f" {_fmt(row['precision'], row['precision_sd'])} |"
                f" {_fmt(row['recall'], row['recall_sd'])} |"
                f" {row['planted_found_per_seed']:.2f} | {row['null_reported_per_seed']:.2f} |"
                f" {row['seeds_with_a_null_leaf']} of {setup['seeds']} |"
            )
        lines.append("")
    lines += _findings(result)
    return "\n".join(lines) + "\n"


def _findings(result: dict) -> list[str]:
    lines = ["## In words", ""]
    for level in result["levels"].values():
        valid, significant = level["valid"], level["significant_by"]
        lines.append(
            f"- Noise {100 * level['noise']:.0f} %: the paper's valid leaves have precision"
            f" {_fmt(valid['precision'])} and recall {_fmt(valid['recall'])}; the held-out"
            f" significant leaves (BY) have precision {_fmt(significant['precision'])} and recall"
            f" {_fmt(significant['recall'])}. Valid leaves fall in null groups"
            f" {valid['null_reported_per_seed']:.2f} times per seed, significant leaves"
            f" {significant['null_reported_per_seed']:.2f} times."
        )
    lines.append("")
    return lines


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--rows", type=int, default=200, help="fit and held-out rows per group")
    parser.add_argument("--population", type=int, default=20000,
                        help="rows per group that define the truth")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--rate-in", type=float, default=0.6)
    parser.add_argument("--rate-out", type=float, default=0.1)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    if args.groups < 2 or args.groups // 2 > args.features:
        parser.error("need at least 2 groups and no more planted groups than features")
    return args


if __name__ == "__main__":
    main()
