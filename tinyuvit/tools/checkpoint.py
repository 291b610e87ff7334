"""Checkpoints: one `.npz` (read with allow_pickle=False), written atomically, checked when read.

Keys: `param/<name>` weights, `ema/<name>` EMA weights, `opt/m.<name>` and `opt/v.<name>` AdamW
moments, `weak/<name>` the EMA weights early in the run (for autoguidance; once the run has passed
that step, and only in runs that keep them) with `weak_step`, the step they are from, `step`,
`opt_k`, and `config` (the run's configuration as a JSON string). The random
state is the run's seed plus the step: every step draws from a generator seeded by (seed, step),
so (config.seed, step) restores it exactly.

A run keeps one checkpoint, `checkpoint.npz` in its folder: each save replaces it whole, so a
crash during a save leaves the previous one. Whatever is wrong with a checkpoint that is read
(not an .npz, truncated, an edited config, a missing or misshapen array) is a one-line
CheckpointError naming the file, what is wrong, and what can be done.
"""
import dataclasses
import errno
import json
import os
import zipfile

import numpy as np

from ..backend import to_numpy
from ..config import TrainConfig, from_saved
from ..errors import CheckpointError
from ..model import UViT, UViTConfig
from .files import atomic_write

NAME = "checkpoint.npz"                 # a run folder's checkpoint
RESUME = ("params", "ema", "opt")       # what resuming needs; sampling needs ("ema",) or ("params",)
GROUPS = {"param": "params", "ema": "ema", "opt": "opt", "weak": "weak"}   # key prefix -> group
WHAT = {"params": "weights", "ema": "EMA weights", "opt": "AdamW moments",
        "weak": "early EMA weights (for autoguidance)"}
NEW_RUN = "start a new run with another --out"


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------

def save_checkpoint(path, *, params, ema, opt_state, opt_k, step, config, weak=None, weak_step=None):
    """Write everything needed to resume to `path`, via a temporary file and a rename.
    `weak`: the early EMA weights for autoguidance, once the run has them (else None), kept
    after step `weak_step`.

    A failed write (a full disk, a folder that cannot be written) is a CheckpointError that
    says which checkpoint survived: the previous file stays whole until the rename."""
    arrays = _arrays(params=params, ema=ema, opt_state=opt_state, opt_k=opt_k, step=step, config=config,
                     weak=weak, weak_step=weak_step)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        previous = checkpoint_step(path)
        kept = ("the previous checkpoint there is kept whole" +
                (f" (step {previous})" if previous is not None else "")
                if os.path.exists(path) else "no earlier checkpoint exists")
        raise CheckpointError(f"could not save checkpoint {path} at step {step}: {why}; {kept}. "
                              "Free some space (or choose a writable --out) and continue with "
                              "--resume") from None


def _arrays(*, params, ema, opt_state, opt_k, step, config, weak=None, weak_step=None):
    """{key: NumPy array} of a checkpoint file (the keys in this module's docstring)."""
    arrays = {f"param/{k}": to_numpy(v) for k, v in params.items()}
    arrays.update({f"ema/{k}": to_numpy(v) for k, v in ema.items()})
    arrays.update({f"opt/{k}": to_numpy(v) for k, v in opt_state.items()})
    arrays.update({f"weak/{k}": to_numpy(v) for k, v in (weak or {}).items()})
    if weak:
        if weak_step is None:
            raise ValueError("save_checkpoint: weak weights need their weak_step")
        arrays["weak_step"] = np.array(weak_step, dtype=np.int64)
    arrays["step"] = np.array(step, dtype=np.int64)
    arrays["opt_k"] = np.array(opt_k, dtype=np.int64)
    arrays["config"] = np.array(json.dumps(config, sort_keys=True))
    return arrays


