"""Public checkpoint suites (issue 17): revision schedules, architecture checks, the probe sites taken from the
models' own modules, the probe file, and the whole workflow on tiny random GPT-NeoX and OLMo-2 "suites" saved
to local directories (one per revision). No hub access: HF_HUB_OFFLINE=1 for this process and its children."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

import h5py  # noqa: E402
import torch  # noqa: E402
from conftest import MICRO_CONFIG, REPO, copy_project, run_snakemake, write_config  # noqa: E402
from tiny_suites import NEOX_REVISIONS, OLMO2_REVISIONS, build_suite, neox_config, olmo2_config  # noqa: E402

from qkrank import config as qconfig  # noqa: E402
from qkrank import layout, probe_hf, suites  # noqa: E402
from qkrank.rank import pr  # noqa: E402

NEOX_TOKENS_PER_STEP = 1000


@pytest.fixture(scope="session")
def tiny_suites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suites")
    return {"neox": build_suite(root / "neox", neox_config(), NEOX_REVISIONS),
            "olmo2": build_suite(root / "olmo2", olmo2_config(), OLMO2_REVISIONS)}


def suite_config(suites_dir: dict[str, Path]) -> dict:
    """A micro study of both tiny suites on the builtin corpus."""
    probe = {"n_sequences": 4, "seq_len": 64}
    return {
        "grid": {"scales": ["neox", "olmo2"], "modes": ["none", "learned"], "seeds": [0]},
        "data": {"source": "builtin", "tokenizer": {"kind": "bpe", "vocab_size": 512}},
        "scales": {
            "neox": {"model": {"hf": str(suites_dir["neox"]), "architecture": "gpt_neox",
                               "revisions": NEOX_REVISIONS, "tokens_per_step": NEOX_TOKENS_PER_STEP},
                     "probe": probe},
            "olmo2": {"model": {"hf": str(suites_dir["olmo2"]), "architecture": "olmo2",
                                "revisions": OLMO2_REVISIONS, "tokens_per_step": 2000},
                      "probe": probe},
        },
    }


# ------------------------------------------------------------------------------ revisions and config


def test_pythia_revision_is_step_times_tokens_per_step():
    assert suites.revision_tokens("step1000", 2_097_152, "f") == (1000, 2_097_152_000)
    assert suites.revision_tokens("step0", 2_097_152, "f") == (0, 0)


def test_olmo2_revision_uses_the_exact_step_count_and_checks_the_named_tokens():
    # OLMo-2 1B: 120,000 steps × 2,097,152 tokens = 251.66B, named "tokens252B"
    assert suites.revision_tokens("stage1-step120000-tokens252B", 2_097_152, "f") == (120000, 251_658_240_000)
    assert suites.revision_tokens("stage1-step120000-tokens252B", None, "f") == (120000, 252 * 10**9)
    with pytest.raises(suites.SuiteError, match="tokens_per_step"):
        suites.revision_tokens("stage1-step120000-tokens252B", 4_194_304, "scales.olmo.model.revisions")


def test_a_revision_without_a_token_count_names_what_is_missing():
    with pytest.raises(suites.SuiteError, match="model.tokens_per_step"):
        suites.revision_tokens("step10", None, "f")
    with pytest.raises(suites.SuiteError, match="stepN or tokensN"):
        suites.revision_tokens("main", 1000, "f")


def test_schedule_is_sorted_and_rejects_two_revisions_at_the_same_tokens():
    entries = suites.schedule({"revisions": ["step8", "step0", "step2"], "tokens_per_step": 10}, "scales.a")
    assert [e["tokens"] for e in entries] == [0, 20, 80]
    with pytest.raises(suites.SuiteError, match="both at 2,000 tokens"):
        suites.schedule({"revisions": ["step2", "tokens2K"], "tokens_per_step": 1000}, "scales.a")


def test_hf_scale_has_one_pretrained_cell_and_its_revisions_as_checkpoints(tmp_path):
    cfg = qconfig.load(suite_config({"neox": tmp_path / "n", "olmo2": tmp_path / "o"}))
    cells = qconfig.cells(cfg)
    assert [c.id for c in cells] == ["neox/none/pretrained/seed0", "olmo2/learned/pretrained/seed0"]
    settings = qconfig.cell_settings(cfg, cells[0])
    assert qconfig.checkpoint_tokens(settings) == [0, 2000, 8000]
    assert "train" not in settings


def test_hf_scale_config_errors_name_the_field(tmp_path):
    cfg = suite_config({"neox": tmp_path / "n", "olmo2": tmp_path / "o"})
    cfg["scales"]["neox"]["model"]["architecture"] = "llama"
    with pytest.raises(qconfig.ConfigError, match=r"scales\.neox\.model\.architecture.*gpt_neox.*olmo2"):
        qconfig.load(cfg)
    cfg = suite_config({"neox": tmp_path / "n", "olmo2": tmp_path / "o"})
    del cfg["scales"]["neox"]["probe"]["seq_len"]
    with pytest.raises(qconfig.ConfigError, match=r"'scales\.neox\.probe\.seq_len': required"):
        qconfig.load(cfg)
    cfg = suite_config({"neox": tmp_path / "n", "olmo2": tmp_path / "o"})
    del cfg["scales"]["neox"]["model"]["tokens_per_step"]
    with pytest.raises(qconfig.ConfigError, match=r"'scales\.neox\.model\.revisions': .*'step0'.*tokens_per_step"):
        qconfig.load(cfg)


def test_unsupported_architecture_fails_before_any_weights_are_read(tmp_path):
    revision = tmp_path / "suite" / "step0"
    revision.mkdir(parents=True)
    (revision / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights at all
    with pytest.raises(suites.SuiteError, match=r"'llama' is not supported; supported: gpt_neox \(Pythia.*olmo2"):
        probe_hf.load(str(tmp_path / "suite"), "step0", "gpt_neox", "float32", torch.device("cpu"))
    with pytest.raises(suites.SuiteError, match="has no revision 'step9'"):
        probe_hf.load(str(tmp_path / "suite"), "step9", "gpt_neox", "float32", torch.device("cpu"))


# ------------------------------------------------------------------------- sites from the model's modules


def captured(model: probe_hf.SuiteModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), model.capture() as sites:
        model.residual_stream(ids)
    return sites


def own_rotary(model: probe_hf.SuiteModel, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k through the model's own rotary embedding and its modeling file's apply_rotary_pos_emb."""
    modeling = __import__(type(model.model).__module__, fromlist=["apply_rotary_pos_emb"])
    positions = torch.arange(q.shape[2])[None].expand(q.shape[0], -1)
    cos, sin = model.model.rotary_emb(q, positions)
    return modeling.apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("name", ["neox", "olmo2"])
