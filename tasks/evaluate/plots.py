"""Plots of the report page, as PNG data URIs (matplotlib, Agg canvas, no
display and no global pyplot state, so Prefect threads can draw at once).

- ``loss_curves``: total, ITC and LM loss per optimizer step of each GeAR run;
- ``layer_curves``: localisation R@k by fusion layer with its interval and
  the random level (the paper's Fig. 4c);
- ``epoch_curves``: held-out localisation R@k and ROUGE-L at each training
  evaluation (the paper's Fig. 4a/b).

Each returns None when its records are absent; the page then says so.
"""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOSS_PARTS = (("loss", "total"), ("itc", "contrastive (ITC)"), ("lm", "language model (LM)"))


def _data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No creation metadata: the same numbers give the same bytes.
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def loss_curves(training: dict[str, dict]) -> str | None:
    """One panel per loss part, one line per model; parts a run never logged are left out."""
    runs = {name: t["steps"] for name, t in training.items() if t.get("steps")}
    if not runs:
        return None
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, len(LOSS_PARTS))
    for ax, (key, title) in zip(axes, LOSS_PARTS):
        for name, steps in runs.items():
            points = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
            if points and any(v for _, v in points):  # lm stays 0 in a contrastive-only run
                ax.plot(*zip(*points), label=name, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    return _data_uri(fig)


def layer_curves(report: dict, k: int = 3) -> list[tuple[str, str]]:
    """(caption, image) per model and set with localisation at every fusion layer."""
    metric = f"recall@{k}"
    out = []
    for model, per_set in report["localization_by_layer"].items():
        for s, layers in per_set.items():
            cis = report.get("localization_by_layer_ci", {}).get(model, {}).get(s, {})
            order = sorted((l for l in layers if layers[l]), key=int)
            if not order:
                continue
            xs = [int(l) for l in order]
            ys = [layers[l][metric] for l in order]
            fig = Figure(figsize=(5, 3.2))
            ax = fig.subplots()
            ci = [cis.get(l, {}).get(metric) if cis.get(l) else None for l in order]
            if all(ci):
                lo = [y - c[0] for y, c in zip(ys, ci)]
                hi = [c[1] - y for y, c in zip(ys, ci)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{model} (95% interval)")
            else:
                ax.plot(xs, ys, marker="o", label=model)
            rand = report["localization_random"].get(s)
            if rand:
                ax.axhline(rand[metric], color="grey", linestyle="--", label=f"random ranking ({rand[metric]:.2f})")
            ax.set_xticks(xs)
            ax.set_xlabel("fusion layer")
            ax.set_ylabel(f"R@{k}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            n = report["n_queries"]["localization"].get(s, 0)
            out.append((f"Localisation R@{k} by fusion layer, {model} on {s} ({n} queries)", _data_uri(fig)))
    return out


def epoch_curves(training: dict[str, dict], k: int = 3) -> str | None:
    """Held-out R@k and ROUGE-L at each training evaluation, against epochs done."""
    metric = f"recall@{k}"
    runs = {name: t for name, t in training.items() if any(e.get("localization") for e in t.get("evals", []))}
    if not runs:
        return None
    fig = Figure(figsize=(10, 3.2))
    loc_ax, gen_ax = fig.subplots(1, 2)
    drew_generation, in_epochs = False, all(t.get("steps_per_epoch") for t in runs.values())
    random_lines: set[tuple] = set()
    for name, t in runs.items():
        evals = [e for e in t["evals"] if e.get("localization")]
        # An evaluation at step s has seen s / steps_per_epoch epochs (an epoch-end
        # record already carries the next epoch's index, a mid-epoch one the current).
        xs = [e["step"] / t["steps_per_epoch"] if in_epochs else e["step"] for e in evals]
        loc_ax.plot(xs, [e["localization"].get(metric) for e in evals], marker="o", label=name)
        rand = [e["localization"].get(f"random_{metric}") for e in evals]
        if all(r is not None for r in rand) and tuple(rand) not in random_lines:  # runs on one split share it
            loc_ax.plot(xs, rand, color="grey", linestyle="--", label="random ranking" if not random_lines else f"random ranking ({name})")
            random_lines.add(tuple(rand))
        gen = [(x, e["generation"]["rougeL"]) for x, e in zip(xs, evals) if (e.get("generation") or {}).get("rougeL") is not None]
        if gen:
            gen_ax.plot(*zip(*gen), marker="o", label=name)
            drew_generation = True
    n = sorted({e["n_queries"] for t in runs.values() for e in t["evals"] if e.get("n_queries")})
    loc_ax.set_title(f"held-out localisation R@{k}" + (f" ({', '.join(map(str, n))} queries)" if n else ""))
    loc_ax.set_ylim(0, 1.02)
    gen_ax.set_title("held-out generation ROUGE-L (%)" if drew_generation else "no generation recorded")
    for ax in (loc_ax, gen_ax):
        ax.set_xlabel("epochs trained" if in_epochs else "optimizer step")
        ax.grid(alpha=0.3)
    loc_ax.legend(fontsize=8)
    if drew_generation:
        gen_ax.legend(fontsize=8)
    return _data_uri(fig)


def diagnostic_curves(training: dict[str, dict]) -> str | None:
    """Per held-out evaluation: R@3 at the best fusion layer, the attention
    lift on the unit there, and d_doc / d_pair, against epochs done."""
    runs = {name: t for name, t in training.items() if any(e.get("document_dependence") for e in t.get("evals", []))}
    if not runs:
        return None
    fig = Figure(figsize=(12, 3.2))
    r3_ax, lift_ax, dep_ax = fig.subplots(1, 3)
    for name, t in runs.items():
        evals = [e for e in t["evals"] if e.get("document_dependence")]
        per_epoch = t.get("steps_per_epoch")
        xs = [e["step"] / per_epoch if per_epoch else e["step"] for e in evals]
        best = [str(e.get("best_layer")) for e in evals]
        r3_ax.plot(xs, [(e.get("localization_by_layer") or {}).get(b, {}).get("recall@3") for e, b in zip(evals, best)],
                   marker="o", label=name)
        lift_ax.plot(xs, [(e.get("lift_by_layer") or {}).get(b) for e, b in zip(evals, best)], marker="o", label=name)
        dep_ax.plot(xs, [e["document_dependence"]["d_doc"] for e in evals], marker="o", label=f"{name}: d_doc")
        dep_ax.plot(xs, [e["document_dependence"]["d_pair"] for e in evals], marker="x", linestyle=":",
                    label=f"{name}: d_pair")
    lift_ax.axhline(1.0, color="grey", linestyle="--", label="no preference")
    dep_ax.axhline(0.0, color="grey", linestyle="--")
    r3_ax.set_title("held-out R@3, best layer")
    r3_ax.set_ylim(0, 1.02)
    lift_ax.set_title("attention lift on the unit, best layer")
    dep_ax.set_title("LM loss rise when swapped (nats)")
    for ax in (r3_ax, lift_ax, dep_ax):
        ax.set_xlabel("epochs trained")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _data_uri(fig)
