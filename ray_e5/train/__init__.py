"""The train stage: contrastive LoRA fine-tuning of a decoder into an embedder on Ray Train.

- ``config``: the ``train:`` section (TrainSettings);
- ``loss``: InfoNCE with in-batch, hard and cross-device negatives;
- ``step``: one step on a worker's slice of a global batch, with length-grouped chunks and gradient caching;
- ``engines``: DeepSpeed ZeRO 0-3 or plain torch behind one interface;
- ``loop``: the Ray Train worker loop (resume, metrics, checkpoints); ``metrics``: metrics.jsonl and loss.png;
- ``run``: ``train(config) -> TrainResult`` (``result``: where the embedder is, steps, summary, batch plan);
  ``command``: ``ray-e5 train``.
"""
