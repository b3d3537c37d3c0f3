"""Run a trainer script with rank 0 starting late, as on a slow node or a cold file cache:

    python slow_rank0.py SECONDS SCRIPT [ARGS...]
"""
import os
import runpy
import sys
import time

seconds, script = float(sys.argv[1]), sys.argv[2]
if os.environ.get("RANK") == "0":
    time.sleep(seconds)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
