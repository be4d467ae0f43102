"""How much memory a command may allocate, so that a size beyond the machine is refused with one line
that states what it would need, instead of ending in an allocation traceback (or the OOM killer)."""

from __future__ import annotations

import resource

from sdfm.errors import UserError

__all__ = ["available_bytes", "require_memory"]


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _address_space_used() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> int | None:
    """Bytes this process can still allocate: the machine's available memory, or what is left of an
    address-space limit (``ulimit -v``) when that is lower; None when neither can be read."""
    found = []
    if (avail := _meminfo("MemAvailable")) is not None:
        found.append(avail)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(max(0, soft - _address_space_used()))
    return min(found) if found else None


def require_memory(nbytes: float, what: str, fix: str) -> None:
    """Raise UserError when ``what`` needs more than the available memory (``available_bytes``)."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise UserError(f"{what} needs about {nbytes / 2**30:.3g} GiB of memory but {avail / 2**30:.3g} GiB are available; {fix}")
