"""The report of an ablation study (tinyuvit.tools.ablate): results.md and the figures, redrawn
from study.json and the run folders.

    from tinyuvit.tools.ablate_report import write_report
    write_report("runs/ablate-quick")          # after a study, or while one runs elsewhere

results.md: the paper's claims with tinyuvit's paired difference, 95% interval, Holm-adjusted
p-value and verdict; every model against U-ViT; the sampling noise; the pilot's spreads (when the
pilot ran in the folder); every run's scores; how the recipe differs from the paper's.
differences.png: the paired mean difference to U-ViT with its 95% interval, one panel for class
accuracy and one for FID. pilot.png: the pilot's scores, seed by seed and rescored. loss.png,
learning.png (when the budget drew learning curves) and grids.png: every model's training loss,
curves and samples.
"""
import os

import numpy as np

from ..model import CHOICES
from .ablate import (ALPHA, MOST_SEEDS, PILOT_FEWER, SWEEP, TARGET, budget_name, claim_verdicts, comparisons,
                     pilot_arm, pilot_spreads, read_entries, sampling_noise, saved_study, study_models, study_size)
from .files import atomic_write

REPORT = ("results.md", "differences.png", "pilot.png", "loss.png", "learning.png", "grids.png")
SMOOTH = 50          # loss.png: running mean over this many steps
MINUS = "\u2212"


def report_files(out_dir):
    """The report's files that exist in `out_dir`."""
    return [os.path.join(out_dir, name) for name in REPORT if os.path.exists(os.path.join(out_dir, name))]


def write_report(out_dir, budget=None, runs=None):
    """(Re)write results.md and the figures from the run folders of the study in `out_dir`
    (default: the budget and runs that its study.json records)."""
    if budget is None or runs is None:
        budget, runs = saved_study(out_dir)
    entries = read_entries(out_dir, runs)
    atomic_write(os.path.join(out_dir, "results.md"), lambda f: f.write(results_markdown(budget, entries).encode()))
    done = [e for e in entries if e.result]
    if not done:
        return
    import matplotlib
    matplotlib.use("Agg")
    table = comparisons(budget, entries)
    if table:
        plot_differences(os.path.join(out_dir, "differences.png"), budget, entries, table)
    if any(e.run.variant == pilot_arm(budget).name for e in done):
        plot_pilot(os.path.join(out_dir, "pilot.png"), budget, entries)
    plot_loss(os.path.join(out_dir, "loss.png"), budget, done)
    if any(e.evals for e in done):
        plot_learning(os.path.join(out_dir, "learning.png"), budget, done)
    save_grids(os.path.join(out_dir, "grids.png"), budget, done)


# ----------------------------------------------------------------------------------------
# results.md
# ----------------------------------------------------------------------------------------

def results_markdown(budget, entries):
    """The whole results.md: the setting, then each section that the finished runs allow."""
    table = comparisons(budget, entries)
    lines = _header(budget, entries)
    if table:
        lines += _claims_section(budget, entries, table) + _models_section(budget, entries, table)
    lines += _sampling_section(budget, entries) + _pilot_section(budget, entries)
    lines += _runs_section(budget, entries) + _recipe_section(budget, entries)
    return "\n".join(lines) + "\n"


def _num(x, fmt=".2f"):
    """A number with a real minus sign ("−1.20")."""
    return f"{x:{fmt}}".replace("-", MINUS)


def _diff(s, fmt=".2f"):
    """ "−1.20 [−3.10, 0.70]": a paired mean difference and its 95% interval."""
    if s["mean"] is None:
        return "—"
    if s["lo"] is None:
        return f"{_num(s['mean'], '+' + fmt)} (one seed)"
    return f"{_num(s['mean'], '+' + fmt)} [{_num(s['lo'], fmt)}, {_num(s['hi'], fmt)}]"


def _p(s):
    return "—" if s.get("p_holm") is None else f"{s['p_holm']:.2g}"


