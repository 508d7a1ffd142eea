"""`ray-e5 pipeline` and `quickstart` around the stages: the whole config checked before any stage runs, the empty
synthetic-data stop (or one warning with --allow-empty-synthetic), the closing summary, Ctrl-C, a quiet console.

The stages themselves have their own tests; here the registry's run functions are replaced by recording ones (the
registry is the one place the pipeline reaches stages through), so these tests need no Ray cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_e5 import stages
from ray_e5.cli import main
from ray_e5.config import ConfigError
from ray_e5.generate.result import GenerateResult
from ray_e5.serve.result import ServeResult
from ray_e5.train.result import TrainResult

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Every registered stage replaced by one that records its call; connecting to Ray is refused, so a test
    fails if the pipeline reaches it when it must not, and otherwise never starts a cluster."""
    calls: list[str] = []
    behaviour: dict = {}

    def fake(name):
        def run(config):
            calls.append(name)
            action = behaviour.get(name)
            if isinstance(action, BaseException):
                raise action
            return action
        return run

    monkeypatch.setattr(stages.Stage, "run_function", lambda stage: fake(stage.name))
    connected: list = []
    monkeypatch.setattr("ray_e5.cluster.connect", lambda *a, **k: connected.append(a))
    behaviour["train"] = TrainResult(str(tmp_path / "run" / "embedder"), 3, tmp_path / "run" / "embedder")
    behaviour["generate"] = GenerateResult.from_manifest({"examples": 2, "by_kind": {"sts": 2}}, "x")
    return calls, behaviour, connected


def _pipeline(tmp_path, *extra):
    return main(["pipeline", "--config", str(QUICKSTART), "--set", f"run_dir={tmp_path / 'run'}", *extra])


def test_a_typo_in_a_later_section_fails_the_pipeline_before_generating(recorded, tmp_path, capsys):
    calls, _, connected = recorded
    assert _pipeline(tmp_path, "--set", "train.lr=abc") == 2
    err = capsys.readouterr().err
    assert "train.lr: Input should be a valid number" in err
    assert calls == [] and connected == []  # nothing ran, Ray was not started


def test_unknown_stage_is_refused_before_anything(recorded, tmp_path, capsys):
    calls, _, connected = recorded
    assert _pipeline(tmp_path, "--stages", "generate,trian") == 2
    assert "'trian'" in capsys.readouterr().err and calls == [] and connected == []


def test_pipeline_runs_the_chosen_stages_in_registry_order(recorded, tmp_path, capsys):
    calls, _, connected = recorded
    assert _pipeline(tmp_path, "--stages", "train,generate") == 0
    assert calls == ["generate", "train"] and len(connected) == 1
    out = capsys.readouterr().out
    assert "[ray-e5] generate: starting" in out and "[ray-e5] train: done" in out


def _empty():
    from ray_e5.generate.run import EmptySyntheticError

    return EmptySyntheticError("generate: 4 planned requests wrote no valid row (drops: malformed_json 4)",
                               {"examples": 0, "by_kind": {}, "drops": {"malformed_json": 4}})


def test_empty_synthetic_data_stops_the_pipeline_with_its_message(recorded, tmp_path, capsys):
    calls, behaviour, _ = recorded
    behaviour["generate"] = _empty()
    assert _pipeline(tmp_path, "--stages", "generate,train") == 2
    err = capsys.readouterr().err
    assert "wrote no valid row (drops: malformed_json 4)" in err and "--allow-empty-synthetic" in err
    assert calls == ["generate"]  # training did not start


def test_allow_empty_synthetic_warns_once_and_trains(recorded, tmp_path, capsys):
    calls, behaviour, _ = recorded
    behaviour["generate"] = _empty()
    assert _pipeline(tmp_path, "--stages", "generate,train", "--allow-empty-synthetic") == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "wrote no valid row" in warnings[0], out
    assert calls == ["generate", "train"]


def test_quickstart_flag_reaches_the_pipeline(recorded, tmp_path, capsys, monkeypatch):
    calls, behaviour, _ = recorded
    behaviour["generate"] = _empty()
    behaviour["serve"] = ServeResult("http://127.0.0.1:1/v1", "m")
    monkeypatch.setattr("ray_e5.pipeline.quickstart._openai_example", lambda url, model, key_env, key: ("snippet", "640 0.5"))
    assert main(["quickstart", "--config", str(QUICKSTART), "--run-dir", str(tmp_path / "run")]) == 2
    assert calls == ["generate"]
    calls.clear()
    assert main(["quickstart", "--config", str(QUICKSTART), "--run-dir", str(tmp_path / "run"),
                 "--allow-empty-synthetic"]) == 0
    assert calls == ["generate", "train", "evaluate", "serve"]
    out = capsys.readouterr().out
    assert "[ray-e5] synthetic rows: 0 generated (none); none planned for training" in out
    assert "[ray-e5] the embedder is served at http://127.0.0.1:1/v1" in out


