"""cluster.yaml passes Ray's own cluster-launcher validation, before and after Ray fills in its defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(config)
    prepared = prepare_config(config)
    validate_config(prepared)
    pools = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert pools["gpu_pool"]["resources"]["GPU"] > 0 and "GPU" not in pools["cpu_pool"]["resources"]
    assert all(pools[p]["min_workers"] == 0 < pools[p]["max_workers"] for p in ("cpu_pool", "gpu_pool"))
    assert any("ray_e5-*.whl" in cmd and "[gpu]" in cmd for cmd in prepared["setup_commands"])


def _start_commands(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]


def test_only_the_owner_can_drive_the_cluster():
    """Ray's security guidance, checked on the file: the dashboard and Jobs API on the head's loopback (reached
    through `ray dashboard cluster.yaml`), token authentication on every node, an IAM instance profile per node
    type instead of keys, secrets from a secret store rather than a runtime env, and ray-e5 installed from the
    wheel the user built (not a name on a public index)."""
    config = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in CLUSTER.read_text()
    starts = [c for c in _start_commands(config) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IAM instance profile"
    text = yaml.safe_dump(config)  # what the launcher runs, without the comments that explain it
    for leaked in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "runtime-env-json", "env_vars"):
        assert leaked not in text, leaked
    assert "aws secretsmanager get-secret-value" in head and "OPENAI_API_KEY" in head
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-U pip" not in c]
    assert installs and all(".whl" in c for c in installs), installs
    mounted = set(config["file_mounts"])
    assert any(m in c for c in installs for m in mounted), (installs, mounted)


def test_ray_rejects_a_broken_cluster_yaml():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["gpu_pool"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


# ---- can cluster.yaml's node types schedule every stage of the paper's recipe? ---------------------------------
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "e5-mistral-7b.yaml"


def stage_demands(config) -> dict[str, list[tuple[str, dict, int, bool]]]:
    """What each stage asks Ray for: stage -> [(what, one bundle {resource: amount}, how many, pinned to the
    driver's node)], read from the validated settings as the stages read them."""
    from ray_e5.evaluate.config import EvaluateSettings
    from ray_e5.serve.config import ServeSettings
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.train.config import TrainSettings

    g = config.section("generate", GenerateSettings)
    t = config.section("train", TrainSettings)
    s = config.section("serve", ServeSettings)
    e = config.section("evaluate", EvaluateSettings)
    generate = [("ledger (rate and budget limits)", {"CPU": 0}, 1, True)]  # ray_e5/generate/run.py: num_cpus=0
    if g.backend == "vllm":  # ray.data.llm: vllm.concurrency engines of tensor_parallel_size GPUs, each on one node
        generate.append(("vLLM engine", {"CPU": 1, "GPU": g.vllm.tensor_parallel_size}, g.vllm.concurrency, False))
    else:  # ChatCompleter actors; llama.cpp's sit on the driver's node, beside the server (ray_e5/generate/completions.py)
        generate.append((f"{g.backend} generation actor", {"CPU": g.actor_cpus}, g.actors, g.backend == "llamacpp"))
    train = [("Ray Train controller and dataset manager", {"CPU": 0}, 2, True),
             ("training worker", {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}, t.num_workers,
              False)]
    replicas = s.autoscaling.max_replicas  # Serve scales up to it
    serve = [("Serve replica", {"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {})}, replicas, False)]
    evaluate = [("evaluation worker", {"CPU": e.cpus_per_worker,
                                       **({"GPU": e.gpus_per_worker} if e.gpus_per_worker else {})},
                 e.num_workers, False)]
    return {"generate": generate, "train": train, "serve": serve, "evaluate": evaluate}


def per_node(offer: dict, bundle: dict) -> int:
    """How many copies of ``bundle`` one node offering ``offer`` holds (a large number for a 0-resource bundle)."""
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return 10**6
    return min(int(offer.get(k, 0) // v) for k, v in need.items())


def unschedulable(cluster: dict, demands: dict) -> list[str]:
    """Each stage's demand against the node types: a bundle some node type holds, and as many as the pools can
    hold at their max_workers (stages run one after another, so each stage has the whole cluster)."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    problems = []
    for stage, items in demands.items():
        for what, bundle, count, pinned in items:
            if pinned:
                room = per_node(head.get("resources", {}), bundle)
                where = "the head (the driver's node)"
            else:
                room = sum(per_node(t.get("resources", {}), bundle) * t.get("max_workers", 0)
                           for t in workers.values())
                room = min(room, sum(per_node(t.get("resources", {}), bundle) for t in workers.values())
                           * cluster.get("max_workers", 10**6))
                where = "the worker pools"
            if room < count:
                problems.append(f"{stage}: {count} x {what} {bundle} do not fit {where} (room for {room})")
    return problems


def _recipe(*overrides: str):
    from ray_e5.config import load_config

    return load_config(RECIPE, list(overrides)) if overrides else load_config(RECIPE)


def test_cluster_yaml_schedules_every_stage_of_the_paper_recipe():
    cluster = yaml.safe_load(CLUSTER.read_text())
    demands = stage_demands(_recipe())
    for stage, items in demands.items():
        print(stage, [(what, bundle, count) for what, bundle, count, _ in items])
    assert unschedulable(cluster, demands) == []
    # the recipe's alternatives: vLLM generation on the GPU pool, llama.cpp actors pinned to the driver's node
    for overrides in (["generate.backend=vllm"], ["generate.backend=llamacpp", "generate.model=gemma3-270m"]):
        demands = stage_demands(_recipe(*overrides))
        assert any(count and (pinned or "vLLM" in what) for what, _, count, pinned in demands["generate"][1:])
        assert unschedulable(cluster, demands) == [], overrides


def test_the_check_finds_what_does_not_fit():
    cluster = yaml.safe_load(CLUSTER.read_text())
    demands = stage_demands(_recipe())
    big = {**demands, "train": [("training worker", {"CPU": 8, "GPU": 1}, 97, False)],  # 12 x 8 GPUs = 96
           "serve": [("Serve replica", {"CPU": 1, "GPU": 9}, 1, False)]}
    problems = unschedulable(cluster, big)
    assert len(problems) == 2 and "train: 97" in problems[0] and "serve: 1" in problems[1], problems
    # the head of before (CPU: 0) cannot hold what a driver pins to its node with CPUs
    cluster["available_node_types"]["head"]["resources"] = {"CPU": 0}
    pinned = {"generate": [("llamacpp generation actor", {"CPU": 0.25}, 16, True),
                           ("ledger (rate and budget limits)", {"CPU": 0}, 1, True)]}
    assert [p.split(" x ")[0] for p in unschedulable(cluster, pinned)] == ["generate: 16"]
