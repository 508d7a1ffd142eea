"""One vLLM engine set for both generation steps: Ray Serve LLM's OpenAI-compatible app, started once per run.

``ray.data.llm``'s processor starts its engine actors per dataset execution, so a run that brainstorms and then
writes examples loaded the model twice (minutes each for a 7B writer, and the GPUs idle in between). With
``generate.vllm.engine: serve`` (the default) the engines are started once, as a ``ray.serve.llm`` deployment of
``vllm.concurrency`` replicas, and both steps send their requests to it as chat (or completion) requests through
the same ChatCompleter actors a hosted API gets: the journal, retries, rate limits and drop counts are the hosted
path's, unchanged. ``engine: batch`` keeps the ``ray.data.llm`` processor (no HTTP hop; engines per step).

Serve runs an HTTP proxy on every node, so the actors reach the app on their own node's loopback: the writer binds
127.0.0.1 only (nothing off the node can reach the LLM). Serve's HTTP options are cluster-wide, so the writer reads
those of a Serve already running and stops when they differ, and shuts Serve down on exit when it started it and no
other app is left (the serve stage that follows then starts Serve at its own host and port).
"""

from __future__ import annotations

import time
from typing import Any

from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.errors import BackendError

APP_NAME = "ray-e5-writer"
ROUTE = "/ray-e5-writer"
HOST = "127.0.0.1"  # the ChatCompleter actors reach the proxy of their own node; nothing else needs to


def llm_config(settings: GenerateSettings) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMConfig`` fields for the writer (checked against the installed class in the tests):
    the model served under its own name, ``concurrency`` fixed replicas of ``tensor_parallel_size`` GPUs."""
    v = settings.vllm
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": v.model, "model_source": v.model},
        "engine_kwargs": {"tensor_parallel_size": v.tensor_parallel_size, "max_model_len": v.max_model_len,
                          "gpu_memory_utilization": v.gpu_memory_utilization},
        "deployment_config": {"autoscaling_config": {"min_replicas": v.concurrency, "max_replicas": v.concurrency},
                              # each replica batches what it is sent: let it hold a batch's worth of requests
                              "max_ongoing_requests": max(v.batch_size, settings.concurrency)},
    }
    if v.accelerator_type:
        config["accelerator_type"] = v.accelerator_type
    return config


class VllmServer:
    """Context manager: deploy the writer app, wait until it answers, delete it on exit."""

    def __init__(self, settings: GenerateSettings, log=print):
        self.settings = settings
        self.port = settings.vllm.serve_port
        self.base_url = f"http://{HOST}:{self.port}{ROUTE}/v1"
        self.log = log
        self.started_serve = False

    def __enter__(self) -> "VllmServer":
        try:
            from ray.serve.llm import LLMConfig, build_openai_app
        except ImportError as err:
            raise BackendError(f"generate.backend vllm with vllm.engine serve needs vLLM on the cluster "
                               f"(pip install 'ray-e5[gpu]' on GPU nodes): {err}") from None
        from ray import serve

        check_engines_fit(self.settings)

        self._start_serve()
        app = build_openai_app({"llm_configs": [LLMConfig(**llm_config(self.settings))]})
        serve.run(app, name=APP_NAME, route_prefix=ROUTE, blocking=False)
        self._wait(serve)
        self.log(f"[ray-e5 generate] vLLM writer {self.settings.vllm.model} served at {self.base_url} "
                 f"({self.settings.vllm.concurrency} replica(s), one engine set for both steps)")
        return self

    def _start_serve(self) -> None:
        """Start Serve on loopback at ``vllm.serve_port``, or use the running one when it listens there already."""
        from ray import serve

        from ray_e5.serve.instance import ServeConflict, check_http_options

        try:
            running = check_http_options(
                HOST, self.port, "the vLLM writer (127.0.0.1) and generate.vllm.serve_port",
                "Set generate.vllm.serve_port to that port if it is loopback, shut the running Serve down "
                "(`serve shutdown`), or use generate.vllm.engine: batch (no Serve).")
        except ServeConflict as err:
            raise BackendError(str(err)) from None
        self.started_serve = running is None
        serve.start(http_options={"host": HOST, "port": self.port})

    def _wait(self, serve) -> None:
        deadline = time.time() + self.settings.vllm.start_timeout_s
        while True:
            app = serve.status().applications.get(APP_NAME)
            status = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                message = getattr(app, "message", "") or ""
                self._delete()
                raise BackendError(f"the vLLM writer {self.settings.vllm.model!r} failed to deploy: {message}")
            if time.time() > deadline:
                self._delete()
                raise BackendError(f"the vLLM writer {self.settings.vllm.model!r} was not up after "
                                   f"{self.settings.vllm.start_timeout_s:.0f} s (generate.vllm.start_timeout_s)")
            time.sleep(2.0)

    def _delete(self) -> None:
        from ray import serve

        try:
            serve.delete(APP_NAME)
            if self.started_serve and not serve.status().applications:
                serve.shutdown()  # Serve was ours: free its cluster-wide HTTP options for the serve stage
        except Exception:  # noqa: BLE001 - already gone
            pass

    def __exit__(self, *exc) -> None:
        self._delete()


def engine_demand(settings: GenerateSettings):
    """vLLM's engines: ``vllm.concurrency`` of ``tensor_parallel_size`` GPUs, each on one node."""
    from ray_e5.capacity import Demand

    return Demand("generate.vllm.tensor_parallel_size / generate.vllm.concurrency", "vLLM engine",
                  {"GPU": settings.vllm.tensor_parallel_size}, settings.vllm.concurrency)


def check_engines_fit(settings: GenerateSettings) -> None:
    """The engines against the cluster, before any is started: a request no node can hold would otherwise wait
    for the autoscaler forever."""
    from ray_e5.capacity import check_fits

    check_fits([engine_demand(settings)])
