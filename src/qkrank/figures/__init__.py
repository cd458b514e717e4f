"""One module per figure kind; each is a Snakemake rule input, so editing one redraws only its figure.

``FIGURES`` is the registry the workflow (workflow/rules/figures.smk) and the summary share: per kind,
the tables it reads, its report category, its title, and whether it is drawn once per mode (and for
which modes). Importing this package loads no plotting library.
"""

from __future__ import annotations

FIGURES: dict[str, dict] = {
    "loss": {"tables": ["loss_curves"], "category": "1 · Loss", "title": "Training and validation loss"},
    "pr_trajectory": {"tables": ["mean_pr_ci"], "category": "2 · Key PR over training",
                      "title": "Mean key PR over training"},
    "layer_pr": {"tables": ["layer_pr"], "category": "3 · Key PR by layer",
                 "title": "Key PR by layer at the final checkpoint"},
    "layer_heatmap": {"tables": ["layer_pr"], "category": "3 · Key PR by layer",
                      "title": "Key PR by layer over training", "per_mode": ["learned", "frozen", "none"]},
    "spectral_decay": {"tables": ["spectra"], "category": "4 · Spectral decay",
                       "title": "Spectral decay of the keys and of W_K by depth"},
    "gamma_cv": {"tables": ["gamma_cv_final"], "category": "5 · γ", "title": "γ coefficient of variation by layer"},
    "gamma_distribution": {"tables": ["gamma"], "category": "5 · γ", "title": "γ entries by layer over training",
                           "per_mode": ["learned"]},
    "query_key_pr": {"tables": ["mean_pr_ci"], "category": "6 · Query vs key PR",
                     "title": "Query and key PR over training"},
    "paired_effects": {"tables": ["paired"], "category": "8 · Verdict evidence",
                       "title": "Paired differences between modes"},
    "gamma_pr": {"tables": ["gamma_pr_points", "gamma_pr"], "category": "5 · γ", "title": "γ spread against PR"},
    "gamma_dims": {"tables": ["gamma_dims"], "category": "5 · γ", "title": "Individual γ dimensions over training"},
    "weight_pr": {"tables": ["weight_spectra"], "category": "4 · Spectral decay",
                  "title": "PR of the projection weights W_Q and W_K"},
    "depth_pr": {"tables": ["depth_pr"], "category": "3 · Key PR by layer", "title": "Depth–PR gradient over training"},
}


def figure_modes(name: str, modes: list[str]) -> list[str]:
    """The study's modes that a per-mode figure is drawn for (frozen γ and no norm have no γ to show)."""
    return [m for m in modes if m in FIGURES[name]["per_mode"]]
