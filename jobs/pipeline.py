"""Entry point for `ray job submit --working-dir . -- python jobs/pipeline.py --config configs/e5-mistral-7b.yaml`.

Runs generate -> train -> evaluate -> serve on one run directory. Inside a Ray job RAY_ADDRESS is set, so every
stage joins the job's cluster.
"""

import sys

from ray_e5.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
