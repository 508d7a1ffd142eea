"""Entry point for `ray job submit --working-dir . -- python jobs/pipeline.py --config configs/e5-mistral-7b.yaml`
(or `--config configs/smoke.yaml --set run_dir=s3://bucket/run --set data_dir=s3://bucket/data`).

Runs generate -> train -> evaluate -> serve on one run directory. Inside a Ray job RAY_ADDRESS is set, so every
stage joins the job's cluster.
"""

import sys

try:  # torch's libraries first: loaded late, after pyarrow's S3 client and Ray Data, libtorch_cpu.so failed to load
    import torch  # noqa: F401  (oneMKL FATAL ERROR, exit 2) in a job driver on an s3:// run dir
except ImportError:  # a driver without torch (generation only) has nothing to load
    pass

from ray_e5.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
