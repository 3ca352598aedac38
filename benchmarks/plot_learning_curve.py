"""Tables and a plot from benchmarks/learning_curve.py runs.

Reads the JSON line each variant prints (from one or more saved outputs, so
variants run in parallel can be drawn together), and writes a PNG of
held-out R@3 at the best fusion layer (95% interval), the attention lift on
the unit, d_doc and the LM loss against the optimizer step, with the random
row and the unit-rule prior of the held-out split as reference lines. The
same figures are printed as Markdown tables.

    python benchmarks/plot_learning_curve.py run1.log run2.log --dataset data --out docs/learning_curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_results(paths: list[str]) -> list[dict]:
    """Result lines of learning_curve.py outputs; ``NAME=run/metrics.jsonl`` reads a
    trainer's metrics file instead (a run stopped before it printed its line)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learning_curve import summarise

    out = []
    for path in paths:
        name, sep, metrics = path.partition("=")
        if sep:
            records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
            out.append(summarise(name, {}, records))
            continue
        for line in Path(path).read_text().splitlines():
            if line.startswith("{") and '"curve"' in line:
                out.append(json.loads(line))
    return out


def prior_recall3(dataset: str) -> tuple[float, list[float]] | None:
    """The unit-rule prior's R@3 (and interval) on the dataset's test split."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learning_curve import dataset_folder

    from tasks.evaluate.loaders import load_triples
    from tasks.evaluate.localization import unit_rule_prior

    prior = unit_rule_prior(load_triples(str(dataset_folder(dataset)), None, 0), [3])
    return (prior["metrics"]["recall@3"], prior["ci"]["recall@3"]) if prior else None


def tables(results: list[dict]) -> str:
    lines = []
    for title, key, fmt in (("R@3 at the best fusion layer [95% interval]", "best_recall@3", ".3f"),
                            ("best layer", "best_layer", "d"), ("R@3 at the default layer", "recall@3", ".3f"),
                            ("attention lift on the unit, best layer", "lift_best", ".2f"),
                            ("d_doc (nats)", "d_doc", "+.3f"), ("d_pair (nats)", "d_pair", "+.3f"),
                            ("held-out LM loss", "lm", ".2f"), ("ROUGE-L (%)", "rougeL", ".1f")):
        steps = sorted({c["step"] for r in results for c in r["curve"]})
        lines += ["", f"{title}, by optimizer step", "",
                  "| variant | s/step | " + " | ".join(f"{s}" for s in steps) + " |", "|---|---:|" + "---:|" * len(steps)]
        for r in results:
            cells = []
            for s in steps:
                point = next((c for c in r["curve"] if c["step"] == s), None)
                value = point.get(key) if point else None
                text = format(value, fmt) if value is not None else ""
                if key == "best_recall@3" and point and point.get("best_recall@3_ci"):
                    low, high = point["best_recall@3_ci"]
                    text += f" [{low:.2f}, {high:.2f}]"
                cells.append(text)
            lines.append(f"| {r['variant']} | {r['s_per_step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], prior: tuple[float, list[float]] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.6))
    r3_ax, lift_ax, doc_ax, lm_ax = fig.subplots(1, 4)
    for r in results:
        curve = r["curve"]
        steps = [c["step"] for c in curve]
        r3 = [c.get("best_recall@3") for c in curve]
        low = [c["best_recall@3"] - c["best_recall@3_ci"][0] if c.get("best_recall@3_ci") else 0 for c in curve]
        high = [c["best_recall@3_ci"][1] - c["best_recall@3"] if c.get("best_recall@3_ci") else 0 for c in curve]
        r3_ax.errorbar(steps, r3, yerr=[low, high], marker="o", capsize=3, label=r["variant"])
        lift_ax.plot(steps, [c.get("lift_best") for c in curve], marker="o", label=r["variant"])
        doc_ax.plot(steps, [c.get("d_doc") for c in curve], marker="o", label=r["variant"])
        lm_ax.plot(steps, [c.get("lm") for c in curve], marker="o", label=r["variant"])
    random = results[0]["curve"][0]["random_recall@3"] if results and results[0]["curve"] else None
    if random is not None:
        r3_ax.axhline(random, color="grey", linestyle="--", label="random")
    if prior:
        r3_ax.axhline(prior[0], color="black", linestyle=":", label="unit-rule prior")
        r3_ax.axhspan(prior[1][0], prior[1][1], color="black", alpha=0.08)
    lift_ax.axhline(1.0, color="grey", linestyle="--")
    doc_ax.axhline(0.0, color="grey", linestyle="--")
    for ax, title in ((r3_ax, "held-out R@3, best layer"), (lift_ax, "lift on the unit, best layer"),
                      (doc_ax, "d_doc (nats)"), (lm_ax, "held-out LM loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    r3_ax.set_ylim(0, 1.02)
    r3_ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="saved outputs of benchmarks/learning_curve.py")
    parser.add_argument("--dataset", default="data", help="the dataset the runs held out (for the unit-rule prior)")
    parser.add_argument("--out", default="docs/learning_curve.png")
    args = parser.parse_args()
    results = read_results(args.logs)
    if not results:
        raise SystemExit("no learning_curve.py result lines in " + ", ".join(args.logs))
    prior = prior_recall3(args.dataset)
    if prior:
        print(f"unit-rule prior R@3 on the held-out split: {prior[0]:.3f} [{prior[1][0]:.3f}, {prior[1][1]:.3f}]")
    print(tables(results))
    plot(results, prior, Path(args.out))
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
