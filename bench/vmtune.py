"""Keep a virtual machine's memory backed while benchmarking (free page reporting).

On the VMs this was measured on, the guest kernel reports freed memory to the hypervisor at
once (`/sys/module/page_reporting/parameters/min_free_ms` = 0), and touching such a page
again costs a host page fault. Writing 1 GiB into the page cache then took 0.4 s or 2.8 s
depending on whether the pages had been freed recently, so whichever tool ran after a big
deletion looked several times slower (big stage: datamover 4.2 s and `tar -x` 3.1 s, against
2.9 s and 1.2 s with reporting held off; s5cmd 1.1 s either way). `settled_memory` holds
reporting off for the run (as root, where the knob exists), touches `prefault` bytes once so
the guest's free memory is backed, and restores the setting afterwards. Elsewhere it does
nothing and says so.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

KNOB = Path("/sys/module/page_reporting/parameters/min_free_ms")
HOLD_MS = 60_000
_TOUCH = (
    "import sys\nb = bytearray(int(sys.argv[1]))\nfor i in range(0, len(b), 4096):\n    b[i] = 1\n"
)


def _available() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


REFRESH = 3 << 30
_refresh = 0  # bytes `refresh` touches; set while `settled_memory` is active


def refresh() -> None:
    """Before a timed command: touch a few GiB again, untimed.

    Reporting can only be held off for 60 s (the knob's maximum), so memory freed earlier in
    the run is handed back to the host meanwhile, and the first tool after a long step would
    write into unbacked pages while the next found them backed again (measured here: `tar
    -x` of 1 GiB in 2.4-3.2 s late in a repetition, 0.8 s early). Pages just freed by the
    toucher are the ones the kernel hands out next, so each command starts alike.
    """
    if _refresh:
        subprocess.run([sys.executable, "-c", _TOUCH, str(_refresh)], check=False)


@contextlib.contextmanager
def settled_memory(enabled: bool = True, prefault: int = 8 << 30) -> Iterator[str]:
    """Yield a line for the report saying what was done."""
    if not enabled:
        yield "vm memory: left as it is (--no-vm-tune)"
        return
    try:
        old = KNOB.read_text().strip()
        KNOB.write_text(f"{HOLD_MS}\n")
    except OSError:
        yield "vm memory: no free page reporting knob here (or not root); left as it is"
        return
    global _refresh
    try:
        size = min(prefault, _available() // 2)
        subprocess.run([sys.executable, "-c", _TOUCH, str(size)], check=False)
        _refresh = min(REFRESH, size)
        yield (
            f"vm memory: free page reporting held off ({KNOB.name} {old} -> {HOLD_MS}, "
            f"restored after); {size / (1 << 30):.0f} GiB touched once first and "
            f"{_refresh / (1 << 30):.0f} GiB again before every timed command"
        )
    finally:
        _refresh = 0
        with contextlib.suppress(OSError):
            KNOB.write_text(f"{old}\n")
