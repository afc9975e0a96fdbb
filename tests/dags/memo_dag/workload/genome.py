"""A stand-in genome for memoization runs: works ``--seconds``, then reports a fitness.

After its work it exits with status 3 while the file named by ``--fail-while`` exists: a fault
outside the request (a bad node, a full disk) that strikes at the end, so the failed run cost
as much as a good one, and removing the file fixes it without changing the request.
"""

import json
import os
import sys
import time

args = sys.argv[1:]


def option(name: str, default: str = "") -> str:
    return args[args.index(name) + 1] if name in args else default


genome = int(option("--genome", "0"))
time.sleep(float(option("--seconds", "0")))
marker = option("--fail-while")
if marker and os.path.exists(marker):
    print(f"genome {genome}: transient fault ({marker} exists)", flush=True)
    sys.exit(3)
print(json.dumps({"experiment": {"genome": genome, "fitness": round(1 / (2 + genome), 4)}}), flush=True)
