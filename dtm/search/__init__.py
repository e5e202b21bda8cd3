"""Searches over compressions guided by the Divergent Token Metrics.

`prune_rounds`: the paper's FDT-guided iterative magnitude pruning (Deiseroth et al. 2023,
arXiv 2311.01544): rounds of probe -> choose the k increments with the best FDT_α ->
prune -> continued training -> held-out evaluation, resumable after a kill.
`plots`: the heatmap of per-component sparsity and the held-out curves of a run.
"""
