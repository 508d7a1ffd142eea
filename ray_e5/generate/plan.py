"""Planning: seeded placeholder sampling into slots, the brainstorm requests they need, and their expansion into
example prompts once the brainstormed tasks are known.

Everything is a pure function of the settings (and, for the expansion, of the frozen brainstorm results), and slot
``i`` depends only on ``seed`` and ``i``: the same config plans the same examples with the same content-addressed
ids, and raising ``num_examples`` only appends slots. That is what lets a rerun continue a killed run.

Kinds are interleaved by smooth weighted round-robin, so every prefix of the plan follows the mix to within one
example. The ``j``-th slot of an asymmetric kind takes its task from brainstorm request ``j // per_brainstorm``
(``per_brainstorm = tasks_per_brainstorm * examples_per_task``): each request of about 20 definitions serves about
66 examples, which gives the paper's ratio of about 3.3 examples per task.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from ray_e5.digest import digest
from ray_e5.generate.config import GenerateSettings
from ray_e5.generate.prompts import (BRAINSTORM_SCHEMA, PROMPT_VERSION, answer_schema, brainstorm_completion_prompt,
                                  brainstorm_prompt, completion_prompt, example_prompt, TOPICS)
from ray_e5.generate.taxonomy import KINDS, bitext_target, language_weights, sample_placeholders


def content_id(*parts: Any) -> str:
    return digest(list(parts), 24)


@dataclass(frozen=True)
class Slot:
    index: int
    kind: str
    language: str
    tgt_language: str  # bitext only, else ""
    values: dict
    brainstorm: str  # "<kind>/<request number>" for asymmetric kinds, else ""
    pick: int  # which of the brainstormed tasks


def per_brainstorm(settings: GenerateSettings) -> int:
    return max(1, round(settings.tasks_per_brainstorm * settings.examples_per_task))


def plan_slots(settings: GenerateSettings) -> list[Slot]:
    kinds = [k for k, w in settings.mix.items() if w > 0]
    weights = [float(settings.mix[k]) for k in kinds]
    total = sum(weights)
    lang_w = language_weights(settings.english_share, settings.languages, settings.language_weights)
    langs, lw = list(lang_w), list(lang_w.values())
    current = [0.0] * len(kinds)
    seen = dict.fromkeys(kinds, 0)
    group = per_brainstorm(settings)
    slots = []
    for i in range(settings.num_examples):
        current = [c + w for c, w in zip(current, weights)]
        k = max(range(len(kinds)), key=lambda n: current[n])
        current[k] -= total
        kind = KINDS[kinds[k]]
        rng = random.Random(f"ray-e5/{settings.seed}/{i}")
        language = rng.choices(langs, lw)[0]
        values = sample_placeholders(kind, rng)
        tgt = bitext_target(language, rng, langs) if kind.name == "bitext" else ""
        brainstorm = f"{kind.name}/{seen[kind.name] // group}" if kind.brainstorm else ""
        seen[kind.name] += 1
        slots.append(Slot(i, kind.name, language, tgt, values, brainstorm, rng.randrange(1 << 30)))
    return slots


def brainstorm_requests(settings: GenerateSettings, slots: list[Slot]) -> list[dict]:
    """One request per brainstorm group the slots use (its id addresses its content)."""
    keys = sorted({s.brainstorm for s in slots if s.brainstorm}, key=lambda k: (k.split("/")[0], int(k.split("/")[1])))
    requests = []
    for key in keys:
        kind = key.split("/")[0]
        write = brainstorm_completion_prompt if settings.completion_style() else brainstorm_prompt
        prompt = write(kind, settings.tasks_per_brainstorm)
        requests.append({"id": content_id("brainstorm", settings.seed, key, prompt), "key": key, "kind": kind,
                         "prompt": prompt, "schema": json.dumps(BRAINSTORM_SCHEMA),
                         "max_tokens": settings.brainstorm_max_tokens})
    return requests


def expand(settings: GenerateSettings, slots: list[Slot], tasks: dict[str, list[str]]) -> tuple[list[dict], list[Slot]]:
    """Example requests for the slots whose task is known; also returns the slots still waiting for a brainstorm."""
    items, waiting = [], []
    for slot in slots:
        kind = KINDS[slot.kind]
        if kind.fixed_task:
            task = kind.fixed_task
        elif tasks.get(slot.brainstorm):
            pool = tasks[slot.brainstorm]
            task = pool[slot.pick % len(pool)]
        else:
            waiting.append(slot)
            continue
        if settings.completion_style():
            values = {**slot.values, "topic": TOPICS[slot.pick % len(TOPICS)]}
            prompt = completion_prompt(kind, task, slot.language, values, slot.tgt_language or None)
        else:
            prompt = example_prompt(kind, task, slot.language, slot.values, slot.tgt_language or None)
        items.append({"id": content_id("example", settings.seed, slot.index, prompt), "kind": slot.kind,
                      "task": task, "language": slot.language, "tgt_language": slot.tgt_language,
                      "prompt": prompt, "prompt_id": f"{slot.kind}/{PROMPT_VERSION}" + ("-completion" if settings.completion_style() else ""),
                      "schema": json.dumps(answer_schema(kind.output_keys)),
                      "max_tokens": settings.max_tokens_by_kind.get(slot.kind, settings.max_tokens)})
    return items, waiting
