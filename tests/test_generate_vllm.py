"""vLLM generation through ray.data.llm, checked on CPU: the request and response shapes against the installed
ray.data.llm.

vLLM's wheel is CUDA-only: the engine stage itself cannot run here. What runs is everything around it: the processor
built from our config by the installed ray.data.llm, our rows against its stages' declared inputs and output model,
and the rows through Arrow as Ray Data carries them.
"""

from __future__ import annotations

import json

import pyarrow as pa

from ray_e5.generate.config import GenerateSettings

SCHEMAS = {  # differently keyed schemas, as brainstorm and the example kinds have
    "brainstorm": {"type": "object", "properties": {"tasks": {"type": "array", "items": {"type": "string"}}},
                   "required": ["tasks"]},
    "sts": {"type": "object", "properties": {"S1": {"type": "string"}, "S2": {"type": "string"}},
            "required": ["S1", "S2"]},
    "short-long": {"type": "object", "properties": {"user_query": {"type": "string"}}, "required": ["user_query"]},
}


def _settings(model: str, **extra) -> GenerateSettings:
    return GenerateSettings(backend="vllm", temperature=0.7, max_tokens=333, vllm={
        "model": model, "concurrency": 2, "tensor_parallel_size": 1, "batch_size": 4}, **extra)


def test_rows_match_the_installed_ray_data_llm(ray_cluster, tiny_decoder_dir):
    """Our preprocess output carries every input the installed stages require, the structured-outputs key is the
    one the installed engine stage pops, and the columns we read are fields of its output model."""
    import inspect

    from ray.data.llm import build_processor
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper, vLLMOutputData

    from ray_e5.generate.backends import (ITEM_COLUMN, PHASE_COLUMN, VLLM_OUTPUT_COLUMNS, vllm_postprocess,
                                       vllm_preprocess, vllm_processor_config)

    settings = _settings(str(tiny_decoder_dir))
    processor = build_processor(vllm_processor_config(settings), preprocess=vllm_preprocess(settings),
                                postprocess=vllm_postprocess)
    stages = list(processor.stages.values())
    assert [type(s).__name__ for s in stages] == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage",
                                                  "DetokenizeStage"]
    item = {"id": "x", "kind": "sts", "prompt": "Write S1 and S2.", "schema": json.dumps(SCHEMAS["sts"]),
            "max_tokens": 333}
    row = vllm_preprocess(settings)({ITEM_COLUMN: json.dumps(item), PHASE_COLUMN: "example"})
    required = {key for s in stages[:1] + stages[2:3] for key in s.get_required_input_keys()}
    assert required == {"messages", "sampling_params"} and required <= set(row)
    assert row["messages"] == [{"role": "user", "content": "Write S1 and S2."}]
    sampling = row["sampling_params"]
    assert {k: sampling[k] for k in ("temperature", "top_p", "max_tokens")} == {"temperature": 0.7, "top_p": 1.0,
                                                                                 "max_tokens": 333}
    source = inspect.getsource(vLLMEngineWrapper._prepare_llm_request)
    assert 'sampling_params.pop("structured_outputs")' in source and "StructuredOutputsParams(" in source
    assert set(sampling["structured_outputs"]) == {"json"}  # StructuredOutputsParams(json=...): a dict or a string
    assert json.loads(sampling["structured_outputs"]["json"]) == SCHEMAS["sts"]
    produced = {"generated_text", "num_input_tokens", "num_generated_tokens"}
    assert produced <= set(vLLMOutputData.model_fields) and produced < set(VLLM_OUTPUT_COLUMNS)
    # the engine stage's failed rows carry __inference_error__ (and skip postprocess): the key we read
    assert '"__inference_error__": error_msg' in inspect.getsource(vLLMEngineWrapper) or \
        "__inference_error__" in inspect.getsource(inspect.getmodule(vLLMEngineWrapper))


def test_completion_style_writer_gets_the_raw_prompt_and_no_chat_template(ray_cluster, tiny_decoder_dir):
    from ray.data.llm import build_processor

    from ray_e5.generate.backends import ITEM_COLUMN, PHASE_COLUMN, vllm_preprocess, vllm_processor_config

    settings = _settings(str(tiny_decoder_dir), prompt_style="completion")
    assert settings.completion_style()
    processor = build_processor(vllm_processor_config(settings), preprocess=vllm_preprocess(settings))
    assert "ChatTemplateStage" not in [type(s).__name__ for s in processor.stages.values()]
    row = vllm_preprocess(settings)({ITEM_COLUMN: json.dumps({"prompt": "Q: a\nA:", "schema": "{}", "max_tokens": 9}),
                                     PHASE_COLUMN: "example"})
    assert row["prompt"] == "Q: a\nA:" and row["sampling_params"]["stop"] == ["\n"] and "messages" not in row


