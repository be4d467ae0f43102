import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))
os.environ.setdefault("SDFM_CACHE", str(ROOT / ".cache" / "sdfm"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch and one FAISS thread. Its problems are tiny: with 2 threads a
    busy neighbour process turns OpenMP's spin-waits into most of the time (measured: the
    semidiscrete suites take 5 s alone, 100 s beside one busy process)."""
    import faiss
    import torch

    before, before_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    faiss.omp_set_num_threads(before_faiss)
