"""slimfx.evaluation: metrics checked against hand-computable models, then on real fixtures."""
import math

import pytest
import torch
from torch import nn

from slimfx import eval_table as et
from slimfx import evaluation as ev
from slimfx import models
from slimfx.models import ByteTokenizer, tiny


class UniformLM(nn.Module):
    """Zero logits over `vocab` tokens: perplexity is exactly `vocab`. Records each call's length."""

    def __init__(self, vocab=256, as_dict=False):
        super().__init__()
        self.vocab, self.as_dict, self.lengths = vocab, as_dict, []

    def forward(self, input_ids, attention_mask):
        self.lengths.append(input_ids.shape[1])
        logits = torch.zeros(*input_ids.shape, self.vocab)
        return {"logits": logits} if self.as_dict else (logits,)


# ---------------------------------------------------------------- default_text

def test_default_text_is_stable_and_clean():
    text = ev.default_text()
    assert text == ev.default_text()
    assert len(text) > 10_000
    assert "\t" not in text and "\f" not in text and "\r" not in text and "\n\n\n" not in text


# ---------------------------------------------------------------- perplexity

@pytest.mark.parametrize("as_dict", [False, True])
def test_perplexity_of_uniform_model_is_vocab(as_dict):
    model = UniformLM(as_dict=as_dict)
    ppl = ev.perplexity(model, ByteTokenizer(), "x" * 100, window=32)
    assert ppl == pytest.approx(256.0, rel=1e-5)


def test_perplexity_windows_do_not_overlap_and_respect_max_tokens():
    model = UniformLM()
    ev.perplexity(model, ByteTokenizer(), "y" * 100, window=32)
    assert model.lengths == [32, 32, 32, 4]
    model.lengths.clear()
    ev.perplexity(model, ByteTokenizer(), "y" * 100, window=32, max_tokens=40)
    assert model.lengths == [32, 8]


def test_perplexity_is_token_weighted():
    # Right after "a" the model is certain of "b"; elsewhere it is uniform over 256.
    class Peaked(nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 256)
            logits[..., ord("b")] = torch.where(input_ids == ord("a"), 1e4, 0.0)
            return (logits,)

    ppl = ev.perplexity(Peaked(), ByteTokenizer(), "ab" * 8 + "zzz", window=64)
    # 18 predictions: 8 certain ("a"->"b"), 10 uniform.
    assert ppl == pytest.approx(math.exp(10 * math.log(256) / 18), rel=1e-4)


def test_a_perplexity_past_floats_range_is_infinite():
    """A mean NLL over 709 (a broken model) raised OverflowError from math.exp."""
    class Sure(nn.Module):  # certain of token 0, and the text never has it
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 256)
            logits[..., 0] = 1e4
            return (logits,)

    assert ev.perplexity(Sure(), ByteTokenizer(), "x" * 40, window=32) == math.inf


def test_perplexity_rejects_short_text():
    with pytest.raises(ValueError, match="at least 2"):
        ev.perplexity(UniformLM(), ByteTokenizer(), "x")


def test_perplexity_of_random_tiny_model_is_near_vocab():
    lm = models.tiny("llama")
    ppl = ev.perplexity(lm.model, lm.tokenizer, ev.default_text(), window=64, max_tokens=256)
    assert 100 < ppl < 600  # random init: close to uniform over 256 bytes


# ---------------------------------------------------------------- embeddings

def test_embed_ignores_padding():
    lm = models.tiny("bert")
    alone = ev.embed(lm.model, lm.tokenizer, ["short"])
    batched = ev.embed(lm.model, lm.tokenizer, ["short", "a considerably longer sentence"])
    assert batched.shape == (2, 64)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_embedding_cosine_self_and_other():
    a, b = models.tiny("bert", seed=0), models.tiny("bert", seed=1)
    texts = ["one", "two words", "three little words"]
    assert ev.embedding_cosine(a.model, a.model, a.tokenizer, texts) == pytest.approx(1, abs=1e-6)
    assert ev.embedding_cosine(a.model, b.model, a.tokenizer, texts) < 0.999


