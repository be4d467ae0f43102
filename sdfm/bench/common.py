"""Helpers shared by the ``sdfm bench`` workloads: list arguments and the machine description that
every benchmark prints beside its numbers."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def int_list(text: str) -> list[int]:
    """'1024,4096' -> [1024, 4096] (argparse type)."""
    return [int(v) for v in text.split(",") if v]


def name_list(text: str) -> list[str]:
    """'torch, keops' -> ['torch', 'keops'] (argparse type)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def machine_info() -> dict[str, str | int]:
    """Platform, CPU count, torch version/threads and the CUDA device (or 'none')."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def write_json(path: Path, machine: dict, args: argparse.Namespace, **results: Any) -> None:
    """Write a benchmark's machine, arguments and results to ``path`` (the --json option)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"json": str(path)}
    path.write_text(json.dumps({"machine": machine, "args": settings, **results}, indent=1))
    print(f"wrote {path}")