def test_schemas_survive_arrow_as_ray_data_carries_rows():
    """Schemas of different keys in one block: as nested dicts Arrow would unify them into one struct (each schema
    gaining the others' properties as nulls); as JSON strings each comes back as it went in."""
    from ray_e5.generate.backends import ITEM_COLUMN, PHASE_COLUMN, vllm_preprocess

    settings = _settings("unused")
    rows = [vllm_preprocess(settings)({ITEM_COLUMN: json.dumps({"prompt": k, "schema": json.dumps(s), "max_tokens": 5}),
                                       PHASE_COLUMN: "example"}) for k, s in SCHEMAS.items()]
    back = pa.Table.from_pylist(rows).to_pylist()
    for (kind, schema), row in zip(SCHEMAS.items(), back):
        assert json.loads(row["sampling_params"]["structured_outputs"]["json"]) == schema, kind
    nested = pa.Table.from_pylist([{"json": s} for s in SCHEMAS.values()]).to_pylist()
    assert nested[1]["json"]["properties"] != SCHEMAS["sts"]["properties"]  # what a dict column would have done


def test_both_phases_share_one_processor(ray_cluster, tiny_decoder_dir):
    from ray_e5.generate.backends import vllm_processor

    settings = _settings(str(tiny_decoder_dir))
    assert vllm_processor(settings) is vllm_processor(settings.model_copy())
    assert vllm_processor(settings) is not vllm_processor(_settings(str(tiny_decoder_dir), top_p=0.5))


def test_the_served_writer_config_is_a_valid_ray_serve_llm_config():
    """engine: serve (the default) deploys one LLMConfig; checked against the installed class (its module imports
    without vLLM; ray.serve.llm itself does not)."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    from ray_e5.generate.vllm_server import ROUTE, VllmServer, llm_config

    settings = _settings("mistralai/Mistral-7B-Instruct-v0.3")
    assert settings.vllm.engine == "serve"
    config = LLMConfig(**llm_config(settings.model_copy(update={"vllm": settings.vllm.model_copy(
        update={"accelerator_type": "H100"})})))
    assert config.model_id == "mistralai/Mistral-7B-Instruct-v0.3"
    assert config.engine_kwargs["tensor_parallel_size"] == 1 and config.engine_kwargs["max_model_len"] == 4096
    assert config.deployment_config["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2}
    assert config.accelerator_type == "H100"
    assert VllmServer(settings).base_url == f"http://127.0.0.1:8100{ROUTE}/v1"


def test_the_served_writer_without_vllm_fails_before_any_request():
    import pytest

    from ray_e5.generate.errors import BackendError
    from ray_e5.generate.vllm_server import VllmServer

    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here: the missing-vLLM message cannot be produced")
    with pytest.raises(BackendError, match=r"needs vLLM on the cluster \(pip install 'ray-e5\[gpu\]'"):
        VllmServer(_settings("mistralai/Mistral-7B-Instruct-v0.3")).__enter__()


def test_one_served_writer_answers_both_steps_through_the_hosted_path(ray_cluster, tmp_path, monkeypatch):
    """engine: serve starts the writer once, and brainstorm and examples both go to it through the ChatCompleter
    actors (journal, retries, drop counts). The deployment itself needs vLLM on GPUs; here the one allowed
    stand-in, our OpenAI-compatible test server, answers in its place."""
    from ray_e5.config import RayE5Config
    from ray_e5.generate import vllm_server
    from ray_e5.generate.run import generate
    from ray_e5.testing.openai_server import TestServer

    with TestServer() as server:
        started = []

        class StandIn:
            def __init__(self, settings, log=print):
                started.append(settings.vllm.model)
                self.base_url = server.base_url

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        monkeypatch.setattr(vllm_server, "VllmServer", StandIn)
        gen = {"backend": "vllm", "vllm": {"model": "test-model"}, "num_examples": 12, "mix": {"short-long": 1, "sts": 1},
               "tasks_per_brainstorm": 4, "examples_per_task": 2, "concurrency": 4, "progress": False,
               "request_timeout_s": 5.0}
        manifest = generate(RayE5Config.model_validate({"run_dir": str(tmp_path / "run"), "generate": gen})).manifest
        calls = list(server.calls)
    assert started == ["test-model"]  # one engine set for the whole run
    brainstorms = [c for c in calls if c.prompt.startswith("Think up a list")]  # the brainstorm prompt
    assert brainstorms and len(calls) > len(brainstorms)  # both steps reached the one server
    assert manifest["examples"] > 0 and manifest["backend"] == "vllm" and manifest["model"] == "test-model"
    assert any((tmp_path / "run" / "synthetic" / "journal").iterdir())  # the actors journaled the answers
