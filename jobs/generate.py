"""Entry point for `ray job submit -- python jobs/generate.py --config configs/e5-mistral-7b.yaml`."""

import sys

from ray_e5.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
