"""The in-process writer (``generate.backend: transformers``): a small causal LM (default: the packaged Gemma 3
270M, dequantised once) sampling whole batches of completion-style prompts in one Ray actor, no server.

Why a decode loop of our own rather than ``model.generate``: on a CPU the writer's cost is the vocabulary (Gemma's
262k tokens) more than the 270M weights. ``generate`` samples with top-p by sorting the whole vocabulary for every
sequence at every step, and keeps finished sequences in the batch until the longest one ends; on this model that
was most of the time (a full sort of 16 x 262k scores costs more than the 18 layers' forward pass). Here each step
takes the top-k candidates first (``torch.topk``), applies temperature and top-p among those, and drops the
sequences that finished from the batch and its KV cache (``Cache.batch_select_indices``), so a batch costs what
its answers are long. A batch holds prompts of one kind, whose worked example is most of each prompt: that shared
prefix is computed once and its KV cache repeated for every row. transformers' continuous batching (``generate_batch``) targets GPUs and measured several
times slower on CPU; llama-cpp-python's server decodes one sequence at a time. See ``bench/bench_writer.py``.

An answer ends at its first newline (the completion prompts ask for one JSON line) or at its ``max_tokens``
(``finish_reason`` ``length``), as the OpenAI-compatible backends report it.
"""

from __future__ import annotations

from dataclasses import dataclass

# llama.cpp's default sampler chain (llama-cpp-python's create_completion): the top 40 candidates, then min-p 0.05
# (a token at least 5% as likely as the best one), then top-p. The min-p cut matters for a 270M writer: without it
# the tail of the distribution makes answers run on past their JSON line (measured: 3x more cut at max_tokens).
# Its server's repetition penalty too: the logits of the last 64 tokens' ids divided by 1.1 (multiplied when
# negative), which keeps a small writer out of loops ("This is what she is eating. This is what she is ...") that
# run to max_tokens.
TOP_K = 40
MIN_P = 0.05
REPEAT_PENALTY = 1.1
REPEAT_LAST_N = 64
MIN_SHARED_PREFIX = 16  # tokens a batch's prompts must share before their prefix is computed once


@dataclass
class Sampled:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a newline, or whole by ``complete``), "length", or "deadline" (not finished)


