"""Forwards to :mod:`ray_e5.generate.testserver` (the former path of the fault-injecting OpenAI-compatible server)."""

from ray_e5.generate.testserver import *  # noqa: F401,F403
from ray_e5.generate.testserver import main

if __name__ == "__main__":
    main()
