"""A torchrun entry for tests/test_distributed.py: every rank says it started, then rank 1 exits
with code 3 while rank 0 would wait for two minutes (torchrun has to stop it)."""

import os
import time

print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} started", flush=True)
if os.environ["RANK"] == "1":
    raise SystemExit(3)
time.sleep(120)