def export_weights(path, out):
    """Write what sampling needs of the checkpoint at `path` (a file or a run folder) to `out`:
    the EMA weights, the early EMA weights for autoguidance where the run has them, the step and
    the config, without the raw weights and the AdamW moments (two fifths of the file with early
    weights, a quarter without). `load`, `sample` and `evaluate` read it as they read the
    checkpoint; training cannot resume from it.
    -> the checkpoint that was read (the dict of `load_checkpoint`)."""
    ck = load_checkpoint(path, need=("ema",))
    arrays = _arrays(params={}, ema=ck["ema"], opt_state={}, opt_k=ck["opt_k"], step=ck["step"],
                     config=ck["config"], weak=ck["weak"], weak_step=ck["weak_step"])
    try:
        atomic_write(out, lambda f: np.savez(f, **arrays))
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"could not write {out}: {why}; free some space or choose another path") from None
    return ck


def checkpoint_step(path):
    """The step stored in the checkpoint at `path`, or None if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            step = z["step"]
        return int(step) if step.shape == () and np.issubdtype(step.dtype, np.integer) else None
    except Exception:  # any unreadable file: there is no step to tell
        return None


# ----------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------

def load_checkpoint(path, need=RESUME):
    """-> dict(params, ema, opt, weak, weak_step, step, opt_k, config, path) with NumPy arrays.

    `path` may be a run folder (its checkpoint.npz is read). `need` names the groups of arrays
    that must be complete, with the names and shapes of the model in the config, and finite:
    RESUME (params, ema and opt) to continue training, ("ema",) or ("params",) to sample or
    evaluate. The weak weights are optional ({} where the run has none) and checked the same
    way where present. The config is checked in every case. CheckpointError, in one line, if
    anything is wrong.
    """
    path = resolve(path)
    data = _read_npz(path)
    for key in ("step", "opt_k", "config"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry: not a tinyuvit "
                                  "checkpoint (pass the checkpoint.npz of a train-mnist run)")
    out = {"path": path, "params": {}, "ema": {}, "opt": {}, "weak": {}, "weak_step": None,
           "step": _count(data, "step", path), "opt_k": _count(data, "opt_k", path),
           "config": _config(data["config"], path)}
    for k, v in data.items():
        group, _, name = k.partition("/")
        if group in GROUPS and name:
            out[GROUPS[group]][name] = v
    unknown = set(need) - set(WHAT)
    if unknown:
        raise ValueError(f"need: unknown groups {sorted(unknown)}; choose from {sorted(WHAT)}")
    if out["weak"]:
        if "weak_step" not in data:
            raise CheckpointError(f"checkpoint {path} has early EMA weights but no 'weak_step' entry: the "
                                  f"file was edited or damaged; {NEW_RUN}")
        out["weak_step"] = _count(data, "weak_step", path)
    if out["ema"] and not out["params"] and not out["opt"] and ({"params", "opt"} & set(need)):
        raise CheckpointError(f"checkpoint {path} holds only the EMA weights for sampling (written by "
                              f"`tinyuvit export`): sample or evaluate it with its EMA weights; to resume "
                              f"training or use the raw weights, pass the run's own {NAME}")
    check = list(need) + (["weak"] if out["weak"] and "weak" not in need else [])
    if check:
        expected = _model_shapes(out["config"]["model"])
        for group in check:
            _check_group(out[group], group, expected, path)
    return out


def resolve(path):
    """The checkpoint file for `path` (a file, or a run folder holding checkpoint.npz)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, path = path, os.path.join(path, NAME)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} not found: the folder {folder} holds no "
                                  f"{NAME} (has a run been saved there yet?)")
    elif not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found: pass the checkpoint.npz of a run folder")
    return path


