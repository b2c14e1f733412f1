#!/usr/bin/env python3
"""Who had the CPUs, and who waited for them, in short windows: a tool for latency spikes.

    benches/cpu-timeline.py record SECONDS OUT    # sample every thread's schedstat
    benches/cpu-timeline.py report OUT [WINDOW_S] [FROM_EPOCH] [TO_EPOCH]

`record` opens /proc/*/task/*/schedstat of every thread that exists when it starts (start it
after the server and the load generator) and reads them every ~8 ms: per thread, the time it
ran on a CPU and the time it waited runnable on a run queue (ns, from the scheduler itself).
`report` prints, per window (default 50 ms, epoch-second timestamps comparable with the load
generator's progress lines), the threads that ran most as `name=run/wait` in ms, summed over
threads with the same name prefix (reactors `core`, load generator `lg`, io-wq `iou`, kworkers
`kw`). A window where the reactors' wait jumps while some other thread runs is CPU theft; one
where everyone's run time drops is a stall outside the scheduler.

Why not perf: on the development VM, `perf record -a` gets no samples at all from the
sandbox's init agent (PID 1, `process_api`), and leaves gaps instead; this reads the
scheduler's own accounting, which it cannot hide from. See
benches/results/dev-2vcpu/README.md (the 3-second spikes).
"""

import collections
import glob
import os
import sys
import time

PERIOD_S = 0.008
GROUPS = (("sb-core", "core"), ("switchboard-loa", "lg"), ("iou-wrk", "iou"),
          ("kworker", "kw"), ("ksoftirq", "ksirq"))


def record(seconds: float, out: str) -> None:
    me = str(os.getpid())
    tasks = []
    for t in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        if t.split("/")[2] == me:
            continue
        try:
            fd = os.open(t + "/schedstat", os.O_RDONLY)
            with open(t + "/comm") as f:
                tasks.append((fd, f.read().strip(), t))
        except OSError:
            pass  # the thread exited meanwhile
    end = time.time() + seconds
    with open(out, "w") as f:
        while time.time() < end:
            row = [f"{time.time():.4f}"]
            for fd, _, _ in tasks:
                try:
                    s = os.pread(fd, 128, 0).split()
                    row.append(f"{int(s[0])},{int(s[1])}")
                except (OSError, IndexError, ValueError):
                    row.append("0,0")  # exited: reads as no time from here on
            f.write(" ".join(row) + "\n")
            time.sleep(PERIOD_S)
    with open(out + ".names", "w") as f:
        f.write("\n".join(f"{t} {c}" for _, c, t in tasks))


def group(name: str) -> str:
    for prefix, short in GROUPS:
        if name.startswith(prefix):
            return short
    return name


def report(out: str, window: float, start: float, end: float) -> None:
    with open(out + ".names") as f:
        names = [line.split(" ", 1)[1] for line in f.read().split("\n")]
    rows = []
    with open(out) as f:
        for line in f:
            p = line.split()
            rows.append((float(p[0]), [tuple(int(x) for x in s.split(",")) for s in p[1:]]))
    ran = collections.defaultdict(collections.Counter)
    waited = collections.defaultdict(collections.Counter)
    for (_, before), (t, after) in zip(rows, rows[1:]):
        if not start <= t < end:
            continue
        w = int(t / window) * window
        for i, (a, b) in enumerate(zip(before, after)):
            if b[0] < a[0]:
                continue  # an exited thread read as zero
            ran[w][group(names[i])] += (b[0] - a[0]) / 1e6
            waited[w][group(names[i])] += (b[1] - a[1]) / 1e6
    for w in sorted(ran):
        top = sorted(ran[w].items(), key=lambda x: -x[1])[:7]
        print(f"{w:.2f}", " ".join(f"{n}={v:.0f}/{waited[w][n]:.0f}" for n, v in top if v >= 0.5))


def main() -> None:
    args = sys.argv[1:]
    if len(args) >= 3 and args[0] == "record":
        record(float(args[1]), args[2])
    elif len(args) >= 2 and args[0] == "report":
        window = float(args[2]) if len(args) > 2 else 0.05
        start = float(args[3]) if len(args) > 3 else 0.0
        end = float(args[4]) if len(args) > 4 else float("inf")
        report(args[1], window, start, end)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
