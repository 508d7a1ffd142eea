"""Entry point for `ray job submit -- python jobs/train.py --config e5-mistral-7b [--set k=v ...]`.

Inside a Ray job, RAY_ADDRESS is set, so training joins the job's cluster.
"""

import sys

from ray_e5.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
