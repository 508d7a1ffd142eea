"""Tiny random decoders for fast tests and benchmarks: a Mistral-shaped config and a tokenizer trained on the spot.

They exercise the exact code paths of a real 7B decoder (rotary positions, grouped-query attention, a BOS-only
tokenizer that does not append EOS) in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SAMPLE_CORPUS = [
    "A man is playing a guitar on the stage.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors that capture meaning.",
    "Retrieve documents that answer the question.",
    "Instruct: Given a web search query, retrieve relevant passages\nQuery: how do rockets work",
    "Large language models write synthetic training data.",
    "Contrastive learning pulls positives together and pushes negatives apart.",
]


def build_tokenizer(corpus: Iterable[str] = SAMPLE_CORPUS, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``corpus`` in milliseconds, shaped like Mistral's: ``<s>`` prepended,
    no EOS appended (the Embedder must append it), ``<pad>`` on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 4, trainer)
    # BOS only, as Mistral's tokenizer does: EOS must come from our code.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


def tiny_decoder(directory: str | Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random Mistral-architecture model and its tokenizer to ``directory`` (a loadable model dir)."""
    import torch
    from transformers import MistralConfig, MistralModel

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           architectures=["MistralForCausalLM"])
    torch.manual_seed(seed)
    MistralModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_gemma3(directory: str | Path, layers: int = 3) -> Path:
    """Write a random Gemma 3 text model (sliding and full attention layers) and its tokenizer to ``directory``."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tok = build_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                              sliding_window=16,
                              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    Gemma3TextModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def lora_embedder(directory: str | Path, top_layers: int | None, max_length: int = 128):
    """An Embedder of the tiny decoder at ``directory`` with mean pooling and LoRA (r 4, on the top ``top_layers``
    layers, or every layer when None), its B matrices drawn at random so the adapter changes the outputs (LoRA starts
    B at zero)."""
    import torch

    from ray_e5.config import LoraSettings
    from ray_e5.model import Embedder

    torch.manual_seed(0)
    embedder = Embedder.load(str(directory), pooling="mean", max_length=max_length,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0, top_layers=top_layers))
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return embedder
