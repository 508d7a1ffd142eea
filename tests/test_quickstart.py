"""The offline quickstart end to end at reduced size (--smoke): real llama.cpp generation, Ray Train, mteb
evaluation, Ray Serve answering the openai client; the trained model must beat the base model on local STS."""

from __future__ import annotations

import pytest

from ray_e5 import storage
from ray_e5.net import free_port


@pytest.mark.slow
def test_quickstart_smoke_end_to_end(ray_cluster, shared_data, tmp_path, capfd):
    from openai import OpenAI

    from ray_e5.pipeline.quickstart import Budget, quickstart_config, run_quickstart
    from ray_e5.serve.run import shutdown

    port = free_port()
    config = quickstart_config(None, str(tmp_path / "run"), str(shared_data), Budget(20 * 60), smoke=True,
                               overrides=[f"serve.port={port}"])
    lines: list[str] = []
    try:
        results = run_quickstart(config, log=lines.append)  # no valid synthetic row would stop it here
        run = config.run_dir
        for path in ("synthetic/manifest.json", "train/metrics.jsonl", "embedder/ray_e5.json", "embedder/adapter",
                     "eval/report.json", "eval/report.md", "eval/scores.png"):
            assert storage.exists(storage.join(run, path)), path
        manifest = storage.read_json(storage.join(run, "synthetic", "manifest.json"))
        assert manifest["examples"] > 0 and sum(manifest["by_kind"].values()) == manifest["examples"]
        plan = storage.read_json(storage.join(run, "train", "data.json"))
        assert plan["sources"]["synthetic"]["used"] > 0, plan["sources"]["synthetic"]  # the rows were trained on
        assert any(run in line for line in lines) and any("OpenAI(base_url=" in line for line in lines)
        summary = next(line for line in lines if line.startswith("[ray-e5] synthetic rows:"))
        assert f"{manifest['examples']} generated" in summary and "planned for training" in summary, summary
        console = "\n".join(lines) + "\n" + capfd.readouterr().out  # our lines and whatever reached stdout
        for noise in ("Traceback", "PlacementGroupCleaner", "FutureWarning"):
            assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"

        client = OpenAI(base_url=results["serve"].url, api_key="unused", max_retries=0)
        response = client.embeddings.create(model="ray-e5-quickstart", input=["A man plays a guitar.", "Rockets."])
        assert len(response.data) == 2 and len(response.data[0].embedding) == 640

        scores = {m: t["stsbenchmark"] for m, t in storage.read_json(storage.join(run, "eval", "report.json"))["scores"].items()}
        print(f"quickstart smoke STS-B (200 pairs) Spearman: {scores}")
        assert scores["trained"] > scores["gemma3-270m"] + 5  # x100 Spearman

        # A rerun into the same run directory that generates more (new shards) resumes and completes: training
        # starts afresh on the new plan, with a printed reason, instead of refusing the changed shard list. (Same
        # port: Serve is still up in this cluster, and a running Serve keeps the port it started on.)
        again = quickstart_config(None, str(tmp_path / "run"), str(shared_data), Budget(20 * 60), smoke=True,
                                  overrides=[f"serve.port={port}", "generate.num_examples=24",
                                             "generate.time_budget_s=60"])
        run_quickstart(again, log=lines.append)
        second = storage.read_json(storage.join(run, "synthetic", "manifest.json"))
        assert second["runs"] == 2 and second["examples"] >= manifest["examples"]
        assert storage.exists(storage.join(run, "embedder", "ray_e5.json"))
    finally:
        shutdown()
