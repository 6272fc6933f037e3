#!/usr/bin/env python3
"""Run a command; print its wall seconds, peak RSS and peak anonymous RSS (MiB).

Peak RSS (VmHWM) counts file pages a process maps (cf-mix memory-maps its input), which the
kernel can drop at any time; RssAnon is the memory the process itself allocated. Both are
polled from /proc every 20 ms, so very short peaks can be missed.
"""
import subprocess
import sys
import time


def status(pid):
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon"):
                out[k] = int(v.split()[0])
    except FileNotFoundError:
        pass
    return out


t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
hwm = anon = 0
while p.poll() is None:
    s = status(p.pid)
    hwm, anon = max(hwm, s.get("VmHWM", 0)), max(anon, s.get("RssAnon", 0))
    time.sleep(0.02)
secs = time.perf_counter() - t0
if p.returncode:
    sys.exit(p.returncode)
print(f"{secs:.1f} {hwm // 1024} {anon // 1024}")