def _seed_list(seeds):
    """ "0, 1, 2", or "0–5" for a longer run of seeds."""
    seeds = sorted(seeds)
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _seeds_by_model(budget, entries):
    """{seeds: [model names]} of the study's models (not the pilot's other arm), in study order."""
    per = {}
    for e in entries:
        per.setdefault(e.run.variant, []).append(e.run.seed)
    groups = {}
    for m in study_models(budget):
        if m.name in per:
            groups.setdefault(tuple(sorted(per[m.name])), []).append(m.name)
    return groups


def _seed_count(budget, entries):
    """ "3", or "3–6" when models have run different numbers of seeds (a study extended by --seeds)."""
    counts = sorted({len(s) for s in _seeds_by_model(budget, entries)}) or [len(budget.seeds)]
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _seeds_text(budget, entries):
    """Which seeds the models trained with: "every model trains with each of the seeds 0, 1, 2",
    and the models that ran other seeds, if any."""
    groups = _seeds_by_model(budget, entries)
    if len(groups) <= 1:
        return f"every model trains with each of the seeds {_seed_list(next(iter(groups), budget.seeds))}"
    common = max(groups, key=lambda k: len(groups[k]))
    label = lambda n: "U-ViT" if n == "uvit" else n
    others = "; ".join(f"{', '.join(map(label, names))} with {_seed_list(seeds)}"
                       for seeds, names in groups.items() if seeds != common)
    return f"every model trains with each of the seeds {_seed_list(common)}, but {others}"


def _header(budget, entries):
    b, name = budget, budget_name(budget)
    n = 10 * b.final_per_digit
    done = sum(e.ok for e in entries)
    return [
        "# U-ViT's design study on MNIST", "",
        f"Budget{f' `{name}`' if name else ''}: {b.describe()}; {_seeds_text(b, entries)}. A seed fixes the data order, the noise and every layer's starting weights by its name, so a "
        "variant with seed s starts from U-ViT seed s's weights wherever the two share a layer; each model is "
        "compared with U-ViT of the same seed (paired).",
        f"Scores: EMA weights, {b.final_per_digit} samples per digit (n = {n:,}), {b.sampler} {b.sample_steps} "
        f"steps, guidance {b.guidance:g}, sampling seed {b.score_seed}; class accuracy by tinyuvit's MNIST "
        "classifier, FID on its features against the MNIST test digits (not Inception features: compare only "
        "with other numbers from tinyuvit).",
        f"{done} of {len(entries)} runs finished with scores.", ""]