def test_roped_equals_the_models_own_rotary_of_normed(tiny_suites, name):
    revisions = {"neox": NEOX_REVISIONS, "olmo2": OLMO2_REVISIONS}[name]
    model, _ = probe_hf.load(str(tiny_suites[name]), revisions[-1], {"neox": "gpt_neox"}.get(name, name),
                             "float32", torch.device("cpu"))
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    sites = captured(model, ids)
    for layer in range(model.shape.n_layers):
        q, k = (sites[f"layer.{layer}/{t}/normed"] for t in "qk")
        q_rot, k_rot = own_rotary(model, q, k)
        torch.testing.assert_close(sites[f"layer.{layer}/q/roped"], q_rot, rtol=0, atol=1e-6)
        torch.testing.assert_close(sites[f"layer.{layer}/k/roped"], k_rot, rtol=0, atol=1e-6)
        assert q.shape == (2, model.shape.n_heads, 48, model.shape.head_dim)
        assert k.shape == (2, model.shape.n_kv_heads, 48, model.shape.head_dim)


def test_gpt_neox_sites_fused_split_and_partial_rotary(tiny_suites):
    model, _ = probe_hf.load(str(tiny_suites["neox"]), "step8", "gpt_neox", "float32", torch.device("cpu"))
    d, heads = model.shape.head_dim, model.shape.n_heads
    assert (model.arch.mode, model.rotary_dims, d, model.shape.n_kv_heads) == ("none", 4, 16, 4)  # 0.25 × 16
    inputs = {}
    attn = model.layers[1].attention
    handle = attn.query_key_value.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    sites = captured(model, ids)
    handle.remove()
    w, b = attn.query_key_value.weight, attn.query_key_value.bias
    for h in range(heads):  # per head [q | k | v] rows of the fused weight
        for offset, tensor in ((0, "q"), (d, "k")):
            rows = slice(h * 3 * d + offset, h * 3 * d + offset + d)
            expected = torch.nn.functional.linear(inputs["x"], w[rows], b[rows])
            torch.testing.assert_close(sites[f"layer.1/{tensor}/proj"][:, h], expected, rtol=1e-5, atol=1e-6)
    proj, roped = sites["layer.1/k/proj"], sites["layer.1/k/roped"]
    assert torch.equal(sites["layer.1/k/normed"], proj)
    assert torch.equal(roped[..., 4:], proj[..., 4:])  # dims 4..15 pass through the rotary untouched
    assert not torch.allclose(roped[:, :, 1:, :4], proj[:, :, 1:, :4])  # dims 0..3 rotate from position 1 on
    assert model.gammas() == {}


