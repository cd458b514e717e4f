"""Every figure module draws from aggregated tables: PNG and PDF, several scales, one mode, one seed."""

from __future__ import annotations

import importlib
import re
import struct
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from test_aggregate import build_study, synthetic_config

from qkrank import aggregate as agg
from qkrank import config as qconfig
from qkrank.figures import FIGURES, figure_modes, style


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def two_scale_config() -> dict:
    """Two scales of different depth and two seeds: facets, bands and per-scale colour scales."""
    cfg = synthetic_config(scales=("tiny", "deeper"), seeds=(0, 1))
    raw = {k: cfg[k] for k in ("grid", "data", "aggregate")} | {"scales": dict(cfg["scales"])}
    raw["scales"]["deeper"] = qconfig.deep_merge(raw["scales"]["tiny"], {"model": {"n_layers": 3}})
    return qconfig.load(raw)


@pytest.fixture(scope="module")
def tables_dirs(tmp_path_factory):
    """Aggregated tables of a two-scale, two-seed study and of a one-mode ('none'), one-seed study."""
    dirs = {}
    for name, cfg in (("full", two_scale_config()), ("minimal", synthetic_config(modes=["none"], seeds=[0]))):
        results = build_study(tmp_path_factory.mktemp(name), cfg, extras=name == "full")
        agg.aggregate(cfg, results)
        dirs[name] = (cfg, results / "tables")
    return dirs


def cli_args(name: str, cfg: dict, tables, out_dir) -> list[list[str]]:
    """The command lines the workflow gives a figure module: one per (scale, optimizer, mode) if per-mode."""
    if "per_mode" not in FIGURES[name]:
        return [["--tables", str(tables), "--out", str(out_dir / f"{name}.png")]]
    grid = cfg["grid"]
    modes = figure_modes(name, grid["modes"]) or ["learned"]  # a study without the mode draws a blank figure
    return [["--tables", str(tables), "--out", str(out_dir / f"{name}_{s}_{o}_{m}.png"),
             "--scale", s, "--optimizer", o, "--mode", m]
            for s in grid["scales"] for o in grid["optimizers"] for m in modes]


def drawn(name: str, cfg: dict, tables, tmp_path) -> list:
    """Each plot a figure module makes for a study, drawn (the workflow's own run saves them to files)."""
    module = importlib.import_module(f"qkrank.figures.{name}")
    frames = [pd.read_csv(tables / f"{t}.csv") for t in FIGURES[name]["tables"]]
    plots = []
    for args in cli_args(name, cfg, tables, tmp_path):
        parsed = style.cli("", per_mode="per_mode" in FIGURES[name]).parse_args(args)
        selection = (parsed.scale, parsed.optimizer, parsed.mode) if "per_mode" in FIGURES[name] else ()
        plot = module.plot(*frames, *selection)
        plt.close(plot.draw())
        plots.append(plot)
    return plots


def heading(plot) -> str:
    return " ".join(str(plot.labels.get(k, "")) for k in ("title", "subtitle"))


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_draws_for_two_scales_and_two_seeds(name, tables_dirs, tmp_path):
    cfg, tables = tables_dirs["full"]
    for plot in drawn(name, cfg, tables, tmp_path):
        if name in ("spectral_decay", "gamma_distribution", "layer_heatmap"):
            assert "2 seeds" in heading(plot) or "heads and seeds" in heading(plot), heading(plot)
        else:
            assert "95% Student-t interval over 2 seeds" in heading(plot), heading(plot)


@pytest.mark.parametrize("name", list(FIGURES))
def test_figure_draws_for_one_mode_and_one_seed(name, tables_dirs, tmp_path):
    """With one seed the bands collapse to lines; with no γ the γ figures say so instead of failing."""
    cfg, tables = tables_dirs["minimal"]
    for plot in drawn(name, cfg, tables, tmp_path):
        if name.startswith("gamma"):
            message = plot.data["text"].iloc[0]  # the blank figure's explanation
            assert "γ" in heading(plot) and "γ" in message and "no" in message.lower()
        elif name == "paired_effects":
            assert "one mode" in plot.data["text"].iloc[0]
        elif name == "weight_pr":
            assert "No weight spectra" in plot.data["text"].iloc[0]
        elif name != "spectral_decay":
            assert "one seed" in heading(plot), heading(plot)


def test_main_writes_png_and_pdf_atomically(tables_dirs, tmp_path):
    cfg, tables = tables_dirs["full"]
    from qkrank.figures import layer_heatmap

    args = cli_args("layer_heatmap", cfg, tables, tmp_path)[0]
    layer_heatmap.main(args)
    out = Path(args[3])
    width, height = png_size(out)
    assert width >= 1000 and height >= 500, (width, height)
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.with_suffix(".pdf").name, out.name]


def test_with_band_collapses_to_the_mean_without_an_interval():
    frame = pd.DataFrame({"mean": [1.0, 2.0], "ci_low": [0.5, float("nan")], "ci_high": [1.5, float("nan")]})
    banded = style.with_band(frame)
    assert banded.low.tolist() == [0.5, 2.0] and banded.high.tolist() == [1.5, 2.0]


def test_per_mode_figures_cover_the_modes_that_have_something_to_show():
    assert figure_modes("layer_heatmap", ["none", "learned"]) == ["none", "learned"]
    assert figure_modes("gamma_distribution", ["frozen", "none"]) == []
    assert figure_modes("gamma_distribution", ["learned", "none"]) == ["learned"]


def test_token_axis_unit_follows_the_study_length():
    assert style.token_unit(983_040) == (1e3, "thousands")
    assert style.token_unit(49_000_000) == (1e6, "millions")


def test_summary_html_renders_headings_tables_and_inline_markup():
    from qkrank.summary import markdown_html

    page = markdown_html("# Title\n\nSome **bold** and `x<y` text\nwrapped.\n\n- **A**: point\n\n"
                         "| Metric | learned |\n|:---|:---:|\n| PR | 1 ± 2 |\n\n![loss](figures/loss.png)\n", "t")
    page = re.sub(r">\s+<", "><", re.sub(r' style="[^"]*"', "", page)).replace("\n", " ")
    assert "<h1>Title</h1>" in page
    assert "<p>Some <strong>bold</strong> and <code>x&lt;y</code> text wrapped.</p>" in page
    assert "<ul><li><strong>A</strong>: point</li></ul>" in page
    assert "<th>Metric</th><th>learned</th>" in page and "<td>PR</td><td>1 ± 2</td>" in page
    assert ":---" not in page and "<img" not in page and "figure: loss" in page


def test_summary_captions_come_from_the_report_captions(tmp_path):
    from qkrank.summary import SummaryError, caption_text, figure_kind

    rst = tmp_path / "loss.rst"
    rst.write_text("Loss of ``mode``\nover tokens.\n")
    assert caption_text(rst) == "Loss of `mode` over tokens."
    with pytest.raises(SummaryError, match="caption file missing"):
        caption_text(tmp_path / "missing.rst")
    figures = tmp_path / "figures"
    assert figure_kind(figures / "loss.png", figures) == ("loss", "")
    assert figure_kind(figures / "layer_heatmap/tiny/muon/none.png", figures) == ("layer_heatmap",
                                                                                 "tiny · muon · no QK-Norm")
    with pytest.raises(SummaryError, match="not a figure path"):
        figure_kind(figures / "a/b.png", figures)
    for name in FIGURES:
        assert caption_text(Path(__file__).resolve().parents[1] / "workflow" / "report" / f"{name}.rst")
