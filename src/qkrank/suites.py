"""Public checkpoint suites (Pythia, OLMo-2): supported architectures, revision schedules, checkpoint sources.

Torch-free, so config checks stay light: what an ``hf`` scale means (docs/suites.md). A scale
``model: {hf: <hub id or local dir>, architecture: gpt_neox|olmo2, revisions: [...], tokens_per_step: N}``
has no training job; each revision is probed as the checkpoint at ``tokens_seen`` given by its name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# The optimizer part of an hf cell id: {scale}/{mode}/pretrained/seed0 (the suite's one training run).
OPTIMIZER = "pretrained"
SEED = 0


class SuiteError(ValueError):
    """An hf scale that cannot be probed; the message names the field, revision or file."""


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    suite: str
    mode: str  # qkrank's norm mode of the suite: none (no QK-Norm) or learned (trained γ)
    sites: str  # what proj / normed / roped are in this architecture (docs/suites.md)


ARCHITECTURES = {
    "gpt_neox": Architecture(
        "gpt_neox", "Pythia (EleutherAI)", "none",
        "proj: the fused query_key_value output split into heads (per head [q | k | v]); normed = proj (no "
        "QK-Norm); roped: after the model's partial rotary (the first rotary_pct × head_dim dims of each head "
        "rotated, the rest passed through)"),
    "olmo2": Architecture(
        "olmo2", "OLMo-2 (AI2)", "learned",
        "proj: q_proj / k_proj split into heads; normed: after q_norm / k_norm, RMSNorm over the whole "
        "projection (all heads at once), then split into heads; roped: after the model's rotary"),
}


def architecture(model_type: str, where: str) -> Architecture:
    """The supported architecture of ``model_type``; else SuiteError listing the supported ones."""
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        supported = ", ".join(f"{a.model_type} ({a.suite})" for a in ARCHITECTURES.values())
        raise SuiteError(f"{where}: architecture {model_type!r} is not supported; supported: {supported}")
    return arch


_STEP = re.compile(r"(?:^|[-_])step(\d+)(?=$|[-_])")
_TOKENS = re.compile(r"(?:^|[-_])tokens(\d+)([KMBT]?)(?=$|[-_])")
_UNIT = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def revision_tokens(revision: str, tokens_per_step: int | None, where: str) -> tuple[int | None, int]:
    """(step, tokens seen) of a revision name: step × tokens_per_step when both are known (exact), else the
    name's ``tokensNB``. OLMo-2 names carry both (``stage1-step1000-tokens2B``); they must agree to the
    rounding of the named unit, which catches a wrong tokens_per_step."""
    step_match, tokens_match = _STEP.search(revision), _TOKENS.search(revision)
    step = int(step_match.group(1)) if step_match else None
    named = None
    if tokens_match:
        unit = _UNIT[tokens_match.group(2)]
        named = (int(tokens_match.group(1)) * unit, unit)
    if step is not None and tokens_per_step:
        tokens = step * tokens_per_step
        if named is not None and abs(tokens - named[0]) > named[1]:
            raise SuiteError(f"{where}: revision {revision!r} names {named[0]:,} tokens but step {step} × "
                             f"tokens_per_step {tokens_per_step:,} = {tokens:,}; check model.tokens_per_step")
        return step, tokens
    if named is not None:
        return step, named[0]
    need = "model.tokens_per_step" if step is not None else "a stepN or tokensN[KMBT] part in the name"
    raise SuiteError(f"{where}: cannot tell the tokens seen at revision {revision!r}: give {need}")


def schedule(model_cfg: dict, where: str) -> list[dict]:
    """One entry per revision, {revision, step, tokens}, in order of tokens; two revisions at the same
    tokens are an error (their probe files would share a name)."""
    out, seen = [], {}
    for revision in model_cfg["revisions"]:
        step, tokens = revision_tokens(revision, model_cfg.get("tokens_per_step"), f"{where}.model.revisions")
        if tokens in seen:
            raise SuiteError(f"{where}.model.revisions: {seen[tokens]!r} and {revision!r} are both at {tokens:,} "
                             f"tokens; keep one")
        seen[tokens] = revision
        out.append({"revision": revision, "step": step, "tokens": tokens})
    return sorted(out, key=lambda e: e["tokens"])


def is_local(hf: str) -> bool:
    """A local suite: a directory holding one sub-directory per revision (each a save_pretrained output)."""
    return Path(hf).expanduser().is_dir()


def checkpoint_source(hf: str, revision: str) -> tuple[str, str | None]:
    """(path or hub id, hub revision or None) that from_pretrained loads for ``revision``."""
    if is_local(hf):
        return str(Path(hf).expanduser() / revision), None
    return hf, revision


def read_model_type(hf: str, revision: str) -> str:
    """config.json's model_type, read before any weights: a local file, or only config.json from the hub."""
    source, hub_revision = checkpoint_source(hf, revision)
    if hub_revision is None:
        path = Path(source) / "config.json"
        if not path.is_file():
            raise SuiteError(f"{path} is missing: the local suite {hf} has no revision {revision!r} "
                             f"(expected one sub-directory per revision, each a save_pretrained output)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source, "config.json", revision=hub_revision)
        except Exception as e:
            raise SuiteError(f"{source}@{hub_revision}: cannot read config.json ({type(e).__name__}: {e}); on an "
                             f"offline node pre-fill the Hugging Face cache or point model.hf to a local copy"
                             ) from None
    try:
        return json.loads(Path(path).read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SuiteError(f"{path}: not a transformers config.json with a model_type ({e})") from None


def verdict_note(config: dict) -> list[str]:
    """Summary bullets for the hf scales: why the scenario verdict (which compares modes) does not apply."""
    lines = []
    for scale in config["grid"]["scales"]:
        model = config["scales"][scale]["model"]
        if "hf" not in model:
            continue
        arch = ARCHITECTURES[model["architecture"]]
        lines.append(f"- **{scale}** ({model['hf']}, {arch.suite}, mode `{arch.mode}`): no verdict. A public suite is "
                     f"one training run in one mode; another suite in another mode also differs in data, tokenizer, "
                     f"size and training recipe, so the modes are not comparable the way the verdict requires. "
                     f"Its key PR over tokens is in the tables and figures beside the others.")
    return lines
