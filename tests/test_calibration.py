"""compile(calib=...) accepts the forms a user passes (ids tensor, batches, dicts, texts, a file),
refuses anything else with the list of forms, and the default never overlaps `slimfx eval`'s text."""
import pytest
import torch

import slimfx
from slimfx.calibration import (BATCH_SIZE, DEFAULT_TOKENS, MAX_TOKENS, builtin_token_count, calibration_batches,
                                read_paragraphs)
from slimfx.evaluation import calibration_texts, default_text, eval_text
from slimfx.models import load, tiny

from renamed_ids import RenamedIds

GPTQ = "policy p {\n    quantize blocks.*.** : Linear int4 method=gptq\n}\n"


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def ids(*shape):
    return torch.randint(3, 200, shape)


def test_every_accepted_form_becomes_named_batches(llama, tmp_path):
    t = ids(2, 7)
    assert calibration_batches(llama, t)[0]["input_ids"] is t
    assert calibration_batches(llama, ids(7))[0]["input_ids"].shape == (1, 7)
    assert [b["input_ids"].shape for b in calibration_batches(llama, [ids(1, 5), ids(3, 4)])] == [(1, 5), (3, 4)]
    assert calibration_batches(llama, {"input_ids": t})[0]["input_ids"] is t
    texts = [f"paragraph number {i} of the calibration text" for i in range(6)]
    batches = calibration_batches(llama, texts)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 4  # four texts per batch
    f = tmp_path / "calib.txt"
    f.write_text("\n\n".join(texts) + "\n\n\n")
    assert read_paragraphs(f) == texts
    assert [b["input_ids"].tolist() for b in calibration_batches(llama, str(f))] == \
        [b["input_ids"].tolist() for b in batches]


def test_a_byte_order_mark_is_no_text_and_a_line_of_spaces_separates_paragraphs(tmp_path):
    """The mark stayed as a character of the first paragraph, and `a\\n \\nb` was one paragraph."""
    f = tmp_path / "calib.txt"
    f.write_bytes("\ufeffFirst paragraph\n \t\nsecond one\r\n\r\nthird".encode("utf-8"))
    assert read_paragraphs(f) == ["First paragraph", "second one", "third"]