def _read_npz(path):
    """{key: array} of the .npz at path; CheckpointError for anything that is not a whole one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was cut short; "
                              f"tinyuvit keeps one checkpoint per run, so {NEW_RUN}")
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):  # an .npz is a zip archive
        raise CheckpointError(f"{path} is not a tinyuvit checkpoint (an .npz file written by "
                              "train-mnist); pass a run folder or its checkpoint.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise CheckpointError(f"checkpoint {path} holds pickled (object) arrays, which "
                                  "tinyuvit never writes and does not load: not a tinyuvit "
                                  "checkpoint") from None
        problem = e
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        problem = e
    raise CheckpointError(f"checkpoint {path} is unreadable ({type(problem).__name__}: "
                          f"{str(problem).splitlines()[0] if str(problem) else 'corrupt'}): "
                          "truncated or corrupt (tinyuvit's own saves are never left half "
                          f"written, so it was copied or edited); restore a good copy or {NEW_RUN}")


def _count(data, key, path):
    """A non-negative integer stored as a 0-d array (step, opt_k)."""
    a = data[key]
    if a.shape != () or not np.issubdtype(a.dtype, np.integer) or int(a) < 0:
        raise CheckpointError(f"checkpoint {path}: '{key}' must be one integer >= 0, got "
                              f"{a.dtype} of shape {a.shape}" + (f" ({a.item()})" if a.size == 1 else "")
                              + f"; the file was edited or damaged: {NEW_RUN}")
    return int(a)


def _config(entry, path):
    """The run configuration from the 'config' entry, checked by building its configs."""
    bad = f"checkpoint {path} has an invalid config"
    fix = f"the file was edited or damaged: {NEW_RUN}"
    if entry.shape != () or entry.dtype.kind != "U":
        raise CheckpointError(f"{bad} (not a JSON string but {entry.dtype} of shape {entry.shape}); {fix}")
    try:
        config = json.loads(str(entry))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{bad} (corrupt JSON: {e}); {fix}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{bad} (a JSON {type(config).__name__}, not an object); {fix}")
    problem = config_problem(config)
    if problem:
        raise CheckpointError(f"{bad} ({problem}); {fix}")
    return from_saved(config)           # the fields added since it was saved: as it trained


def config_problem(config):
    """What is wrong with a run configuration dict (a phrase), or None: its `model` must build
    a UViTConfig, and its other fields that TrainConfig knows, with those added since it was
    saved filled in (`from_saved`), must pass TrainConfig.validate. Fields that TrainConfig
    does not know (records such as the data identity) are not checked."""
    model = config.get("model")
    if not isinstance(model, dict):
        return "no model configuration" if model is None else f"model is a {type(model).__name__}, not an object"
    try:
        UViTConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        return f"model: {e}"
    config = from_saved(config)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        TrainConfig(**{k: v for k, v in config.items() if k in known}).validate()   # NaN included
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _model_shapes(model_config):
    """{name: shape} of every parameter of the model that `model_config` describes."""
    return {name: tuple(a.shape) for name, a in UViT(UViTConfig.from_dict(model_config)).state_dict().items()}


def _check_group(arrays, group, shapes, path):
    """CheckpointError unless `arrays` holds exactly the model's parameters (for opt: an m. and
    a v. moment of each), with their shapes, as finite floats."""
    expected = ({f"{mv}.{k}": s for k, s in shapes.items() for mv in ("m", "v")}
                if group == "opt" else shapes)
    what = WHAT[group]
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} of the {len(expected)} {what} (e.g. "
            f"{', '.join(missing[:3])}) of the model in its config: the file is incomplete or "
            f"was edited; {NEW_RUN}")
    if extra:
        raise CheckpointError(
            f"checkpoint {path} has {what} that the model in its config does not have (e.g. "
            f"{', '.join(extra[:3])}): the file and its config do not match; {NEW_RUN}")
    for name, shape in expected.items():
        a = arrays[name]
        if tuple(a.shape) != shape:
            raise CheckpointError(f"checkpoint {path}: {what} {name} has shape {tuple(a.shape)}, "
                                  f"the model in its config needs {shape}; the file and its config "
                                  f"do not match: {NEW_RUN}")
        if not np.issubdtype(a.dtype, np.floating):
            raise CheckpointError(f"checkpoint {path}: {what} {name} is {a.dtype}, not floating "
                                  f"point; the file was edited or damaged: {NEW_RUN}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"checkpoint {path}: {what} {name} holds NaN or infinite values; "
                                  f"the run diverged before this save: {NEW_RUN} (e.g. with a "
                                  "lower --lr)")


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