def _claims_section(budget, entries, table):
    """One row per claim of the paper: its words, tinyuvit's a − b, the verdict."""
    rows = claim_verdicts(budget, entries, table)
    if not rows:
        return []
    m = next(iter(table.values()))["fid"]["m"]
    tested = sum(s["fid"]["p"] is not None for s in table.values())
    family = f"the study's {m} comparisons" + (f", {m - tested} of them not run yet and counted as p = 1"
                                              if tested < m else "")
    lines = ["## The paper's claims", "",
             "The paper's setting: CIFAR-10, unconditional, U-ViT-S/2, FID of 10K samples, one run per variant. "
             "tinyuvit's: the budget above (how its recipe differs: the last section). Each claim is a paired "
             f"comparison of two models, a − b over the seeds; the verdict is on FID, the paper's measure "
             f"(below 0: a is better), with Holm's correction over {family} (one family per "
             "measure). Class accuracy (above 0: a is better) is shown beside it, with its own Holm-adjusted p.", "",
             "| § | the paper finds | tinyuvit: a vs b | FID a − b [95% CI] | Holm p | accuracy a − b [95% CI] "
             "| Holm p | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r["claim"]
        knob = next((n.partition("=")[0] for n in (c.a, c.b) if n.partition("=")[0] in SWEEP), None)
        lines.append(f"| {c.section} | {c.words} | {_name(c.a, budget, knob)} vs {_name(c.b, budget, knob)} | "
                     f"{_diff(r['fid'])} | {_p(r['fid'])} | {_diff(r['accuracy'], '.1f')} | {_p(r['accuracy'])} | "
                     f"**{r['word']}** ({r['why']}) |")
    lines += ["", f"*Agrees* or *disagrees* only where the FID difference survives Holm's correction at "
              f"{ALPHA:g} (for \"adds nothing\" claims, also where the Bonferroni-widened interval rules out an "
              f"improvement of {TARGET['fid']:g} FID or more); everything else is *unresolved at this budget*, "
              f"with the seeds that would give 80% power to find a difference as large as the one measured "
              f"(at least {TARGET['fid']:g} FID) at level {ALPHA:g}/{m}, from the measured spread of the paired "
              "differences: a rough figure, since that spread is itself measured on few seeds.", ""]
    return lines


def _models_section(budget, entries, table):
    """Every model's mean scores and its paired difference to U-ViT."""
    lines = ["## Every model against U-ViT", "",
             "Model − U-ViT of the same seed, mean over the seeds [95% t-interval], and the Holm-adjusted p of "
             "no difference (over every comparison of the study, one family per measure).", "",
             "| model | parameters | class accuracy (%) | Δ accuracy [95% CI] | Holm p | FID | Δ FID [95% CI] | "
             "Holm p | train time (min/run) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in study_models(budget):
        runs = [e for e in entries if e.run.variant == m.name]
        if not any(e.result for e in runs):
            continue
        ok = [e for e in runs if e.ok]
        params = next((e.result["params"] for e in runs if e.result.get("params")), None)
        minutes = np.mean([e.result["train_seconds"] for e in runs if e.result]) / 60
        acc, fid = _mean_sd(ok, "accuracy", ".1f"), _mean_sd(ok, "fid", ".2f")
        diverged = sum(bool(e.result) and not e.ok for e in runs)
        note = f" ({diverged} diverged)" if diverged else ""
        if m.name == "uvit":
            lines.append(f"| **U-ViT**{note} | {params:,} | {acc} | | | {fid} | | | {minutes:.1f} |")
            continue
        s = table.get((m.name, "uvit"))
        a, f = (s["accuracy"], s["fid"]) if s else (None, None)
        cells = [_diff(a, ".1f"), _p(a), _diff(f), _p(f)] if s else ["—"] * 4
        lines.append(f"| {_name(m.name, budget)}{note} | {f'{params:,}' if params else ''} | {acc} | {cells[0]} | "
                     f"{cells[1]} | {fid} | {cells[2]} | {cells[3]} | {minutes:.1f} |")
    return lines + [""]


def _mean_sd(entries, metric, fmt):
    """ "86.0 ± 3.2 (3)": mean ± sd over the runs (their count), or one value."""
    v = [e.score(metric) for e in entries]
    if not v:
        return "—"
    if len(v) == 1:
        return f"{v[0]:{fmt}} (1)"
    return f"{np.mean(v):{fmt}} ± {np.std(v, ddof=1):{fmt}} ({len(v)})"


def _sampling_section(budget, entries):
    """How much of U-ViT's seed spread its sampling noise explains."""
    noise = sampling_noise(entries, "uvit", budget.final_per_digit, budget.score_seed)
    if noise is None:
        return []
    n = 10 * budget.final_per_digit
    parts = [f"{'class accuracy' if k == 'accuracy' else 'FID'}: sampling sd {v['sampling_sd']:.2f} against a "
             f"seed sd of {v['seed_sd']:.2f} ({_share(v)} of the seed variance)" for k, v in noise.items()]
    return ["## Sampling noise", "",
            f"U-ViT's {noise['fid']['runs']} runs were scored again with sampling seed {budget.score_seed + 1} "
            f"(n = {n:,} each). Half the mean square of the two scores' difference is the sampling variance of one "
            f"score: {parts[0]}; {parts[1]}. Every run is scored with the same sampling seed, so this noise is "
            "partly shared by the models it compares.", ""]


def _share(v):
    return "—" if v["share"] is None else f"{100 * v['share']:.0f}%"


def _pilot_section(budget, entries):
    """The pilot: U-ViT's spread with and without the levers."""
    if not any(e.run.variant == pilot_arm(budget).name for e in entries):
        return []
    rows = pilot_spreads(budget, entries)
    m = study_size(budget)
    fewer = min(PILOT_FEWER, budget.final_per_digit)
    counts = " and ".join(str(n) for n in dict.fromkeys([budget.final_per_digit, fewer]))
    lines = ["## Pilot: U-ViT's seed spread with and without the levers", "",
             f"U-ViT trained with each seed and each start of the final 3x3 conv, every run scored at {counts} "
             f"samples per digit, each with sampling seeds {budget.score_seed} and {budget.score_seed + 1}. Spread: "
             f"the sd over the training seeds (sampling seed {budget.score_seed}); sampling sd: from the two "
             "sampling seeds. (Learning curves, the third lever, change no weight: they only cost time.) "
             "Seeds needed: for 80% power to find "
             f"{TARGET['accuracy']:g} accuracy points or {TARGET['fid']:g} FID at level {ALPHA:g}/{m} (the whole "
             "study's comparisons), if paired differences spread √2 × the seed sd (independent runs; pairing can "
             "only narrow it).", "",
             "| final conv starts as | n | class accuracy by seed (%) | mean ± sd | sampling sd | FID by seed | "
             "mean ± sd | sampling sd | seeds needed (acc / FID) |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        noise = r["noise"] or {}
        sd = lambda k, f: f" ± {r[k]['sd']:{f}}" if r[k]["sd"] is not None else ""
        cell = lambda k, f: (", ".join(f"{v:{f}}" for _, v in sorted(r[k]["values"].items())),
                             f"{r[k]['mean']:{f}}{sd(k, f)}",
                             f"{noise[k]['sampling_sd']:{f}} ({_share(noise[k])})" if k in noise else "—")
        need = lambda k: "—" if r[k]["sd"] is None else (str(r["needed"][k]) if r["needed"][k] else f">{MOST_SEEDS}")
        arm = f"{r['conv_init']}{' (the budget)' if r['model'] == 'uvit' else ''}"
        lines.append(f"| {arm} | {10 * r['per_digit']:,} | {' | '.join(cell('accuracy', '.1f'))} | "
                     f"{' | '.join(cell('fid', '.2f'))} | {need('accuracy')} / {need('fid')} |")
    return lines + ["", "(sampling sd: in brackets its share of the seed variance.)", ""]


def _runs_section(budget, entries):
    """Every run's own score and training time."""
    lines = ["## Every run", "",
             f"| run | parameters | class accuracy (%) | FID | FID floor (n = {10 * budget.final_per_digit:,}) | "
             "other scores (n, sampling seed: accuracy, FID) | train time (min) |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for e in entries:
        r = e.result
        if not r:
            lines.append(f"| {e.run.label} | | not run yet | | | | |")
            continue
        minutes, params = f"{r['train_seconds'] / 60:.1f}", f"{r['params']:,}" if r.get("params") else ""
        if not e.ok:
            lines.append(f"| {e.run.label} | {params} | **diverged** | **diverged** | | | {minutes} |")
            continue
        others = "; ".join(f"{s['n']:,}, {s['seed']}: {100 * s['class_accuracy']:.1f}, {s['fid']:.2f}"
                           for s in r.get("scores", [])[1:])
        lines.append(f"| {e.run.label} | {params} | {e.score('accuracy'):.1f} | {e.score('fid'):.2f} | "
                     f"{r['fid_floor_same_n']:.2f} | {others} | {minutes} |")
    diverged = [e for e in entries if e.result and not e.ok]
    if diverged:
        lines += ["", "Diverged:"] + [f"- {e.run.label}: {e.result.get('message')}" for e in diverged]
    return lines + [""]


def _recipe_section(budget, entries):
    """How the budget's recipe (its TrainConfig, read here) differs from the paper's CIFAR-10 one."""
    c = budget.train_config(budget.seeds[0])
    mc = c.model_config()
    epochs = c.steps * c.batch_size / 60_000
    p = mc.patch_size
    return ["## How this recipe differs from the paper's", "",
            "| | the paper's study (CIFAR-10, U-ViT-S/2) | this study |", "|---|---|---|",
            "| data | CIFAR-10, 32×32×3, unconditional | MNIST, 28×28×1, class-conditional "
            f"(labels dropped with p = {c.p_uncond:g} for guidance) |",
            f"| network | 13 blocks, width 512, 8 heads, patch 2 (256 tokens) | {mc.num_blocks} blocks, width "
            f"{mc.dim}, {mc.num_heads} heads, patch {p} ({mc.num_patches} tokens) |",
            f"| prediction and loss | the noise ε, plain MSE | {c.prediction}, weighted {c.weighting} capped at "
            f"γ = {c.snr_gamma:g} |",
            f"| noise schedule | continuous VP-SDE, linear β(t) | discrete, {c.noise_schedule} betas, T = {c.T} |",
            f"| optimiser | AdamW 2e-4, weight decay 0.03, betas (0.99, 0.999), warmup then constant, no clipping "
            f"| AdamW {c.lr:g}, weight decay {c.weight_decay:g}, betas ({c.beta1:g}, {c.beta2:g}), {c.warmup} "
            f"warmup steps then {c.lr_schedule}, gradient clipped at norm {c.grad_clip:g} |",
            f"| training | 500K steps of 128 (about 1,280 epochs) | {c.steps:,} steps of {c.batch_size} (about "
            f"{epochs:.1f} epochs) |",
            f"| EMA | 0.9999 | {c.ema_decay:g}{' with warmup' if c.ema_warmup else ''} |",
            f"| final 3×3 conv starts as | PyTorch's uniform init | {c.conv_init} (where the model has it) |",
            f"| sampling | Euler–Maruyama, 1,000 steps, no guidance | {c.sampler} {c.sample_steps} steps, "
            f"guidance {c.guidance:g} |",
            f"| score | FID of 10K samples, Inception features, every 50K steps | class accuracy and FID of "
            f"{10 * budget.final_per_digit:,} samples on an MNIST classifier's features, at the end |",
            f"| runs | one per variant | {_seed_count(budget, entries)} seeds per model, paired |", ""]


def _name(model, budget, knob=None):
    """A model's name with what the sweep makes of it: "depth=4 (5 blocks)", and U-ViT's own value
    of the sweep knob `knob` beside it: "U-ViT (7 blocks)"."""
    base = budget.base_model()
    tokens = lambda p: (base.img_size // p) ** 2
    if model == "uvit":
        return "U-ViT" + {"depth": f" ({base.num_blocks} blocks)", "width": f" (width {base.dim})",
                          "patch_size": f" (patch {base.patch_size}, {tokens(base.patch_size)} tokens)"}.get(knob, "")
    name, _, value = model.partition("=")
    if name == "depth":
        return f"{model} ({2 * (int(value) // 2) + 1} blocks)"
    if name == "patch_size":
        return f"{model} ({tokens(int(value))} tokens)"
    return model


# ----------------------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------------------

def _groups(budget, entries):
    """[(group, [model names])] in study order: each choice and sweep knob with results (the
    pilot's other arm too)."""
    have = {e.run.variant for e in entries if e.result}
    models = study_models(budget)[1:] + [pilot_arm(budget)]
    order = list(CHOICES) + list(SWEEP) + ["conv_init"]
    return [(g, [m.name for m in models if m.choice == g and m.name in have]) for g in order
            if any(m.choice == g and m.name in have for m in models)]


def _save(fig, path):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def plot_differences(path, budget, entries, table):
    """Two panels, class accuracy and FID: each model's paired mean difference to U-ViT (a bar),
    its 95% t-interval (whiskers) and each seed's difference (dots), grouped by choice; * where
    Holm's adjusted p < ALPHA. A bar far beyond the rest is cut at the panel's edge, its value written."""
    import matplotlib.pyplot as plt
    groups = [(g, [n for n in names if (n, "uvit") in table]) for g, names in _groups(budget, entries)]
    groups = [(g, names) for g, names in groups if names]
    xs, names, centers, x = [], [], [], 0.0
    for g, group in groups:
        centers.append((g, x + (len(group) - 1) / 2))
        for n in group:
            xs.append(x)
            names.append(n)
            x += 1
        x += 0.6
    colors = {g: f"C{i}" for i, (g, _) in enumerate(groups)}
    group_of = {n: g for g, group in groups for n in group}
    fig, axes = plt.subplots(2, 1, figsize=(max(7.5, 0.62 * len(xs) + 2.5), 8.5), dpi=110, sharex=True,
                             layout="constrained")
    m = next(iter(table.values()))["fid"]["m"]
    for ax, metric, title in ((axes[0], "accuracy", "class accuracy: model − U-ViT (points; above 0: better)"),
                              (axes[1], "fid", "FID: model − U-ViT (below 0: better)")):
        stats = [table[(n, "uvit")][metric] for n in names]
        limits = _clip_limits(stats)
        ax.axhline(0, color="k", lw=0.8)
        for xi, n, s in zip(xs, names, stats):
            _difference_bar(ax, xi, s, colors[group_of[n]], limits, metric)
        ax.set_ylim(*limits)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels([n.partition("=")[2] for n in names], fontsize=8, rotation=30, ha="right")
    axes[1].set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    for g, center in centers:       # the choice's name under its group of bars
        axes[1].annotate(g, (center, 0), xycoords=("data", "axes fraction"), xytext=(0, -40),
                         textcoords="offset points", ha="center", va="top", fontsize=9, fontweight="bold",
                         color=colors[g])
    fig.suptitle(f"U-ViT's design study on MNIST: {budget.describe()}, {_seed_count(budget, entries)} paired seeds\n"
                 "bar: mean of model − U-ViT of the same seed; whiskers: its 95% t-interval; dots: the seeds\n"
                 f"*: Holm-adjusted p < {ALPHA:g} over the study's {m} comparisons; a bar cut at the edge is "
                 "labelled with its value", fontsize=9)
    _save(fig, path)


def _clip_limits(stats):
    """(bottom, top) of a panel: every whisker and dot, except that a side where one model lies
    far beyond the others (3 times the next) is cut at 2.5 times the next."""
    def reach(sign):
        ends = lambda s: [v for v in (s["lo"], s["hi"]) if v is not None] + s["diffs"]
        far = sorted(max([0.0] + [sign * v for v in ends(s)]) for s in stats if s["diffs"])
        if len(far) > 2 and far[-1] > 3 * far[-2]:
            return 2.5 * far[-2]
        return far[-1] if far else 0.0
    down, up = reach(-1), reach(1)
    pad = 0.15 * max(down, up, 1e-6)     # room for the labels, also on a side with nothing
    return -(down + pad), up + pad


def _difference_bar(ax, x, s, color, limits, metric):
    """One model's bar, whiskers, seed dots and * (cut at the panel's edge, its value written)."""
    if s["mean"] is None:
        return
    bottom, top = limits
    clip = lambda v: max(bottom, min(top, v))
    ax.bar(x, clip(s["mean"]), width=0.65, color=color, alpha=0.75, zorder=2)
    if s["lo"] is not None:
        ax.plot([x, x], [clip(s["lo"]), clip(s["hi"])], color="k", lw=1.2, zorder=3)
        for v in (s["lo"], s["hi"]):
            if bottom < v < top:
                ax.plot([x - 0.13, x + 0.13], [v, v], color="k", lw=1.2, zorder=3)
    ax.scatter([x] * len(s["diffs"]), [clip(d) for d in s["diffs"]], s=12, color="white", edgecolor="k",
               zorder=4, lw=0.8)
    fmt = ".1f" if metric == "accuracy" else ".2f"
    star = "*" if s.get("p_holm") is not None and s["p_holm"] < ALPHA else ""
    if not bottom < s["mean"] < top:     # cut: the value inside the edge
        up = s["mean"] > 0
        ax.annotate(_num(s["mean"], fmt) + star + (" ↑" if up else " ↓"), (x, top if up else bottom),
                    xytext=(0, -4 if up else 4), textcoords="offset points", ha="center",
                    va="top" if up else "bottom", fontsize=7, fontweight="bold",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8), zorder=5)
        return
    up = s["mean"] >= 0
    ends = [s["mean"]] + s["diffs"] + [v for v in (s["lo"], s["hi"]) if v is not None]
    end = max(ends) if up else min(ends)
    ax.annotate(_num(s["mean"], fmt) + star, (x, clip(end)), xytext=(0, 3 if up else -3),
                textcoords="offset points", ha="center", va="bottom" if up else "top", fontsize=7)


def plot_pilot(path, budget, entries):
    """Two panels, class accuracy and FID: for each start of the final conv and each sample count,
    every training seed's score (filled) and its rescore with the next sampling seed (hollow,
    joined to it), with the mean ± sd over the training seeds."""
    import matplotlib.pyplot as plt
    from .ablate import by_seed
    rows = pilot_spreads(budget, entries)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(rows) + 3), 4.6), dpi=110)
    for ax, metric, title in ((axes[0], "accuracy", "class accuracy (%)"), (axes[1], "fid", "FID")):
        for x, r in enumerate(rows):
            first = r[metric]["values"]
            again = by_seed(entries, r["model"], metric, r["per_digit"], budget.score_seed + 1)
            for i, (seed, v) in enumerate(sorted(first.items())):
                color = f"C{i}"
                ax.scatter([x - 0.1], [v], color=color, s=22, zorder=3, label=f"seed {seed}" if x == 0 else None)
                if seed in again:
                    ax.plot([x - 0.1, x + 0.1], [v, again[seed]], color=color, lw=0.8, zorder=2)
                    ax.scatter([x + 0.1], [again[seed]], facecolor="white", edgecolor=color, s=22, zorder=3)
            if r[metric]["sd"] is not None:
                ax.errorbar([x + 0.3], [r[metric]["mean"]], yerr=[r[metric]["sd"]], fmt="_", color="k", ms=10,
                            capsize=3, label="mean ± sd over the seeds" if x == 0 else None)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"conv starts as\n{r['conv_init']}{' (budget)' if r['model'] == 'uvit' else ''}"
                            f"\nn = {10 * r['per_digit']:,}" for r in rows],
                           fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"pilot: U-ViT, {budget.describe()}\nfilled: sampling seed {budget.score_seed}; hollow: the "
                 f"same run rescored with sampling seed {budget.score_seed + 1}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    _save(fig, path)