def test_olmo2_normed_is_rmsnorm_over_the_whole_projection_and_gamma_is_its_weight(tiny_suites):
    model, _ = probe_hf.load(str(tiny_suites["olmo2"]), OLMO2_REVISIONS[-1], "olmo2", "float32",
                             torch.device("cpu"))
    assert (model.arch.mode, model.shape.n_heads, model.shape.n_kv_heads) == ("learned", 4, 2)
    sites = captured(model, torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(2)))
    gammas = model.gammas()
    for t, heads in (("q", 4), ("k", 2)):
        norm = getattr(model.layers[0].self_attn, f"{t}_norm")
        flat = sites[f"layer.0/{t}/proj"].transpose(1, 2).flatten(2)  # (B, T, heads·d)
        whole = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        normed = sites[f"layer.0/{t}/normed"].transpose(1, 2).flatten(2)
        torch.testing.assert_close(normed, whole, rtol=1e-5, atol=1e-6)
        per_head = sites[f"layer.0/{t}/proj"]
        per_head = per_head * torch.rsqrt(per_head.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        assert not torch.allclose(per_head.transpose(1, 2).flatten(2) * norm.weight, normed, atol=1e-3)
        assert gammas[f"layer.0/gamma_{t}"].shape == (heads, 16)
        assert torch.equal(gammas[f"layer.0/gamma_{t}"].flatten(), norm.weight)


# ------------------------------------------------------------------------------------------ probe file


@pytest.fixture(scope="session")
def micro_suite_data(tmp_path_factory, tiny_suites) -> tuple[dict, Path]:
    from qkrank.data import prepare

    cfg = qconfig.load(suite_config(tiny_suites))
    out = tmp_path_factory.mktemp("suite_data")
    prepare(cfg["data"], out)
    return cfg, out


@pytest.mark.parametrize("cell_id", ["neox/none/pretrained/seed0", "olmo2/learned/pretrained/seed0"])
def test_probe_file_layout_and_pr_recomputed_with_numpy(micro_suite_data, tmp_path, cell_id):
    cfg, data = micro_suite_data
    settings = qconfig.cell_settings(cfg, qconfig.Cell.parse(cell_id))
    tokens = qconfig.checkpoint_tokens(settings)[-1]
    out = tmp_path / f"{tokens}.h5"
    probe_hf.probe_revision(settings, data, tokens, out)
    olmo = cell_id.startswith("olmo2")
    heads = {"q": 4, "k": 2 if olmo else 4}
    with h5py.File(out) as f:
        a = dict(f.attrs)
        assert a["complete"] and a["schema_version"] == layout.PROBE_SCHEMA_VERSION
        assert a["cell"] == cell_id and a["tokens_seen"] == tokens
        assert a["hf_revision"] == settings["schedule"][-1]["revision"] and a["n_probe_tokens"] == 256
        assert (a["n_layers"], a["n_heads"], a["n_kv_heads"], a["head_dim"]) == (2, 4, heads["k"], 16)
        assert a["rotary_dims"] == (16 if olmo else 4) and a["activations_saved"]
        for layer in range(2):
            for t in "qk":
                for site in ("proj", "normed", "roped"):
                    g = f[f"layers/{layer}/{t}/{site}"]
                    assert g["sv"].shape == g["eig_cov"].shape == (heads[t], 16)
                    assert g["act"].shape == (heads[t], 256, 16)
                    act = g["act"][()].astype(np.float64)
                    for h in range(heads[t]):
                        sv = np.linalg.svd(act[h], compute_uv=False)
                        assert g["pr"][h] == pytest.approx(sv.sum() ** 2 / (sv**2).sum(), rel=1e-3)
                        assert g["pr"][h] == pytest.approx(pr(g["sv"][h]), rel=1e-12)
                if olmo:
                    assert f[f"layers/{layer}/gamma_{t}"].shape == (heads[t], 16)
                else:
                    assert f"gamma_{t}" not in f[f"layers/{layer}"]
        if not olmo:  # no QK-Norm: normed is proj
            assert np.array_equal(f["layers/0/k/normed/sv"][()], f["layers/0/k/proj/sv"][()])


def test_probe_batch_is_the_study_corpus_in_the_models_tokenizer(micro_suite_data, tiny_suites):
    _, data = micro_suite_data
    texts = probe_hf.corpus_texts(data)
    from qkrank.builtin_corpus import load_documents

    assert set(texts) <= {d["text"] for d in load_documents()}  # decoding the study's BPE gives the documents
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_suites["neox"] / "step0")
    ids = probe_hf.encode_texts(tokenizer, texts[:3])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(texts[:3])
    windows = probe_hf.fixed_windows(ids, 4, 64)
    assert windows.shape == (4, 64) and windows.max() < 320
    with pytest.raises(probe_hf.HFProbeError, match="fewer than one probe window"):
        probe_hf.fixed_windows(ids[:10], 4, 64)


