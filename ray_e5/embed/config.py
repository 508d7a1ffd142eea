"""The ``embed:`` section: what `ray-e5 embed --input ... --output ...` embeds, with what, on which devices.

Every flag of the command has its key here (``--text-column`` is ``embed.text_column``), so a job submitted with a
config file and one run from the shell are the same run. It is validated with the rest of the config
(``ray-e5 validate``), before Ray starts. ``embed`` is not a pipeline stage: it reads a corpus that is not in the
run directory and writes where ``output`` says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ray_e5.settings import Section


class EmbedSettings(Section):
    input: str | None = None  # a Parquet or JSONL file, or a folder of them; local, s3:// or gs://
    output: str | None = None  # a folder (local, s3://, gs://): Parquet shards of id, embedding; rejects/
    model: str | None = None  # any reference Embedder.load takes (engine vllm: a `ray-e5 export` dir); None: model.name
    text_column: str = "text"
    id_column: str = "id"
    format: Literal["auto", "parquet", "jsonl"] = "auto"  # auto: by the file names' suffix
    dimensions: int | None = Field(None, gt=0)  # Matryoshka: keep the first N coordinates, re-normalised
    instruction: str | None = None  # embed the texts as queries with the model's instruction template
    pooling: Literal["last", "mean", "cls"] | None = None  # override the model's pooling (engine embedder)
    engine: Literal["embedder", "vllm"] = "embedder"
    num_gpus: float = Field(0, ge=0)  # per actor; > 0: on the GPU (bf16 weights by dtype auto), pooling in float32
    # The weights' dtype (pooling and normalisation stay float32). auto: bf16 where the node runs it natively (a
    # CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32, decided on each node (bf16 emulated on other
    # CPUs is slower than fp32); vectors within 1e-4 cosine of fp32's, at 1.5x its speed on such a CPU.
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cpus_per_actor: float = Field(1, gt=0)
    max_actors: int | None = Field(None, gt=0)  # the actor pool scales between 1 and this; None: what the cluster fits
    batch_tokens: int = Field(8192, gt=0)  # padded tokens per forward (length-sorted within a block)
    max_batch_size: int = Field(128, gt=0)  # texts per forward at most
    block_rows: int = Field(10000, gt=0)  # Parquet: rows per block (the unit of resume)
    block_bytes: int = Field(4 * 1024 * 1024, gt=0)  # JSONL: bytes per block (the unit of resume)

    @model_validator(mode="after")
    def _vllm_fits(self) -> "EmbedSettings":
        if self.engine == "vllm" and self.pooling is not None:
            raise ValueError("pooling is the merged export's with engine vllm (set it when exporting); accepted: "
                             "pooling unset, or engine embedder")
        return self