def _smooth(rows, k=SMOOTH):
    """(steps, running mean of the loss over k steps)."""
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows], dtype=float)
    k = max(1, min(k, len(loss) // 5))
    return steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid")


def _panels(n, ncols):
    """A figure with n panels in rows of `ncols`, the unused ones hidden."""
    import matplotlib.pyplot as plt
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _model_lines(ax, entries, model, color, x_y, label, **style):
    """Every seed of one model as a thin line in one colour, labelled once."""
    for i, e in enumerate(e for e in entries if e.run.variant == model):
        xs, ys = x_y(e)
        if len(xs):
            ax.plot(xs, ys, color=color, lw=1.0, alpha=0.85, label=label if i == 0 else None, **style)


def plot_loss(path, budget, entries):
    """The smoothed training loss: one panel per choice, U-ViT's seeds (black) against the
    variants' (one colour per variant)."""
    from .images import plain_log_ticks
    groups = _groups(budget, entries) or [("U-ViT", [])]
    fig, axes = _panels(len(groups), min(3, len(groups)))
    curve = lambda e: _smooth(e.rows) if e.rows else ([], [])
    for ax, (g, names) in zip(axes, groups):
        _model_lines(ax, entries, "uvit", "k", curve, "U-ViT")
        for i, n in enumerate(names):
            diverged = any(e.result and not e.ok for e in entries if e.run.variant == n)
            _model_lines(ax, entries, n, f"C{i}", curve, n + (" (diverged)" if diverged else ""))
        tails = [curve(e)[1] for e in entries if (e.run.variant == "uvit" or e.run.variant in names) and e.rows]
        ax.set_yscale("log")
        plain_log_ticks(ax)
        _zoom_on_tail(ax, tails)
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"training loss, running mean of {SMOOTH} steps, every seed\n{budget.describe()}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    _save(fig, path)


def _zoom_on_tail(ax, curves):
    """y limits that show the curves after their first fifth (the start is far above the rest)."""
    tails = [y[len(y) // 5:] for y in curves if len(y)]
    tails = [t[np.isfinite(t)] for t in tails if len(t)]
    tails = [t for t in tails if len(t)]
    if tails:
        lo, hi = min(t.min() for t in tails), max(t.max() for t in tails)
        if lo > 0 and hi > lo:
            ax.set_ylim(lo / 1.05, hi * 1.1)


def plot_learning(path, budget, entries):
    """Class accuracy and FID during training (evals.jsonl), one row of two panels per choice."""
    import matplotlib.pyplot as plt

    from .images import plain_log_ticks
    groups = _groups(budget, entries) or [("U-ViT", [])]
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.9 * len(groups) + 0.6), dpi=100, squeeze=False)
    series = lambda key: lambda e: ([r["step"] for r in e.evals],
                                    [(100 * r[key] if key == "class_accuracy" else r[key]) for r in e.evals])
    for row, (g, names) in zip(axes, groups):
        for ax, key, what in ((row[0], "class_accuracy", "class accuracy (%)"), (row[1], "fid", "FID")):
            _model_lines(ax, entries, "uvit", "k", series(key), "U-ViT", marker="o", ms=2)
            for i, n in enumerate(names):
                _model_lines(ax, entries, n, f"C{i}", series(key), n, marker="o", ms=2)
            if key == "fid":
                ax.set_yscale("log")
                plain_log_ticks(ax)
            ax.set_title(f"{g}: {what}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        row[0].legend(fontsize=7)            # the FID panel beside it has the same lines
    for ax in axes[-1]:
        ax.set_xlabel("step")
    n = 10 * budget.eval_per_digit
    fig.suptitle(f"during training: EMA samples, n = {n:,} per point (FID is higher at smaller n: compare "
                 "curves with each other, not with the final table)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    _save(fig, path)


def save_grids(path, budget, entries, tile=240, caption=40, pad=8):
    """Every model's final samples.png from its first seed (U-ViT: every seed, first row), one
    row per choice, each under its name and scores. A diverged run is a grey tile saying so."""
    from PIL import Image, ImageDraw
    first = budget.seeds[0]
    rows = [[e for e in entries if e.run.variant == "uvit"]]
    rows += [[e for n in names for e in entries if e.run.variant == n and e.run.seed == first]
             for _, names in _groups(budget, entries)]
    rows = [r for r in rows if r]
    ncols = max(len(r) for r in rows)
    packed = rows[:1]
    for r in rows[1:]:             # choices share a row while they fit (time_cond and conv, ...)
        if len(packed) > 1 and len(packed[-1]) + len(r) <= ncols:
            packed[-1] = packed[-1] + r
        else:
            packed.append(r)
    rows = packed
    W, H = pad + ncols * (tile + pad), pad + len(rows) * (caption + tile + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(12)
    for i, row in enumerate(rows):
        for j, e in enumerate(row):
            x, y = pad + j * (tile + pad), pad + i * (caption + tile + pad)
            draw.text((x, y), e.run.label, fill="black", font=big)
            if e.ok:
                draw.text((x, y + 20), f"accuracy {e.score('accuracy'):.1f}%, FID {e.score('fid'):.2f}",
                          fill="dimgray", font=small)
            grid = os.path.join(e.folder, "samples.png")
            if os.path.exists(grid) and e.ok:
                with Image.open(grid) as im:
                    canvas.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.BOX), (x, y + caption))
            else:
                draw.rectangle((x, y + caption, x + tile - 1, y + caption + tile - 1), fill=(200, 200, 200))
                draw.text((x + tile // 2, y + caption + tile // 2), "diverged" if not e.ok else "no grid",
                          fill="red", font=big, anchor="mm")
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):   # Pillow < 10.1, or no FreeType: the small bitmap font
        return ImageFont.load_default()
