"""The tools around the model: what trains, scores, times and stores it, but is not U-ViT itself.

    cli          the `tinyuvit` command, a thin shell over the library calls below
    checkpoint   saving and loading runs (checkpoint.npz, exported weights)
    data, idx    MNIST: find, check, download or fall back to the embedded subset
    images       grids, GIFs and plots
    files        atomic writes, run-folder locks, output-path checks
    progress     the progress bar
    parallel     splitting a batch over CPU threads
    vit, metrics, evaluate   the ViT classifier, FID and pixel measures, `tinyuvit evaluate`
    bench, torch_uvit        timing against a PyTorch U-ViT with the same weights
    ablate       the paper's design study: budgets, models, runs, the statistics and verdicts
    ablate_run, ablate_report   running a study (resumable), and its results.md and figures
    explain      `tinyuvit explain`: attention maps, skip probes and the x0 path of a trained run
"""
