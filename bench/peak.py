"""Run a command and report its peak memory: ``python bench/peak.py CMD [ARGS...]``.

Prints, as its last line, ``MAXRSS_KB PSS_KB``: the kernel's high-water resident set of the command
(or of a process it waited for, the larger), and the largest total proportional set size of the
command and all its descendants, sampled every 50 ms.  The second is the physical memory a
machine needs: forked workers (the LUT fits) share their parent's pages, which each one's RSS
counts again.  Runs as a small process of its own: Linux carries a parent's high-water mark over
vfork/exec, so a command started by a large process would report at least that process's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def main() -> None:
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], sum(pss_kb(p) for p in descendants(child.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    print(usage.ru_maxrss, peak[0])
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
