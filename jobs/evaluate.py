"""Entry point for `ray job submit -- python jobs/evaluate.py --config <recipe name or file> [--set k=v ...]`.

Inside a Ray job RAY_ADDRESS is set, so the evaluation joins the job's cluster; elsewhere it starts a local one.
"""

import sys

from ray_e5.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
