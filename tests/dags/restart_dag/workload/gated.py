"""Waits until its gate file exists, then reports a fitness: the test decides when it finishes."""

import json
import sys
import time
from pathlib import Path

gates, genome = Path(sys.argv[1]), int(sys.argv[2])
while not (gates / f"open-{genome}").exists():
    time.sleep(0.2)
print(json.dumps({"experiment": {"fitness": round(1 / (2 + genome), 4)}}), flush=True)