def test_quickstart_config_is_validated_whole(tmp_path):
    from ray_e5.pipeline.quickstart import Budget, quickstart_config

    with pytest.raises(ConfigError) as info:
        quickstart_config(None, str(tmp_path), None, Budget(600), True, ["serve.prot=1", "evaluate.x=1"],
                          log=lambda line: None)
    assert info.value.errors == ["evaluate.x: unknown key", "serve.prot: unknown key"]


def test_an_hour_budget_runs_the_one_hour_recipe_with_its_shares(shared_data):
    from ray_e5.pipeline.quickstart import Budget, quickstart_config, recipe_for_budget

    assert recipe_for_budget(60).name == "cpu-1h.yaml" and recipe_for_budget(20).name == "quickstart.yaml"
    hour = quickstart_config(None, None, str(shared_data), Budget(3600), False, [], log=lambda line: None)
    assert hour.run_dir.endswith("cpu-1h") and hour.budget.train == 0.76
    assert hour.train["max_time_s"] == int(3600 * 0.76)  # the recipe's share caps the section's own limit
    assert hour.generate["time_budget_s"] == min(420, int(3600 * hour.budget.generate))
    short = quickstart_config(None, None, str(shared_data), Budget(1200), False, [], log=lambda line: None)
    assert short.run_dir.endswith("quickstart") and short.train["max_time_s"] == int(1200 * 0.4)
    with pytest.raises(ConfigError, match="budget"):
        quickstart_config(None, None, str(shared_data), Budget(3600), False, ["budget.generate=0.6"],
                          log=lambda line: None)


def test_synthetic_summary_per_kind():
    from ray_e5.pipeline.quickstart import synthetic_summary

    generated = GenerateResult.from_manifest({"examples": 7, "by_kind": {"sts": 4, "short-long": 3}}, "x")

    def trained(stats, steps=1, planned_steps=None):
        data = {"sources": {"synthetic": stats}} if stats else {}
        if planned_steps:
            data["steps"] = planned_steps
        return TrainResult("e", steps, Path("e"), data=data)

    assert synthetic_summary(generated, trained({"used": 6, "used_by_kind": {"sts": 4, "short-long": 2}})) == (
        "[ray-e5] synthetic rows: 7 generated (short-long 3, sts 4); 6 planned for training (short-long 2, sts 4)")
    assert synthetic_summary(generated, trained({"used": 4})).endswith("; 4 planned for training")
    assert synthetic_summary(generated, trained(None)).endswith("; none planned for training")
    assert synthetic_summary(None, trained({"used": 4})) == "[ray-e5] synthetic rows: 4 planned for training"
    # a time limit ended training at a quarter of its plan: about a quarter of the planned rows were trained on
    assert synthetic_summary(None, trained({"used": 400}, steps=25, planned_steps=100)) == (
        "[ray-e5] synthetic rows: 400 planned for training, about 100 trained (25 of 100 steps ran)")
    assert synthetic_summary(None, trained({"used": 400}, steps=100, planned_steps=100)).endswith(
        "400 planned for training")


def test_ctrl_c_stops_with_one_line(recorded, tmp_path, capsys):
    _, behaviour, _ = recorded
    behaviour["generate"] = KeyboardInterrupt()
    assert _pipeline(tmp_path, "--stages", "generate") == 130
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in captured.err + captured.out


