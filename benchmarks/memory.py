"""Where a rank's resident memory goes, compared with another rank's (usually raw DDP's).

Run ``run.py`` with ``BENCH_SMAPS=1`` in the environment: every rank then also writes its
``/proc/self/smaps`` and its ``sys.modules`` next to its timings. This script sums resident
memory by mapping (a shared library, ``[heap]``, anonymous memory) and prints the mappings
that differ most, then the top-level packages one process imported and the other did not::

    BENCH_SMAPS=1 python benchmarks/run.py --workloads mlp --frameworks raw_ddp,ray_lit --out /tmp/b
    python benchmarks/memory.py /tmp/b/rep0/mlp_raw_ddp /tmp/b/rep0/mlp_ray_lit --rank 1
"""

from __future__ import annotations

import argparse
import collections
import os
import re

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
_FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Dirty", "Anonymous")


def by_mapping(smaps_path: str) -> tuple[collections.Counter, collections.Counter]:
    """``(resident KiB per mapping name, totals per smaps field)`` of one smaps file."""
    resident: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    name = "[anon]"
    with open(smaps_path) as f:
        for line in f:
            if _MAPPING.match(line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
                if "/site-packages/" in name:  # -> "torch: libtorch_cpu.so"
                    package = name.split("/site-packages/")[1].split("/")[0]
                    name = f"{package}: {os.path.basename(name)}"
                continue
            key, _, value = line.partition(":")
            if key in _FIELDS:
                totals[key] += int(value.split()[0])
                if key == "Rss":
                    resident[name] += int(value.split()[0])
    return resident, totals


def packages(modules_path: str) -> collections.Counter:
    """Number of imported modules per top-level package."""
    with open(modules_path) as f:
        return collections.Counter(line.strip().split(".")[0] for line in f if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="run directory of the baseline (e.g. .../mlp_raw_ddp)")
    parser.add_argument("other", help="run directory to explain (e.g. .../mlp_ray_lit)")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    base, base_totals = by_mapping(os.path.join(args.base, f"smaps{args.rank}.txt"))
    other, other_totals = by_mapping(os.path.join(args.other, f"smaps{args.rank}.txt"))
    mib = 1024.0
    print("| MiB | base | other | difference |\n|---|---|---|---|")
    for field in _FIELDS:
        b, o = base_totals[field] / mib, other_totals[field] / mib
        print(f"| {field} | {b:.1f} | {o:.1f} | {o - b:+.1f} |")
    print("\nmappings that differ most (resident MiB):\n| mapping | base | other | difference |"
          "\n|---|---|---|---|")
    names = sorted(set(base) | set(other), key=lambda n: -abs(other[n] - base[n]))
    for name in names[:args.top]:
        print(f"| {name} | {base[name] / mib:.1f} | {other[name] / mib:.1f} | "
              f"{(other[name] - base[name]) / mib:+.1f} |")
    modules = [os.path.join(d, f"modules{args.rank}.txt") for d in (args.base, args.other)]
    if all(os.path.exists(m) for m in modules):
        only = packages(modules[1]) - packages(modules[0])
        print("\nimported only by the other (modules per package): "
              + ", ".join(f"{p} {n}" for p, n in only.most_common(args.top)))


if __name__ == "__main__":
    main()
