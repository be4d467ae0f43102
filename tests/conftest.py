import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(ROOT / ".cache" / "keops"))
os.environ.setdefault("SDFM_CACHE", str(ROOT / ".cache" / "sdfm"))
os.environ.setdefault("MPLBACKEND", "Agg")
