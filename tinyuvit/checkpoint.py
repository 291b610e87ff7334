"""Checkpoints: one `.npz` (read with allow_pickle=False), written atomically.

Keys: `param/<name>` weights, `ema/<name>` EMA weights, `opt/m.<name>` and `opt/v.<name>` AdamW
moments, `step`, `opt_k`, and `config` (the run's configuration as a JSON string). The random
state is the run's seed plus the step: every step draws from a generator seeded by (seed, step),
so (config.seed, step) restores it exactly.
"""
import json
import os
import zipfile

import numpy as np

from .backend import to_numpy
from .files import atomic_write


from .errors import CheckpointError  # noqa: F401


def save_checkpoint(path, *, params, ema, opt_state, opt_k, step, config):
    """Write everything needed to resume to `path`, via a temporary file and a rename."""
    arrays = {f"param/{k}": to_numpy(v) for k, v in params.items()}
    arrays.update({f"ema/{k}": to_numpy(v) for k, v in ema.items()})
    arrays.update({f"opt/{k}": to_numpy(v) for k, v in opt_state.items()})
    arrays["step"] = np.array(step, dtype=np.int64)
    arrays["opt_k"] = np.array(opt_k, dtype=np.int64)
    arrays["config"] = np.array(json.dumps(config, sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))  # the old checkpoint stays whole until done


def load_checkpoint(path):
    """-> dict(params, ema, opt, step, opt_k, config) with NumPy arrays; CheckpointError if bad."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found: pass the checkpoint.npz of a run folder")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              "it may be truncated: use an earlier one or start a new run") from None
    for key in ("step", "opt_k", "config"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry: not a tinyuvit checkpoint")
    out = {"params": {}, "ema": {}, "opt": {}, "step": int(data["step"]), "opt_k": int(data["opt_k"])}
    try:
        out["config"] = json.loads(str(data["config"]))
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has a corrupt config entry") from None
    out["config"].setdefault("prediction", "eps")      # runs from before the v option were eps runs
    out["config"].setdefault("weighting", "min-snr")   # ... and before min-snr+1, Min-SNR runs
    for k, v in data.items():
        group, _, name = k.partition("/")
        if group in ("param", "ema", "opt"):
            out[{"param": "params"}.get(group, group)][name] = v
    return out


def config_differences(saved, current, ignore=()):
    """Names of fields (dotted for nested dicts) whose values differ, with (saved, current)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [(f"{key}.{k}", va, vb) for k, va, vb in config_differences(a, b)]
        elif a != b:
            diffs.append((key, a, b))
    return diffs
