"""A cell's rerun identity: what can change its results (settings.json) apart from resources and runtime
knobs (runtime.json), which reach the jobs but never rerun a finished one (issue 14)."""

from __future__ import annotations

import copy
from pathlib import Path

from qkrank.config import deep_merge, load_json

# None: the whole section.
RUNTIME_FIELDS = {"train": ("threads", "keep_resume_checkpoints"), "probe": ("chunk_sequences",), "resources": None}


def split_runtime(settings: dict) -> tuple[dict, dict]:
    """A cell's settings → (identity: what can change its results, runtime: the RUNTIME_FIELDS)."""
    identity, runtime = copy.deepcopy(settings), {}
    for section, keys in RUNTIME_FIELDS.items():
        if keys is None:
            runtime[section] = identity.pop(section)
        elif section in identity:  # an hf scale has no train section
            runtime[section] = {k: identity[section].pop(k) for k in keys if k in identity[section]}
    return identity, runtime


def study_identity(config: dict) -> dict:
    """The study config without runtime knobs (what config.json holds, so the analysis reruns only when
    something that can change results changes); loading it fills the knobs back with their defaults."""
    out = copy.deepcopy(config)
    out["data"].pop("num_proc", None)
    for section in (*out["scales"].values(), *out["cell_overrides"].values()):
        for name, keys in RUNTIME_FIELDS.items():
            if keys is None:
                section.pop(name, None)
            elif isinstance(section.get(name), dict):
                for key in keys:
                    section[name].pop(key, None)
    return out


def load_cell_settings(path: str | Path) -> dict:
    """A cell's settings.json with the runtime.json beside it (if any) merged over it."""
    path = Path(path)
    settings = load_json(path)
    runtime = path.with_name("runtime.json")
    return deep_merge(settings, load_json(runtime)) if runtime.exists() else settings