def test_a_text_file_is_named_by_what_it_is_for_and_its_whitespace_normalized(tmp_path):
    f = tmp_path / "news.txt"
    f.write_text("one\n  two\tthree\n\n\n\nfour   five\n")
    assert read_paragraphs(f, what="eval text") == ["one two three", "four five"]
    with pytest.raises(ValueError, match=r"^cannot read eval text .*missing.txt.*No such file") as e:
        read_paragraphs(tmp_path / "missing.txt", what="eval text")
    assert "list of strings" not in str(e.value)  # that hint is for compile(calib="…") only
    with pytest.raises(ValueError, match="list of strings"):
        calibration_batches(tiny("llama"), str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(ValueError, match=r"^eval text .*blank.txt' is empty"):
        read_paragraphs(tmp_path / "blank.txt", what="eval text")


@pytest.mark.parametrize("bad, says", [(3.0, "got float"), (True, "got bool"), ([3], "calib[0] is a int"),
                                       (torch.randn(2, 4), "token ids"), ({"input_ids": [1, 2]}, "not tensors"),
                                       # a mask in the ids' place compiled on ids that were all 1
                                       (torch.ones(2, 4, dtype=torch.bool), "token ids")])
def test_anything_else_is_a_type_error_that_lists_the_accepted_forms(llama, bad, says):
    with pytest.raises(TypeError) as e:
        calibration_batches(llama, bad)
    assert says in str(e.value)


def test_a_tensor_or_a_mask_less_batch_calibrates_a_compile(llama):
    """The ids tensor gets the attention mask the graph takes, filled as the model would."""
    a = slimfx.compile(llama.model, GPTQ, example_inputs=llama.example_inputs, calib=ids(2, 9))
    b = slimfx.compile(llama.model, GPTQ, example_inputs=llama.example_inputs,
                       calib=[{"input_ids": ids(2, 9).fill_(5), "attention_mask": torch.ones(2, 9, dtype=torch.long)}])
    assert a.report.rules[0].details["calib_tokens"] == 18 == b.report.rules[0].details["calib_tokens"]


class _Tokens(torch.nn.Module):
    """Token ids called `tokens`, no tokenizer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(200, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_tensor_calibrates_a_model_whose_ids_have_another_name():
    """A bare tensor became {'input_ids': …}: a TypeError from inside the pass ("missing ['tokens']")."""
    model, calib = _Tokens().eval(), ids(4, 8)
    by_tensor = slimfx.compile(model, GPTQ, example_inputs=ids(2, 8), calib=[calib])
    by_name = slimfx.compile(model, GPTQ, example_inputs=ids(2, 8), calib=[{"tokens": calib}])
    assert by_tensor.report.rules[0].details["calib_tokens"] == 32
    assert by_tensor.report.calibration == "32 tokens in 4 rows"  # "4 rows in 1 batch": no `input_ids`
    one, other = by_tensor.state_dict(), by_name.state_dict()
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    with pytest.raises(ValueError, match="calib batch 0 holds token id -1"):
        slimfx.compile(model, GPTQ, example_inputs=ids(2, 8), calib=torch.full((1, 4), -1))
    with pytest.raises(TypeError, match="a tensor, or a list of dicts of the model's inputs"):
        slimfx.compile(model, GPTQ, example_inputs=ids(2, 8), calib=["some text"])
    # blocks that are Linears themselves: a KeyError in the view of the blocks left, before the refusal
    with pytest.raises(slimfx.SpecError, match="blocks do not pass it on"):
        slimfx.plan(model, "drop blocks[0]", example_inputs=ids(2, 8))


def test_a_drop_measures_its_latency_on_ids_of_another_name(llama):
    """It ran the calibration batch as it was and reported 0 tokens."""
    model = RenamedIds(llama.model).eval()
    example = {"tokens": llama.example_inputs["input_ids"], "attention_mask": llama.example_inputs["attention_mask"]}
    drop = slimfx.compile(model, "drop blocks[1]", example_inputs=example, calib=[example])
    assert drop.report.rules[0].details["latency_tokens"] == 256


@pytest.mark.parametrize("calib, says", [
    ([""], "all empty or whitespace"),
    (["  ", "\n"], "calib holds 2 text(s), all empty"),
    (torch.full((1, 8), 100000), "calib batch 0 holds token id 100000, outside the model's vocabulary (0..255)"),
    ([ids(1, 4), torch.full((1, 3), -1)], "calib batch 1 holds token id -1"),
    (torch.zeros(1, 0, dtype=torch.long), "calib batch 0 has input_ids of shape (1, 0): no tokens"),
])
def test_calibration_that_cannot_run_is_refused_by_batch(llama, calib, says):
    """Each reached torch: "cannot reshape tensor of 0 elements", "index out of range in self"."""
    with pytest.raises(ValueError) as e:
        calibration_batches(llama, calib)
    assert says in str(e.value)


@pytest.mark.parametrize("model", ["compiled", "hand-written"])
def test_ids_past_the_embedding_table_are_refused_for_a_model_without_a_config(llama, model):
    """A CompiledModel or one's own module has no config.vocab_size: the ids reached the embedding
    inside the pass, a bare IndexError. The table's rows are the vocabulary."""
    if model == "compiled":
        m, rows, call = slimfx.compile(llama), 256, {}
    else:
        m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
        rows, call = 50, {"example_inputs": {"input": torch.randint(0, 50, (2, 8))}}
    with pytest.raises(ValueError) as e:
        slimfx.compile(m, "quantize ** : Linear int8 method=gptq", calib=[torch.full((2, 8), rows)], **call)
    assert f"holds token id {rows}, outside the model's vocabulary (0..{rows - 1})" in str(e.value)


TEXTS = ["The quick brown fox jumps over the lazy dog again and again.", "hi", "short one", "a b", "c d"]


def test_texts_for_a_model_without_a_mask_are_batched_only_with_rows_of_their_length():
    """Padded together, an encoder captured without attention_mask attended to the padding as
    text: GPTQ on four texts changed 18 of 51 tensors against calibrating each text alone."""
    bert = tiny("bert")
    example = {"input_ids": torch.randint(3, 250, (2, 8))}  # no mask
    batches = calibration_batches(bert, TEXTS, masked=False)
    assert all(bool(b["attention_mask"].all()) for b in batches)  # no padding left in any batch
    assert sorted(int(n) for b in batches for n in b["attention_mask"].sum(1)) == \
        sorted(int(bert.encode([t])["attention_mask"].sum()) for t in TEXTS)
    policy = "quantize blocks.*.** : Linear int4 group=32 method=gptq"
    together = slimfx.compile(bert, policy, example_inputs=example, calib=TEXTS).state_dict()
    alone = slimfx.compile(bert, policy, example_inputs=example, calib=[bert.encode([t]) for t in TEXTS]).state_dict()
    assert all(torch.equal(together[k], alone[k]) for k in together)
    # with a mask the rows are padded together as before (it tells padding from text)
    assert any(not bool(b["attention_mask"].all()) for b in calibration_batches(bert, TEXTS))


def test_an_empty_text_among_others_is_left_out(llama):
    assert [b["input_ids"].tolist() for b in calibration_batches(llama, ["", "some text", " "])] == \
        [b["input_ids"].tolist() for b in calibration_batches(llama, ["some text"])]


def test_texts_need_a_model_that_knows_its_tokenizer(llama):
    with pytest.raises(TypeError, match="slimfx.models.load"):
        slimfx.compile(llama.model, GPTQ, example_inputs=llama.example_inputs, calib=["some text"])


def test_a_missing_calibration_file_says_how_strings_are_read(llama):
    with pytest.raises(ValueError, match="one string is read as a file path"):
        calibration_batches(llama, "no such file.txt")


def test_default_calibration_never_overlaps_the_scored_text():
    scored, calib = eval_text(), calibration_texts()
    assert len(calib) >= 16 and len(scored) > 10_000
    assert not any(p in scored for p in calib)
    assert default_text().startswith(scored)


def _real_rows(batches) -> list[list[int]]:
    return [row[mask.bool()].tolist() for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]


def test_a_long_text_goes_on_in_further_rows_none_of_it_dropped(llama):
    """Byte tokens: a 300-character text is rows of 128, 128 and 44, in order; batches of four
    rows, each only as wide as its longest row."""
    long, short = "x" * 100 + "y" * 100 + "z" * 100, "a short one"
    batches = calibration_batches(llama, [long, short, long])
    rows = _real_rows(batches)
    assert [len(r) for r in rows] == [128, 128, 44, len(short), 128, 128, 44]
    assert bytes(sum(rows[:3], [])).decode() == long and bytes(rows[3]).decode() == short
    assert [b["input_ids"].shape for b in batches] == [(BATCH_SIZE, 128), (3, 128)]
    tail = calibration_batches(llama, [long[:200] + "!" * 56, short])  # rows of 128, 128, 11
    assert [b["input_ids"].shape for b in tail] == [(3, 128)]
    only_short = calibration_batches(llama, [short, short + "!"])
    assert only_short[0]["input_ids"].shape == (2, len(short) + 1)  # no all-padding columns


def test_every_row_of_a_real_tokenizer_keeps_its_special_tokens():
    """BERT's rows each begin with [CLS] and end with [SEP], the overflow rows too."""
    lm = load("minilm-l6")
    text = " ".join(calibration_texts())  # far longer than one row
    batches = calibration_batches(lm, [text])
    rows = _real_rows(batches)
    assert len(rows) > 3 and all(len(r) <= MAX_TOKENS for r in rows)
    cls, sep = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
    assert all(r[0] == cls and r[-1] == sep for r in rows)
    words = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum((r[1:-1] for r in rows), []) == words  # every token once, in order


def test_the_default_is_every_row_of_the_calibration_text_up_to_its_cap(llama):
    batches = calibration_batches(llama, None)
    rows = _real_rows(batches)
    assert sum(map(len, rows)) == DEFAULT_TOKENS and all(len(r) == MAX_TOKENS for r in rows)
    text = "\n\n".join(calibration_texts(min_words=0)).encode()
    assert bytes(sum(rows, [])) == text[:DEFAULT_TOKENS]  # the text's first tokens, in order


def test_a_number_of_tokens_is_the_default_text_and_then_more_built_in_text(llama):
    """calib=DEFAULT_TOKENS is the default's rows exactly; a larger N goes on into more_text.py's
    docstrings, whole rows up to the one that reaches N."""
    from slimfx.more_text import more_texts

    default = calibration_batches(llama, None)
    same = calibration_batches(llama, DEFAULT_TOKENS)
    assert [b["input_ids"].tolist() for b in same] == [b["input_ids"].tolist() for b in default]
    rows = _real_rows(calibration_batches(llama, 5000))
    assert 5000 <= sum(map(len, rows)) < 5000 + MAX_TOKENS
    text = "\n\n".join([*calibration_texts(min_words=0), *more_texts()]).encode()
    assert bytes(sum(rows, [])) == text[:sum(map(len, rows))]
    assert builtin_token_count(llama) == len(text)  # byte tokens: one per byte


def test_a_number_of_tokens_encodes_the_built_in_text_once(llama, monkeypatch):
    """It is ~226k tokens of SmolLM2's: the range check reads its count off the rows it batches."""
    calls = []
    encode = type(llama).encode
    monkeypatch.setattr(type(llama), "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    calibration_batches(llama, 5000)
    assert len(calls) == 1


@pytest.mark.parametrize("tokens", [MAX_TOKENS - 1, 0, -5, 10**9])
def test_a_number_of_tokens_outside_the_built_in_text_says_the_range(llama, tokens):
    with pytest.raises(ValueError, match=f"ask for {MAX_TOKENS} to {builtin_token_count(llama)}"):
        calibration_batches(llama, tokens)


def test_a_number_of_tokens_needs_a_model_that_knows_its_tokenizer(llama):
    with pytest.raises(TypeError, match="slimfx.models.load"):
        slimfx.compile(llama.model, GPTQ, example_inputs=llama.example_inputs, calib=1000)


def test_a_tokenizer_that_cannot_go_on_in_further_rows_is_refused(llama):
    """A slow tokenizer returns the overflow apart instead of as rows: refused, not truncated."""
    import dataclasses

    class Slow:
        def __call__(self, texts, **kwargs):
            out = llama.tokenizer(texts, **kwargs)
            out.pop("overflow_to_sample_mapping", None)
            return out

    slow = dataclasses.replace(llama, tokenizer=Slow())
    with pytest.raises(ValueError, match="cannot go on with a long text in further rows; pass texts of at most 128"):
        calibration_batches(slow, ["x" * 300])


def test_calibration_batches_are_cast_and_checked_as_a_call_is(llama):
    """A bool or int32 mask, or int32 ids, are cast as the compiled model's call casts them (a
    GPTQ rule raised 'Tensor dtype mismatch' from inside the graph); a missing or misshapen input
    is refused by name when a pass reads the batches (a KeyError or a guard's AssertionError
    before)."""
    t = ids(2, 7)
    cast = [{"input_ids": t, "attention_mask": torch.ones_like(t, dtype=torch.bool)}, {"input_ids": t.int()}]
    plain = [{"input_ids": t, "attention_mask": torch.ones_like(t)}] * 2
    a = slimfx.compile(llama, GPTQ, calib=cast)
    b = slimfx.compile(llama, GPTQ, calib=plain)
    with torch.no_grad():
        assert torch.equal(a(input_ids=t).logits, b(input_ids=t).logits)
    for batch, says in (({"attention_mask": torch.ones_like(t)}, r"\(calibration batch 0 of 1\) takes inputs .*missing "
                                                                  r"\['input_ids'\].*give each calibration batch those"),
                        ({"input_ids": t[0]}, r"calibration batch 0 of 1\): input_ids is 1-D \[7\].*unsqueeze"),
                        ({"input_ids": t, "attention_mask": torch.ones(2, 6, dtype=torch.long)},
                         r"inputs of \[batch, seq\] disagree in size: input_ids \[2, 7\], attention_mask \[2, 6\]")):
        with pytest.raises((TypeError, ValueError), match=says):
            slimfx.compile(llama, GPTQ, calib=[batch])


def test_calibration_images_of_another_size_are_refused_by_batch():
    """A ViT calibrated on images of another side than the example's failed inside GPTQ at the
    graph's guard (a bare AssertionError)."""
    vit = tiny("vit")
    side = vit.example_inputs["pixel_values"].shape[-1]
    with pytest.raises(ValueError, match=rf"\(calibration batch 0 of 1\): pixel_values is \[2, 3, {2 * side}, "
                                         rf"{2 * side}\], the graph takes \[batch, 3, {side}, {side}\]"):
        slimfx.compile(vit, "quantize blocks.*.mlp.* : Linear int4 method=gptq",
                       calib=[{"pixel_values": torch.randn(2, 3, 2 * side, 2 * side)}])


def test_calibration_that_does_not_fit_is_refused_only_where_a_rule_reads_it(llama):
    """Binding every batch at compile's start refused a policy that never calibrates (the default
    text's ids beside a graph captured from inputs_embeds); keys the graph takes no input for ride
    along (`labels`, which the LoRA heal's loss reads)."""
    t = ids(2, 7)
    embeds = llama.model.get_input_embeddings()(t).detach()
    rtn = "policy p {\n    quantize blocks.*.** : Linear int8\n}\n"
    slimfx.compile(llama, rtn, example_inputs={"inputs_embeds": embeds, "attention_mask": torch.ones_like(t)})
    with pytest.raises(TypeError, match=r"calibration batch 0 of \d+\) takes inputs \['inputs_embeds', 'attention_mask'\]"):
        slimfx.compile(llama, GPTQ, example_inputs={"inputs_embeds": embeds, "attention_mask": torch.ones_like(t)})
    labelled = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t}]
    slimfx.compile(llama, GPTQ, calib=labelled)
    assert api_calibration(llama, labelled)[0].keys() == {"input_ids", "attention_mask", "labels"}


def api_calibration(model, calib):
    from slimfx.api import _calibration
    from slimfx.passes.capture import capture

    return _calibration(model, calib, capture(model.model, model.example_inputs))


def test_calibration_of_padding_only_is_refused_by_name(llama):
    """An all-zero mask reached the GPTQ accumulator: 'no calibration rows were added; run the model
    on calibration data first'."""
    t = ids(2, 7)
    with pytest.raises(ValueError, match="every calib batch's attention_mask is all 0: no real token"):
        slimfx.compile(llama, GPTQ, calib=[{"input_ids": t, "attention_mask": torch.zeros_like(t)}])
    some = [{"input_ids": t, "attention_mask": torch.zeros_like(t)}, {"input_ids": t, "attention_mask": torch.ones_like(t)}]
    slimfx.compile(llama, GPTQ, calib=some)  # a batch of padding among real ones is fine
