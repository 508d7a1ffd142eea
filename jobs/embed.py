"""Entry point for `ray job submit -- python jobs/embed.py --input URI --output URI --model REF [...]` (or
`--config FILE` with an ``embed:`` section, `--set embed.key=value`).

Inside a Ray job RAY_ADDRESS is set, so the actors run on the job's cluster; elsewhere it starts a local one. A job
stopped or lost is resumed by submitting it again with the same output.
"""

import sys

from ray_e5.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("embed"))
