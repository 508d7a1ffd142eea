"""Entry point for `ray job submit -- python jobs/generate.py --config e5-mistral-7b`."""

import sys

from ray_e5.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("generate"))
