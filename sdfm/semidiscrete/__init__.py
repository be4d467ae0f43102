"""Semidiscrete optimal transport (SD-FM): matching noise to the whole dataset through a dual potential.

One module per concern:

- ``index``: ``MatchIndex``, exact argmax_j <x, y_j> + g_j (and top-k / softmax sampling) over all N
  points with a potential replaced in place; its search ``backends`` (torch, FAISS, Triton); ``pca``.
- ``problem``: the semi-dual problem, its stochastic gradient and the unbiased χ̂² monitor
  (``softmax``: the ε > 0 assignment).
- ``fitter``: ``PotentialFitter`` and ``FitterOptions``; ``methods``: one object per fitting method
  (step and ε schedules, averaging, the potential); ``start``: where a fit starts (``coarse``: the
  coarse-to-fine start).
- ``fit``: ``fit_potential``, the loop to a target χ̂² within a ``FitBudget``; ``chi2``: the χ̂²
  yardstick (``Chi2Evaluator``) and the samples that can confirm a target; ``configured``: the config
  glue (``fit_setup``, ``fit_and_save``).
- ``potential_file``: the versioned, fingerprinted safetensors file of a potential.
- ``velocity``: the exact velocity of the SD-OT flow. (The dual-potential worker process is ``sdfm.worker``.)
"""

from sdfm.semidiscrete.chi2 import Chi2Evaluator
from sdfm.semidiscrete.configured import fit_and_save, fit_setup
from sdfm.semidiscrete.fit import FitBudget, FitResult, fit_potential
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
