"""Entry point for `ray job submit --working-dir . -- python jobs/pipeline.py --config e5-mistral-7b`
(or `--config smoke --set run_dir=s3://bucket/run --set data_dir=s3://bucket/data`).

Runs generate -> train -> evaluate -> serve on one run directory. Inside a Ray job RAY_ADDRESS is set, so every
stage joins the job's cluster.
"""

import sys

from ray_e5.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("pipeline"))
