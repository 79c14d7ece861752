"""Looking inside trained runs: the paper's Figs. 4, 5 and 6 as tested functions and plots.

Every plot of the notebooks in `notebooks/` and of `python -m stop_jax.figures` comes from here.
One module per figure, and one that reads runs; callers import the module they need:
  runs            `load_run` rebuilds a run's locked config from its `config.json` and reads its
                  checkpoint; `ensure_tiny_run` trains the offline tiny config for a few steps
                  when a notebook has no run.
  similarity      Fig. 5: stochastic positions m_j = A n_j + b + psi_j against every fixed
                  sin-cos position psi_k.
  heatmaps        Fig. 6: where the predictor's output at one masked patch points in the image.
  regularisation  Fig. 4: ||A||_F and ||b|| (the mask token m~) against sigma, from runs' metrics.
  figures         the three as PNG files from run directories (`python -m stop_jax.figures`),
                  and the figure builders the notebooks share with it.
"""
