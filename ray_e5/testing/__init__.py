"""Helpers for ray-e5's tests and benchmarks (shipped in the package, so that ``bench/`` and an installed wheel's
test run import them the same way). Nothing in the stages imports them.

- :mod:`ray_e5.testing.models`: ``tiny_decoder`` (a random Mistral-shaped decoder with a tokenizer trained on the
  spot, in milliseconds) and ``build_tokenizer``.
- :mod:`ray_e5.testing.tasks`: toy evaluation task folders in the layouts of ``../shared/data``, with known scores.
- :mod:`ray_e5.testing.train`: real gloo process groups on local processes (``spawn``), one training step's
  gradients, engine settings, a LoRA tiny embedder, memory probes for ZeRO-3 loads.
- :mod:`ray_e5.testing.generate`: ``generation_driver``, a generate driver in its own process (to kill mid-run).
- :mod:`ray_e5.testing.openai_server`: ``TestServer``, the fault-injecting OpenAI-compatible server (chat
  completions, Batch API) that stands in for hosted APIs; ``python -m ray_e5.testing.openai_server`` runs it alone.
- :mod:`ray_e5.testing.cluster`: a simulated multi-node cluster on one machine (``ray start`` nodes, moto's S3
  server, ``ray job submit``), for the cluster tests and ``bench/cluster_smoke.py``.

Submodules are imported on use: importing this package loads neither torch nor Ray.
"""
