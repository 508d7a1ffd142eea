"""`ray-e5 embed --input URI --output URI`: a corpus embedded offline with Ray Data, resumable (not a stage).

The modules: :mod:`ray_e5.embed.config` (the ``embed:`` section), :mod:`ray_e5.embed.units` (the input split into
blocks named by their content range), :mod:`ray_e5.embed.run` (the Ray Data job), :mod:`ray_e5.embed.vllm` (the
``ray.data.llm`` processor for ``engine: vllm``). Nothing is imported here, so that the config can import the
section without loading the job's code.
"""