def test_a_model_that_takes_no_mask_embeds_each_text_alone():
    """An artifact captured from input_ids alone read the pads of a padded batch as tokens: the
    empty policy's embedding cosine to the original was 0.82 on MiniLM."""
    import slimfx

    lm = models.tiny("bert")
    cm = slimfx.compile(lm.model, "", example_inputs={"input_ids": lm.example_inputs["input_ids"]})
    assert cm.input_names == ("input_ids",)
    texts = ["one", "two longer words here", "three"]
    assert ev.embedding_cosine(lm.model, cm, lm.tokenizer, texts) == pytest.approx(1, abs=1e-6)


def test_a_masked_lm_is_embedded_by_its_pooled_per_token_logits():
    """A folder of BertForMaskedLM (what bert-base-uncased names) raised "cannot find
    'last_hidden_state' in a model output of type MaskedLMOutput"."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64)).eval()
    tok = ByteTokenizer()
    texts = ["short", "a considerably longer text"]
    pooled = ev.embed(model, tok, texts)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    mask = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(pooled, (logits * mask).sum(1) / mask.sum(1))


def test_embed_drops_inputs_the_model_does_not_take():
    lm = models.tiny("distilbert")  # forward has no token_type_ids

    class WithTypes(ByteTokenizer):
        def __call__(self, texts, **kw):
            enc = super().__call__(texts, **kw)
            return {**enc, "token_type_ids": torch.zeros_like(enc["input_ids"])}

    assert ev.embed(lm.model, WithTypes(), ["hi", "there"]).shape == (2, 64)


# ---------------------------------------------------------------- cost

def test_param_bytes_counts_buffers_and_dtypes():
    lin = nn.Linear(4, 3)
    assert ev.param_bytes(lin) == (12 + 3) * 4
    lin.register_buffer("scale", torch.ones(5, dtype=torch.float16))
    assert ev.param_bytes(lin) == (12 + 3) * 4 + 5 * 2
    assert ev.param_bytes(nn.Linear(4, 3).half()) == (12 + 3) * 2


def test_param_bytes_counts_tied_and_shared_storage_once():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    net[1].weight = net[0].weight  # tied, as in LM heads
    assert ev.param_bytes(net) == 10 * 4 * 4
    base = torch.zeros(8)
    holder = nn.Module()
    holder.register_buffer("a", base[:4])
    holder.register_buffer("b", base[4:])  # two views of one storage
    assert ev.param_bytes(holder) == 8 * 4


def test_param_bytes_meta_tensors_count_their_size():
    with torch.device("meta"):
        lin = nn.Linear(4, 3)
    assert ev.param_bytes(lin) == (12 + 3) * 4


def test_paired_latencies_take_turns_call_by_call():
    """Timed one model after the other, a load between them moved one model's time only
    (`slimfx eval` gave ×0.17 for models ×0.56 apart on a shared machine)."""
    import time

    calls = []

    def model(name, seconds):
        def run(x):
            calls.append(name)
            time.sleep(seconds)
        return run

    fast, slow = ev.paired_latency_ms([(model("a", 0.001), torch.zeros(1)), (model("b", 0.004), torch.zeros(1))],
                                      repeats=4, warmup=1)
    assert calls == ["a", "b"] * 5
    assert 1 <= fast < slow and slow >= 4


def test_latency_ms_accepts_dict_tuple_tensor():
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    for inputs in ({"input": x}, (x,), x):
        ms = ev.latency_ms(lin, inputs, repeats=3, warmup=1)
        assert isinstance(ms, float) and ms > 0
    with pytest.raises(ValueError):
        ev.latency_ms(lin, x, repeats=0)


# ---------------------------------------------------------------- real fixtures

@pytest.mark.realmodel
def test_smollm2_perplexity_in_the_tens():
    lm = models.load("smollm2-135m")
    ppl = ev.perplexity(lm.model, lm.tokenizer, ev.default_text(), window=256, max_tokens=512)
    print(f"SmolLM2-135M-Instruct perplexity on default_text (512 tokens): {ppl:.2f}")
    assert 3 < ppl < 100


@pytest.mark.realmodel
def test_minilm_embedding_cosine():
    lm = models.load("minilm-l6")
    texts = ["The cat sits on the mat.", "Stock markets fell sharply today."]
    self_cos = ev.embedding_cosine(lm.model, lm.model, lm.tokenizer, texts)
    assert self_cos == pytest.approx(1.0, abs=1e-6)
    cat, paraphrase, stocks = ev.embed(lm.model, lm.tokenizer, [
        "The cat sits on the mat.", "A cat is sitting on a mat.", texts[1]])
    near = torch.cosine_similarity(cat, paraphrase, dim=0)
    far = torch.cosine_similarity(cat, stocks, dim=0)
    assert far < near < 1


def test_perplexity_takes_windows_the_model_has_positions_for():
    """perplexity(tiny gpt2) raised an IndexError from the embedding lookup: its default window of
    256 tokens is longer than the 128 positions. The default fits the model now; a window asked
    for beyond them is refused by name."""
    from slimfx.evaluation import perplexity

    lm = tiny("gpt2")
    text = ev.default_text()
    assert perplexity(lm.model, lm.tokenizer, text, max_tokens=300) == perplexity(
        lm.model, lm.tokenizer, text, window=128, max_tokens=300)
    with pytest.raises(ValueError, match=r"window=256 is longer than the 128 positions GPT2LMHeadModel takes.*window=128"):
        perplexity(lm.model, lm.tokenizer, text, window=256, max_tokens=300)


# ---------------------------------------------------------------- token rules with restore=false

def _padded(texts):
    return dict(ByteTokenizer()(texts, padding=True, return_tensors="pt"))


def test_embed_pools_a_shortened_output_by_the_sizes_of_its_kept_tokens():
    """restore=false returns [B, L', D] (merged tokens): pooling them with the input's [B, S] mask
    raised a size mismatch. Mean pooling weighted by kept_tokens' sizes equals mean pooling of the
    restore=true output (each position the final value of the token it merged into)."""
    import slimfx

    lm = tiny("bert", layers=3)
    texts = ["a considerably longer sentence", "short", "twelve chars"]
    example = _padded(texts)
    rule = "tokens after blocks[0:2] merge ratio=0.5 restore={}"
    short, full = (slimfx.compile(lm.model, rule.format(r), example_inputs=example, calib=[example])
                   for r in ("false", "true"))
    got = ev.embed(short, lm.tokenizer, texts)
    torch.testing.assert_close(got, ev.embed(full, lm.tokenizer, texts), atol=1e-5, rtol=1e-5)
    # ... and against the kept tokens directly
    with torch.no_grad():
        hidden = short(**example).last_hidden_state
    sizes = short.kept_tokens["sizes"]
    assert hidden.shape[1] < example["input_ids"].shape[1]
    torch.testing.assert_close(got, (hidden * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True))
    assert ev.embedding_cosine(lm.model, short, lm.tokenizer, texts) < 0.9999  # it did merge


def test_merging_exact_twins_with_proportional_attention_loses_nothing_in_the_embedding():
    """Without position embeddings a BERT is permutation-equivariant: two equal input bytes stay
    equal in every block. Texts of byte pairs ("aabb…") with ratio=0.5 merge each byte into its twin
    (A = even slots, B = odd ones), and prop_attn makes the merged key attend like its two copies,
    so the size-weighted pooling of the shorter output equals the original's mean pooling."""
    import slimfx

    lm = tiny("bert", layers=3)
    with torch.no_grad():
        lm.model.embeddings.position_embeddings.weight.zero_()
    texts = ["aabbccdd", "eeff", "gghhiijjkkll"]
    example = _padded(texts)
    cm = slimfx.compile(lm.model, "tokens after blocks[0] merge ratio=0.5 prop_attn=true protect=none",
                        example_inputs=example, calib=[example])
    got = ev.embed(cm, lm.tokenizer, texts)
    assert cm.kept_tokens["sizes"].max() == 2 and cm.kept_tokens["sizes"].shape[1] == 6  # 12 → 6
    torch.testing.assert_close(got, ev.embed(lm.model, lm.tokenizer, texts), atol=1e-5, rtol=1e-5)


def test_perplexity_of_a_decoder_that_returns_fewer_positions_is_refused_with_the_way_out():
    """A pruned decoder with restore=false returns logits of the kept positions only: scoring them
    against every next token raised a batch-size mismatch, and scoring the kept ones alone would
    compare a subset the model chose with the original's every position. Refused, saying so."""
    import slimfx

    lm = tiny("llama", layers=2)
    example = {"input_ids": torch.randint(3, 200, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    rule = "tokens after blocks[0] prune keep=0.5 restore={}"
    short, full = (slimfx.compile(lm.model, rule.format(r), example_inputs=example, calib=[example])
                   for r in ("false", "true"))
    with pytest.raises(ValueError, match="restore=true"):
        ev.perplexity(short, lm.tokenizer, ev.default_text(), window=32, max_tokens=64)
    assert math.isfinite(ev.perplexity(full, lm.tokenizer, ev.default_text(), window=32, max_tokens=64))
    scored = []  # the eval table refuses it before it scores the original, not after
    real = ev.perplexity
    with pytest.MonkeyPatch.context() as m:
        m.setattr(et, "perplexity", lambda model, *a, **k: scored.append(model) or real(model, *a, **k))
        with pytest.raises(ValueError, match="restore=true"):
            et.eval_rows(lm, short, max_tokens=64)
    assert scored == [short]
    assert [r["model"] for r in et.eval_rows(lm, full, max_tokens=64)] == ["original", "compiled"]


# ---------------------------------------------------------------- vision

def test_logit_cosine_is_the_mean_cosine_of_each_images_logits():
    """Checked against the formula on logits computed here: 1 for the model itself, −1 for the same
    model with its classifier negated, and a direct per-image mean for a perturbed copy."""
    import copy

    lm = tiny("vit")
    images = ev.vision_images(lm.example_inputs)
    assert images.shape[0] == ev.VISION_IMAGES and images.shape[1:] == lm.example_inputs["pixel_values"].shape[1:]
    assert torch.equal(images, ev.vision_images(lm.example_inputs)), "seeded: the same images every run"
    assert ev.logit_cosine(lm.model, lm.model, images) == pytest.approx(1.0)
    flipped, moved = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    with torch.no_grad():
        flipped.classifier.weight.neg_(), flipped.classifier.bias.neg_()
        torch.manual_seed(0)
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        a, b = lm.model(pixel_values=images).logits.double(), moved(pixel_values=images).logits.double()
    assert ev.logit_cosine(lm.model, flipped, images) == pytest.approx(-1.0)
    want = sum(float(x @ y / (x.norm() * y.norm())) for x, y in zip(a, b)) / len(a)
    assert ev.logit_cosine(lm.model, moved, images) == pytest.approx(want) and want < 0.999


@pytest.mark.parametrize("max_tokens", [-1, 0, 1])
def test_perplexity_refuses_max_tokens_below_two(max_tokens):
    """A negative max_tokens sliced tokens off the end of the text, silently."""
    with pytest.raises(ValueError, match=f"max_tokens must be at least 2 tokens, got {max_tokens}"):
        ev.perplexity(UniformLM(), ByteTokenizer(), "y" * 100, window=32, max_tokens=max_tokens)


def test_a_compiled_model_takes_its_originals_default_window(tmp_path):
    """A CompiledModel has no config: its window was 256 where the original's (128 positions) was
    128, so the int4 model scored better than fp32; a GPT-2 of 128 positions failed."""
    import slimfx

    for arch in ("llama", "gpt2"):
        lm = tiny(arch)
        cm = slimfx.compile(lm, "quantize blocks.*.** : Linear int8")
        cm.save(tmp_path / arch)
        for m in (cm, slimfx.load(tmp_path / arch)):
            assert ev.default_window(m) == ev.default_window(lm.model) == 128
        ev.perplexity(cm, lm.tokenizer, ev.eval_text(), max_tokens=300)  # GPT-2: an IndexError past 128 positions


def test_a_nan_perplexity_stays_nan():
    class Broken(nn.Module):
        def forward(self, input_ids, attention_mask):
            return (torch.full((*input_ids.shape, 256), math.nan),)

    assert math.isnan(ev.perplexity(Broken(), ByteTokenizer(), "x" * 40, window=32))


@pytest.mark.parametrize("flag, value", [("output_hidden_states", True), ("return_dict", False)])
def test_a_model_compiled_with_a_flag_a_call_must_repeat_is_scored(flag, value):
    """Such a flag may not be left out of a call (tests/runtime/test_call_inputs_flags.py), and
    perplexity() left it out: refused."""
    import slimfx

    lm = tiny("llama")
    cm = slimfx.compile(lm.model, "", example_inputs={**lm.example_inputs, flag: value})
    text = "hello world, this is some text " * 20
    assert ev.perplexity(cm, lm.tokenizer, text, window=16) == pytest.approx(
        ev.perplexity(lm.model, lm.tokenizer, text, window=16), rel=1e-5)
