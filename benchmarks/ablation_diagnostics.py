"""The paper's diagnostics in the ablation report (``eval.diagnostics_sequences``; asymoe_train/evaluation/
diagnostics.py): a table of the evidence-grounding ratio F(E_k) and the evidence-dependence ratio R_k per variant,
MoE layer and expert, the attention entropy per layer, and a plot of both; mean ± std over seeds."""

from __future__ import annotations

import os
import statistics

from paired_report import mean_spread


def _diagnosed(runs_by_variant: dict[str, list[dict]]) -> dict[str, list[dict]]:
    found = {v: [r["diagnostics"] for r in runs if r.get("diagnostics")] for v, runs in runs_by_variant.items()}
    return {v: d for v, d in found.items() if d}


def diagnostics_tables(runs_by_variant: dict[str, list[dict]]) -> list[str]:
    """Markdown: per variant, MoE layer and expert F(E_k), R_k and the activation shares (image intact / blanked);
    then the attention entropy per decoder layer. Empty when no run has diagnostics."""
    diagnosed = _diagnosed(runs_by_variant)
    if not diagnosed:
        return []
    lines = ["| variant | MoE layer | expert | F(E_k) evidence-grounding | R_k evidence-dependence | share, image intact "
             "| share, image blanked |", "| --- " * 7 + "|"]
    for variant, reports in diagnosed.items():
        for layer, values in reports[0]["layers"].items():
            for expert in values["grounding_ratio"]:
                cells = [mean_spread([r["layers"][layer][key][expert] for r in reports])
                         for key in ("grounding_ratio", "dependence_ratio", "activation_intact", "activation_blanked")]
                lines.append(f"| {variant} | {layer} | {expert} | " + " | ".join(cells) + " |")
    num_layers = len(next(iter(diagnosed.values()))[0]["attention_entropy"])
    lines += ["", "| variant | " + " | ".join(f"entropy L{i}" for i in range(num_layers)) + " |",
              "| --- " * (num_layers + 1) + "|"]
    for variant, reports in diagnosed.items():
        lines.append(f"| {variant} | " + " | ".join(mean_spread([r["attention_entropy"][i] for r in reports])
                                                   for i in range(num_layers)) + " |")
    return lines


def diagnostics_plot(runs_by_variant: dict[str, list[dict]], directory: str) -> list[str]:
    """``diagnostics.png``: R_k of every expert (mean over MoE layers and seeds) per variant, and the attention
    entropy per layer; returns the files written (relative names)."""
    diagnosed = _diagnosed(runs_by_variant)
    if not diagnosed:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = {v: f"C{i}" for i, v in enumerate(runs_by_variant)}
    labels, values, bar_colours = [], [], []
    for variant, reports in diagnosed.items():
        experts = list(next(iter(reports[0]["layers"].values()), {}).get("dependence_ratio", {}))
        for expert in experts:
            ratios = [layer["dependence_ratio"][expert] for r in reports for layer in r["layers"].values()]
            ratios = [x for x in ratios if x is not None]
            labels.append(f"{variant}\n{expert}")
            values.append(statistics.mean(ratios) if ratios else 0.0)
            bar_colours.append(colours[variant])
    axes[0].bar(range(len(values)), values, color=bar_colours)
    axes[0].axhline(0, color="k", linewidth=0.8)
    axes[0].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes[0].set(ylabel="R_k (image intact vs blanked)", title="evidence-dependence ratio per expert")
    for variant, reports in diagnosed.items():
        layers = range(len(reports[0]["attention_entropy"]))
        axes[1].plot(list(layers), [statistics.mean(r["attention_entropy"][i] for r in reports) for i in layers],
                     marker="o", label=variant, color=colours[variant])
    axes[1].set(xlabel="decoder layer", ylabel="attention entropy (nats)",
                title="attention entropy, answer-predicting positions")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "diagnostics.png"), dpi=120)
    plt.close(fig)
    return ["diagnostics.png"]