# -------------------------------------------------------------------------------------------- workflow


@pytest.mark.slow
def test_whole_workflow_on_tiny_suites_beside_a_trained_scale(tmp_path, tiny_suites):
    from qkrank.figures import FIGURES

    root = copy_project(tmp_path)
    cfg = suite_config(tiny_suites)
    cfg["grid"]["scales"].append("tiny")  # the micro study's trained scale, in modes learned and frozen
    cfg["grid"]["modes"] = ["learned", "frozen"]  # (grid.modes applies to trained scales only)
    cfg["scales"]["tiny"] = MICRO_CONFIG["scales"]["tiny"]
    write_config(root / "suites.yaml", cfg)
    run_snakemake(root, root / "suites.yaml", snakefile=root / "Snakefile")
    results = root / "results"
    for cell, tokens in (("neox/none/pretrained/seed0", [0, 2000, 8000]),
                         ("olmo2/learned/pretrained/seed0", [0, 6000])):
        assert sorted(int(p.stem) for p in (results / "runs" / cell / "probe").glob("*.h5")) == tokens
        assert not (results / "runs" / cell / "train.json").exists()  # never trained
        with h5py.File(results / "runs" / cell / "probe" / f"{tokens[-1]}.h5") as f:
            act = f["layers/1/k/roped/act"][()].astype(np.float64)
            sv = np.linalg.svd(act[0], compute_uv=False)
            assert f["layers/1/k/roped/pr"][0] == pytest.approx(sv.sum() ** 2 / (sv**2).sum(), rel=1e-3)
    import pandas as pd

    mean_pr = pd.read_csv(results / "tables/mean_pr_ci.csv")
    assert set(zip(mean_pr.scale, mean_pr["mode"], mean_pr.optimizer, strict=True)) == {
        ("neox", "none", "pretrained"), ("olmo2", "learned", "pretrained"), ("tiny", "learned", "muon"),
        ("tiny", "frozen", "muon")}
    assert set(pd.read_csv(results / "tables/gamma.csv").scale) == {"olmo2", "tiny"}
    assert set(pd.read_csv(results / "tables/losses.csv").scale) == {"tiny"}  # suites have no training log
    assert {(v["scale"], v["optimizer"]) for v in json.loads((results / "verdict.json").read_text())} == {
        ("tiny", "muon")}  # the verdict compares the trained scale's modes only
    for name in FIGURES:
        assert (results / "figures" / f"{name}.png").exists() or list((results / "figures" / name).rglob("*.png"))
    assert (results / "figures/layer_heatmap/olmo2/pretrained/learned.png").exists()
    assert (results / "figures/layer_heatmap/tiny/muon/frozen.png").exists()
    assert not (results / "figures/layer_heatmap/neox/muon").exists()
    assert (results / "figures/gamma_distribution/olmo2/pretrained/learned.png").exists()
    summary = (results / "summary.md").read_text()
    assert summary.count("no verdict") == 2 and "not comparable" in summary


def test_public_suites_config_builds_the_full_dag_offline(tmp_path, monkeypatch):
    # any attempt to reach the hub or the network fails at once
    for name in ("HF_ENDPOINT", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    root = copy_project(tmp_path)
    proc = run_snakemake(root, root / "configs/public_suites.yaml", "-n", "--quiet", "rules",
                         snakefile=root / "Snakefile")
    out = proc.stdout + proc.stderr
    cfg = qconfig.load(REPO / "configs/public_suites.yaml")
    revisions = sum(len(cfg["scales"][s]["model"]["revisions"]) for s in cfg["grid"]["scales"])
    jobs = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert jobs["probe_hf"] == revisions == 72 and "train" not in jobs and jobs["aggregate"] == 1, out
    assert not (root / cfg["results_dir"]).exists()  # nothing fetched or written while the DAG is built
