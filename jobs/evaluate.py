"""Entry point for `ray job submit -- python jobs/evaluate.py --config configs/<recipe>.yaml [--set k=v ...]`.

Inside a Ray job RAY_ADDRESS is set, so the evaluation joins the job's cluster; elsewhere it starts a local one.
"""

import sys

from ray_e5.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