class BatchedSampler:
    """A causal LM and its tokenizer, sampling batches of prompts (left-padded) until each answer's newline."""

    def __init__(self, model: str, threads: int | None = None, dtype: str = "auto", seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ray_e5.model.precision import cpu_has_native_bf16
        from ray_e5.model.references import resolve_backbone

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        path = resolve_backbone(model).path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if dtype == "auto":
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        vocab = self.tokenizer.get_vocab()
        # Every token that writes a newline ends an answer (the tokenizer has many: "\n", "\n\n", ".\n", ...).
        stops = {i for t, i in vocab.items() if "\n" in self.tokenizer.convert_tokens_to_string([t])}
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        self.stop_ids = torch.tensor(sorted(stops), dtype=torch.long)
        # A token that may close the answer's JSON object: the caller's ``complete`` is asked whether it did.
        self.close_ids = torch.tensor(sorted(i for t, i in vocab.items()
                                             if "}" in self.tokenizer.convert_tokens_to_string([t])), dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def _pick(self, logits, temperature: float, top_p: float, recent=None):
        import torch

        if recent is not None and REPEAT_PENALTY != 1:
            logits = logits.float()
            seen = logits.gather(-1, recent)
            logits = logits.scatter(-1, recent, torch.where(seen > 0, seen / REPEAT_PENALTY, seen * REPEAT_PENALTY))
        if temperature <= 0:
            return logits.argmax(-1)
        scores, ids = torch.topk(logits.float(), min(TOP_K, logits.shape[-1]), dim=-1)
        probs = torch.softmax(scores / temperature, dim=-1)
        probs = torch.where(probs >= MIN_P * probs[:, :1], probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
        if top_p < 1:
            keep = probs.cumsum(-1) - probs < top_p  # the smallest prefix reaching top_p (the first always kept)
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return ids.gather(-1, choice).squeeze(-1)

    def _prefill(self, ids: list[list[int]]):
        """The prompts' forward pass. Their longest common prefix (a kind's worked example: most of each prompt)
        is computed once and its KV cache repeated for every row; the rest, left-padded, follows it, so the pads
        sit between the shared prefix and each prompt's own tail (masked, and skipped by the position ids).
        Returns the model's output (last logits, cache), the attention mask and each row's last position."""
        import torch

        shared = 0
        if len(ids) > 1:
            limit = min(len(x) for x in ids) - 1
            while shared < limit and all(x[shared] == ids[0][shared] for x in ids):
                shared += 1
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        tails = [x[shared:] for x in ids]
        width = max(len(t) for t in tails)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, tail in enumerate(tails):
            input_ids[row, width - len(tail):] = torch.tensor(tail)
            tail_mask[row, width - len(tail):] = 1
        positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if shared:
            cache = self.model(input_ids=torch.tensor([ids[0][:shared]]), use_cache=True,
                               logits_to_keep=1).cache
            cache.batch_repeat_interleave(len(ids))
        mask = torch.cat([torch.ones((len(ids), shared), dtype=torch.long), tail_mask], dim=-1)
        result = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, logits_to_keep=1)
        return result, mask, positions[:, -1]

    def sample(self, prompts: list[str], max_tokens: list[int], temperature: float = 1.0, top_p: float = 1.0,
               complete=None, deadline: float | None = None) -> list[Sampled]:
        """Sample one answer per prompt. ``complete(i, text)``: whether answer ``i`` is whole once it wrote a
        closing brace (it then ends there, as at a newline); ``deadline`` (``time.time()``): the answers still
        being written then end with ``finish_reason`` "deadline"."""
        import time

        import torch

        ids = self.tokenizer(prompts)["input_ids"]
        limits = torch.tensor(max_tokens, dtype=torch.long)
        prompt_tokens = [len(x) for x in ids]
        out: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        alive = torch.arange(len(prompts))  # the original index of each row still in the batch
        with torch.inference_mode():
            result, mask, last = self._prefill(ids)
            cache = result.cache
            # the window the repetition penalty looks at: each prompt's last tokens
            recent = torch.tensor([([self.pad_id] * REPEAT_LAST_N + x)[-REPEAT_LAST_N:] for x in ids])
            step = 0
            while len(alive):
                tokens = self._pick(result.logits[:, -1, :], temperature, top_p, recent)
                recent = torch.cat([recent[:, 1:], tokens[:, None]], dim=-1)
                step += 1
                stopped = torch.isin(tokens, self.stop_ids)
                closing = torch.isin(tokens, self.close_ids).tolist() if complete is not None else None
                for row, (index, token, stop) in enumerate(zip(alive.tolist(), tokens.tolist(), stopped.tolist())):
                    if stop:
                        reasons[index] = "stop"
                        continue
                    out[index].append(token)
                    if closing is not None and closing[row] and complete(index, self.tokenizer.decode(out[index])):
                        reasons[index] = "stop"
                        stopped[row] = True
                done = stopped | (step >= limits[alive])
                if deadline is not None and time.time() > deadline:
                    for index in alive[~done].tolist():
                        reasons[index] = "deadline"
                    break
                if bool(done.any()):
                    keep = (~done).nonzero().squeeze(-1)
                    if len(keep) == 0:
                        break
                    cache.batch_select_indices(keep)
                    alive, tokens, mask, last, recent = alive[keep], tokens[keep], mask[keep], last[keep], recent[keep]
                mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=mask.dtype)], dim=-1)
                last = last + 1
                result = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                                    cache=cache, use_cache=True)
        return [Sampled(self.tokenizer.decode(ids, skip_special_tokens=True), prompt_tokens[i],
                        len(ids) + (reasons[i] == "stop"), reasons[i]) for i, ids in enumerate(out)]
