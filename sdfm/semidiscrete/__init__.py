"""Semidiscrete optimal transport (SD-FM): matching noise to the whole dataset through a dual potential.

- ``MatchIndex``: exact argmax_j <x, y_j> + g_j (and top-k / softmax sampling) over all N points,
  with a potential that can be replaced in place (torch or FAISS backend, optional labels and PCA).
- ``PotentialFitter`` / ``fit_potential``: stochastic fitting of g (SGD + EMA, or POT's averaged SGD)
  with the unbiased χ̂² monitor; ``Chi2Evaluator`` scores any potential on fixed noise.
- ``save_potential`` / ``load_potential``: the versioned, fingerprinted safetensors file a worker
  publishes atomically and trainers read.
"""

from sdfm.semidiscrete.index import PCA, MatchIndex, TopK, class_partition, reference_argmax
from sdfm.semidiscrete.potential import (
    Chi2Evaluator,
    FitResult,
    Potential,
    PotentialFitter,
    fit_potential,
    load_potential,
    save_potential,
)

__all__ = [
    "MatchIndex",
    "PCA",
    "TopK",
    "class_partition",
    "reference_argmax",
    "Chi2Evaluator",
    "FitResult",
    "Potential",
    "PotentialFitter",
    "fit_potential",
    "load_potential",
    "save_potential",
]
