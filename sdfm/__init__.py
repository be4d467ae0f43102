"""sdfm: flow matching with optimal-transport couplings, from one CPU process to GPU clusters.

The public API, for a training loop of your own (docs/library.md):

- couplings, each called as ``coupling(x0, x1, labels=None, *, generator=None) -> Pairs``:
  ``Independent``, ``ExactOT``, ``Sinkhorn``; ``GlobalBatch(coupling)`` couples the global batch of a
  ``torch.distributed`` job;
- ``SemidiscreteOT``: fit (or load) the dual potential of a whole dataset, then pair fresh noise with
  its points (``sd(x0)``, ``sd.loader(batch)``);
- ``FlowMatcher(coupling)``: ``sample_location_and_conditional_flow(x0, x1) -> (t, x_t, u_t)``;
- ``load_run`` and ``sample``: use a model trained by ``sdfm train``;
- ``Pairs``, ``Points`` (data stored compactly) and ``open_pack`` (a dataset packed by ``sdfm data pack``).

The names load on first use: ``import sdfm`` itself imports neither torch nor any optional package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Independent": ("sdfm.couplings.independent", "IndependentCoupling"),
    "ExactOT": ("sdfm.couplings.exact", "ExactOTCoupling"),
    "Sinkhorn": ("sdfm.couplings.sinkhorn", "Sinkhorn"),
    "SemidiscreteOT": ("sdfm.couplings.semidiscrete", "SemidiscreteOT"),
    "Pairs": ("sdfm.couplings.base", "Pairs"),
    "FlowMatcher": ("sdfm.methods.flow_matcher", "FlowMatcher"),
    "GlobalBatch": ("sdfm.distributed.global_batch", "GlobalBatch"),
    "load_run": ("sdfm.evaluate", "load_run"),
    "sample": ("sdfm.evaluate", "sample_model"),
    "Points": ("sdfm.data.points", "Points"),
    "open_pack": ("sdfm.data.pack", "open_pack"),
}
__all__ = [
    "ExactOT",
    "FlowMatcher",
    "GlobalBatch",
    "Independent",
    "Pairs",
    "Points",
    "SemidiscreteOT",
    "Sinkhorn",
    "load_run",
    "open_pack",
    "sample",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily below
    from sdfm.couplings.base import Pairs as Pairs
    from sdfm.couplings.exact import ExactOTCoupling as ExactOT
    from sdfm.couplings.independent import IndependentCoupling as Independent
    from sdfm.couplings.semidiscrete import SemidiscreteOT as SemidiscreteOT
    from sdfm.couplings.sinkhorn import Sinkhorn as Sinkhorn
    from sdfm.data.pack import open_pack as open_pack
    from sdfm.data.points import Points as Points
    from sdfm.distributed.global_batch import GlobalBatch as GlobalBatch
    from sdfm.evaluate import load_run as load_run
    from sdfm.evaluate import sample_model as sample
    from sdfm.methods.flow_matcher import FlowMatcher as FlowMatcher


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), so that ``import sdfm`` stays light."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdfm' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
