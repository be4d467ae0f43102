"""Semidiscrete optimal transport (SD-FM): matching noise to the whole dataset through a dual potential.

One module per concern:

- ``index``: ``MatchIndex``, exact argmax_j <x, y_j> + g_j (and top-k / softmax sampling) over all N
  points with a potential replaced in place; its search ``backends`` (torch, FAISS, Triton); ``pca``.
- ``problem``: the semi-dual problem, its stochastic gradient and the unbiased χ̂² monitor
  (``softmax``: the ε > 0 assignment).
- ``fitter``: ``PotentialFitter`` (SGD + EMA, or POT's averaged SGD) and ``FitterOptions``;
  ``coarse``: its coarse-to-fine start.
- ``fit``: ``fit_potential`` to a target χ̂² within a ``FitBudget``, ``Chi2Evaluator``, and the config
  glue (``fit_setup``, ``fit_and_save``).
- ``potential_file``: the versioned, fingerprinted safetensors file of a potential.
- ``velocity``: the exact velocity of the SD-OT flow. (The dual-potential worker process is ``sdfm.worker``.)
"""

from sdfm.semidiscrete.fit import Chi2Evaluator, FitBudget, FitResult, fit_and_save, fit_potential, fit_setup
from sdfm.semidiscrete.fitter import FitterOptions, PotentialFitter
from sdfm.semidiscrete.index import MatchIndex, TopK, class_partition, reference_argmax
from sdfm.semidiscrete.pca import PCA
from sdfm.semidiscrete.potential_file import Potential, load_potential, save_potential

__all__ = [
    "PCA",
    "Chi2Evaluator",
    "FitBudget",
    "FitResult",
    "FitterOptions",
    "MatchIndex",
    "Potential",
    "PotentialFitter",
    "TopK",
    "class_partition",
    "fit_and_save",
    "fit_potential",
    "fit_setup",
    "load_potential",
    "reference_argmax",
    "save_potential",
]