def test_validate_command_from_a_shell():
    """The console script, as a user runs it: `ok` and exit 0, or every error and exit 2."""
    exe = Path(sys.executable).with_name("ray-e5")
    ok = subprocess.run([str(exe), "validate", "--config", str(QUICKSTART)], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok"), ok.stderr
    bad = subprocess.run([str(exe), "validate", "--config", str(QUICKSTART), "--set", "train.lr=abc",
                          "--set", "generate.num_exmples=3"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert [line.split(":")[0] for line in bad.stdout.splitlines()] == ["generate.num_exmples", "train.lr"]


# ---- a quiet console -----------------------------------------------------------------------------------------
def test_worker_warning_filter_silences_only_the_known_noise():
    """The PYTHONWARNINGS value given to every worker: is_gradient_checkpointing's FutureWarning is silenced, any
    other FutureWarning still shows."""
    from ray_e5.console import _worker_pythonwarnings

    code = ("import warnings\n"
            "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
            "warnings.warn('something else changes', FutureWarning)\n"
            "class UndefinedMetricWarning(UserWarning): pass\n"  # sklearn's, a UserWarning subclass
            "warnings.warn('Recall is ill-defined and being set to 0.0 in labels', UndefinedMetricWarning)\n"
            "warnings.warn('Recall went down', UserWarning)\n")
    env = {**os.environ, "PYTHONWARNINGS": _worker_pythonwarnings()}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stderr
    assert "is_gradient_checkpointing" not in err and "something else changes" in err
    assert "ill-defined" not in err and "Recall went down" in err
    assert "Invalid -W option" not in err


def test_forwarded_worker_lines_lose_only_the_known_noise():
    from ray_e5.console import drop_noise

    batch = {"pid": 1, "is_err": True, "lines": [
        "train:  40%|####      | 8/20 [00:10<00:15, 1.2s/step]",
        "/x/peft_model.py:184: FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6.",
        "  if getattr(model, \"is_gradient_checkpointing\", True):",
        "[ray-e5 train] step 10 loss 1.23"]}
    assert drop_noise(batch)["lines"] == [batch["lines"][0], batch["lines"][3]]
    cleaner = {"pid": 2, "actor_name": "PlacementGroupCleaner", "is_err": True,
               "lines": ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."]}
    assert drop_noise(cleaner) is None
    assert drop_noise({"pid": 3, "is_err": True, "lines": ["Failed to query Ray Train Controller actor state."]}) is None
    loading = {"pid": 4, "is_err": True, "lines": [  # as a training worker printed them in the one-hour run
        "Converting and de-quantizing GGUF tensors...:   1%|          | 2/236 [00:10<20:34,  5.27s/it]",
        "[2026-12-03 13:19:39,362] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
        "If you have GPU or other accelerator, we were unable to detect it.",
        "train:   0%|          | 0/650 [00:00<?, ?step/s]",
        "\u2714\ufe0f  Dataset train_0358I90wuqp70lhcr4XOMB_0 execution finished in 0.00 seconds"]}
    assert drop_noise(loading)["lines"] == [loading["lines"][2]]
    evaluation = {"pid": 5, "is_err": True, "lines": [  # an evaluation worker and Serve, in the one-hour run
        "  0%|          | 0/2 [00:00<?, ?it/s]",
        "100%|██████████| 2/2 [00:06<00:00,  3.30s/it]100%|██████████| 2/2 [00:06<00:00,  3.38s/it]",
        "evaluate:  50%|█████     | 4/8 [01:10<01:10, 17.5s/task]",
        "INFO 2026-12-04 20:13:54,546 controller 17420 -- HAProxy is enabled in ServeController.",
        "INFO 2026-12-04 20:13:55,824 proxy 192.0.2.2 -- Proxy starting on node 5d9c08d8 (HTTP port: 8500).",
        "WARNING 2026-12-04 20:13:54,546 controller 17420 -- HTTPOptions.host='127.0.0.1' won't accept connections",
        "INFO 2026-12-04 20:14:06,013 ray-e5_ray-e5-embeddings 9ioq57vm -- POST /v1/embeddings 200 82.6ms"]}
    assert drop_noise(evaluation)["lines"] == evaluation["lines"][2:3] + evaluation["lines"][5:]


def test_the_drivers_native_noise_stays_off_the_console_and_the_rest_passes():
    """Ray's core worker writes its ERROR lines to fd 2 itself; the console entry point drops the known one."""
    noisy = ("[2026-12-06 04:56:06,487 E 2213 2213] core_worker.cc:2465: Actor with class name: "
             "'MapWorker(MapBatches(ChatCompleter))' and ID: '62a2' has constructor arguments in the object store "
             "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
             "restart will fail.")
    other = "[2026-12-06 04:56:07,001 E 2213 2213] core_worker.cc:99: some other native error"
    code = f"""
import os, sys
from ray_e5.native_stderr import filter_native_stderr
filter_native_stderr()
os.write(2, {noisy.encode()!r} + b"\\n" + {other.encode()!r}[:20])   # the next line arrives in two writes
os.write(2, {other.encode()!r}[20:] + b"\\n")
sys.stderr.write("generate:  50%|#####     | 1/2\\r"); sys.stderr.flush()   # a bar: no newline
os.write(2, {noisy.encode()!r}[:30]); os.write(2, {noisy.encode()!r}[30:] + b"\\n")
raise SystemExit("the last words")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)  # bytes: "\r" kept
    err = done.stderr.decode()
    assert done.returncode == 1
    assert "constructor arguments" not in err, err
    assert other + "\n" in err and "1/2\r" in err and err.rstrip().endswith("the last words"), err
