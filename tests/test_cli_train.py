"""`slimfx train`: an artifact with adapters is trained on calibration text and saved beside it;
arguments and artifacts that cannot work are refused as messages, before any training."""
import pytest
import torch

import slimfx
from slimfx.cli import main
from test_cli import write

QLORA = ("policy p {\n    quantize blocks.*.** : Linear int4 group=16\n"
         "    adapt blocks.*.** : Linear lora rank=4 alpha=8\n}\n")


@pytest.fixture
def artifact(tmp_path):
    """A tiny Llama compiled with QLoRA adapters and saved."""
    out = tmp_path / "qlora"
    assert main(["compile", str(write(tmp_path, QLORA)), "--model", "tiny:llama", "--out", str(out)]) == 0
    return out


def adapters(path) -> dict[str, torch.Tensor]:
    cm = slimfx.load(path)
    return {n: p.detach() for n, p in cm.named_parameters() if p.requires_grad}


def test_train_prints_the_loss_per_step_and_saves_beside_the_artifact(artifact, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "4",
                 "--batch", "2", "--seq", "32", "--lr", "1e-2"]) == 0
    out, err = capsys.readouterr()
    assert "step 1/4  loss" in out and "step 4/4  loss" in out and "on 4 batches of 2×32 tokens" in err
    assert "(first and last step, each on its own batch) in" in out
    trained = artifact.parent / "qlora-trained"
    assert f"saved to {trained}" in err
    before, after = adapters(artifact), adapters(trained)
    assert before.keys() == after.keys() and not any(torch.equal(before[n], after[n]) for n in before
                                                     if n.endswith("lora_B"))
    assert main(["eval", "--model", "tiny:llama", "--compiled", str(trained), "--max-tokens", "64"]) == 0
    assert "compiled / original" in capsys.readouterr().out
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "1",
                 "--batch", "100000", "--seq", "100", "--out", str(tmp_path / "o")]) == 1
    assert "needs 10,000,000 tokens" in capsys.readouterr().err
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "1",
                 "--batch", "2", "--seq", "32", "--out", str(tmp_path / "one")]) == 0
    assert "for 1 step on 1 batch of 2×32 tokens" in capsys.readouterr().err  # "1 steps on 1 batches"


def test_each_step_trains_on_the_next_tokens_of_the_text(artifact, tmp_path, capsys, monkeypatch):
    """Step k sees tokens [k·B·L, (k+1)·B·L) of the calibration text, every paragraph of it as
    compile calibrates (it read only those of 20+ words); steps beyond the text go round it again.
    One fixed batch for every step (as before) fits that batch, not the text."""
    import slimfx.runtime.train as training
    from slimfx.evaluation import calibration_texts
    from slimfx.models import load as load_model

    seen = []
    real = training.train
    monkeypatch.setattr(training, "train", lambda cm, batches, **kw: seen.append(batches) or real(cm, batches, **kw))
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "3", "--batch", "2",
                 "--seq", "16", "--out", str(tmp_path / "o")]) == 0
    tokenizer = load_model("tiny:llama").tokenizer
    ids = torch.as_tensor(tokenizer("\n\n".join(calibration_texts(min_words=0)),
                                    return_tensors="pt")["input_ids"]).reshape(-1)
    (batches,) = seen
    assert [b["input_ids"].tolist() for b in batches] == ids[:3 * 32].reshape(3, 2, 16).tolist()
    assert all(bool(b["attention_mask"].all()) for b in batches)
    seen.clear()
    size = ids.numel() // (32 * 128)  # more steps than the calibration text has batches: docstrings follow it
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", str(size + 1),
                 "--batch", "32", "--seq", "128", "--out", str(tmp_path / "p")]) == 0
    (more,) = seen
    assert len(more) == size + 1
    assert torch.cat([b["input_ids"].reshape(-1) for b in more[:size]]).equal(ids[:size * 32 * 128])
    assert len({tuple(b["input_ids"].reshape(-1).tolist()) for b in more}) == size + 1


def test_train_schedule_is_passed_on_and_said(artifact, tmp_path, capsys):
    runs = {}
    for schedule in ("constant", "cosine"):
        capsys.readouterr()
        out = tmp_path / schedule
        assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "4", "--batch", "2",
                     "--seq", "16", "--lr", "1e-2", "--schedule", schedule, "--out", str(out)]) == 0
        runs[schedule] = adapters(out), capsys.readouterr().err
    said = {name: err.split("saved to")[0] for name, (_, err) in runs.items()}  # without the out dir's name
    assert "lr 0.01 with a cosine schedule" in said["cosine"] and "cosine" not in said["constant"]
    # The first two steps take the full lr under both (warm-up of one step); the last two differ.
    (cos, _), (const, _) = runs["cosine"], runs["constant"]
    assert not all(torch.equal(cos[n], const[n]) for n in cos)
    with pytest.raises(SystemExit) as e:  # argparse's choices: usage and the two names, exit status 2
        main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "1", "--schedule", "linear"])
    assert e.value.code == 2 and "choose from 'constant', 'cosine'" in capsys.readouterr().err


def test_training_that_diverges_is_a_message(artifact, tmp_path, capsys):
    """A FloatingPointError from train() was printed as a slimfx bug."""
    capsys.readouterr()
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "2", "--batch", "1",
                 "--seq", "16", "--lr", "1e30", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "training diverged (try a lower lr)" in err and "slimfx bug" not in err, err
    assert not (tmp_path / "o").exists()


def test_train_refuses_before_loading_anything(tmp_path, capsys):
    a_file = write(tmp_path, "x", name="not-a-dir")
    argv = ["train", "--model", "tiny:llama", "--compiled", str(tmp_path / "never-read"), "--steps"]
    assert main([*argv, "1", "--out", str(a_file)]) == 1
    err = capsys.readouterr().err
    assert "it is a file" in err and "loading" not in err
    assert main([*argv, "0"]) == 1
    assert "--steps must be at least 1" in capsys.readouterr().err
    for lr in ("0", "inf", "nan"):  # inf trained one step and saved nan adapters, exit 0
        assert main([*argv, "1", "--lr", lr]) == 1
        assert "--lr must be a positive finite number" in capsys.readouterr().err
    for seed in (str(2**64), str(-2**63 - 1)):  # reported as a slimfx bug once the model had loaded
        assert main([*argv, "1", f"--seed={seed}"]) == 1
        err = capsys.readouterr().err
        assert "--seed must be a whole number from -2^63 to 2^64-1" in err and "bug" not in err


def test_train_refuses_a_model_that_is_not_the_one_compiled(artifact, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--model", "tiny:gpt2", "--compiled", str(artifact), "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{artifact} was compiled from a LlamaForCausalLM, --model tiny:gpt2 is a GPT2LMHeadModel" in err
    assert not (tmp_path / "o").exists()


def test_an_artifact_without_adapters_is_a_message_not_a_traceback(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["compile", str(write(tmp_path, "policy p {\n    keep head\n}\n")), "--model", "tiny:llama",
                 "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "tiny:llama", "--compiled", str(plain), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "no adapters to train" in err and "`adapt` rule" in err and "Traceback" not in err


def test_lm_loss_on_an_encoder_is_refused_with_what_to_use(tmp_path, capsys):
    out = tmp_path / "bert"
    spec = write(tmp_path, "policy p {\n    adapt blocks.*.** : Linear lora rank=2\n}\n")
    assert main(["compile", str(spec), "--model", "tiny:bert", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "tiny:bert", "--compiled", str(out), "--steps", "1", "--loss", "lm",
                 "--out", str(tmp_path / "o")]) == 1
    assert "--loss lm is next-token cross entropy, and tiny:bert is not a causal LM (it is encoder)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--seq", "256"], "--seq 256 is longer than tiny:llama takes (128 positions); use --seq 128 or less"),
    (["--seq", "1"], "--seq 1 leaves no next token to predict: the lm loss needs --seq 2 or more"),
    # it said "the calibration text has 904954", uncounted and with the docstrings in the count
    (["--batch", "100000", "--seq", "128"], "--batch 100000 × --seq 128 needs 12,800,000 tokens; the built-in text "
                                            "(calibration text, then standard-library docstrings) has "),
])
def test_a_sequence_the_model_cannot_take_is_refused_before_training(artifact, tmp_path, capsys, argv, says):
    """--seq past the position table raised an IndexError in the embedding, --seq 1 a ValueError."""
    capsys.readouterr()
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "1", *argv,
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert says in err and "training" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch, rules, says", [
    # was told "compile it with an `adapt` rule", which it had
    ("llama", "adapt blocks.*.attn.q lora rank=2 merge=true",
     "line 2's `adapt` merged them into the weights at compile; compile with merge=false"),
    # was train()'s ValueError with the "this is a slimfx bug" suffix
    ("bert", "adapt blocks.*.attn.q lora rank=2\n    tokens unpad",
     "was compiled with token rules (line 3), whose ops have no gradients"),
])
def test_an_artifact_train_cannot_train_is_refused_with_why(tmp_path, capsys, arch, rules, says):
    out = tmp_path / "artifact"
    assert main(["compile", str(write(tmp_path, f"policy p {{\n    {rules}\n}}\n")), "--model", f"tiny:{arch}",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", f"tiny:{arch}", "--compiled", str(out), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert says in err and "bug" not in err


def test_an_artifact_compiled_from_bare_ids_trains_on_ids_alone(tmp_path, capsys):
    """It was handed the batch's attention_mask too, which its graph does not take: a TypeError."""
    lm = slimfx.models.tiny("llama")
    cm = slimfx.compile(lm.model, "adapt blocks.*.attn.q lora rank=2", example_inputs=lm.example_inputs["input_ids"])
    cm.save(tmp_path / "bare")
    assert main(["train", "--model", "tiny:llama", "--compiled", str(tmp_path / "bare"), "--steps", "2",
                 "--batch", "2", "--seq", "16"]) == 0
    assert "step 2/2  loss" in capsys.readouterr().out


def test_distilling_adapters_on_an_unchanged_encoder_is_refused_as_a_message(tmp_path, capsys):
    """The encoder default (distill) on an adapter-only policy trained nothing ("loss 0 -> 0") and
    saved the model unchanged."""
    out = tmp_path / "bert"
    spec = write(tmp_path, "policy p {\n    adapt blocks.*.** : Linear lora rank=2\n}\n")
    assert main(["compile", str(spec), "--model", "tiny:bert", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", "tiny:bert", "--compiled", str(out), "--steps", "2",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "computes what tiny:bert does (distill loss 0 on the first batch)" in err and "Traceback" not in err
    assert "slimfx bug" not in err and not (tmp_path / "o").exists()


def test_an_encoders_training_rows_each_have_its_special_tokens():
    """They were cut from one token stream, as a causal LM's are: one [CLS] in all, no [SEP], rows
    the encoder never sees in use (compile's calibration rows have them)."""
    from slimfx.commands import _training_batches
    from slimfx.models import load

    lm = load("minilm-l6")
    cls, sep = lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id
    batches, text = _training_batches(lm, 4, 32, 3)
    assert text == "calibration text" and len(batches) == 3 and all(b["input_ids"].shape == (4, 32) for b in batches)
    for b in batches:
        for row, mask in zip(b["input_ids"], b["attention_mask"]):
            real = row[mask.bool()]
            assert real[0] == cls and real[-1] == sep
    # One text cut into rows, as compile calibrates: a paragraph a row made headings rows of a few
    # tokens and the rest padding.
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_the_loss_line_says_which_batches_its_two_steps_read():
    """Steps go round the batches: 11 steps on 10 batches end on the first step's batch, which the
    line called "each on its own batch"."""
    from slimfx.commands import _loss_line

    assert _loss_line(5.6, 5.5, 1.0, 11, 10) == "loss 5.600 → 5.500 (first and last step on the same batch) in 1.0s"
    assert _loss_line(5.6, 5.5, 1.0, 12, 10).endswith("(first and last step, each on its own batch) in 1.0s")
    assert _loss_line(5.6, 5.5, 1.0, 3, 1) == "loss 5.600 → 5.500 in 1.0s"


def test_training_batches_say_when_they_run_past_the_calibration_text():
    """The command said "of calibration text" while most of the demo's batches were docstrings."""
    from slimfx.commands import _training_batches
    from slimfx.models import load

    lm = load("tiny:llama")
    few, text = _training_batches(lm, 2, 32, 2)
    assert len(few) == 2 and text == "calibration text"
    many, text = _training_batches(lm, 8, 128, 200)
    assert text == "calibration text, then standard-library docstrings" and len(many) == 200


def test_a_vision_artifact_is_evaluated_and_its_training_refused_for_want_of_text(tmp_path, capsys):
    """Both said it was compiled with the inputs ['pixel_values'] and to compile it 'without
    pixel_values', which cannot be done."""
    out = tmp_path / "vit"
    spec = write(tmp_path, "policy p {\n    adapt blocks.*.attn.{q,v} lora rank=4\n}\n")
    assert main(["compile", str(spec), "--model", "tiny:vit", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "tiny:vit", "--compiled", str(out)]) == 0
    table = capsys.readouterr().out
    assert "compiled / original" in table and "logit cosine" in table and "16 seeded random images" in table
    assert "1.0000" in table, "a fresh adapter (B = 0) leaves the logits as they were"
    assert main(["train", "--model", "tiny:vit", "--compiled", str(out), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "tiny:vit has no tokenizer; `slimfx train` trains on text" in err and "without pixel_values" not in err


def test_an_encoder_sequence_no_longer_than_its_special_tokens_is_refused():
    """A fast tokenizer ignores max_length when it leaves no room past [CLS] … [SEP]: --seq 1
    trained on whole paragraphs, --seq 2 failed as a slimfx bug."""
    from types import SimpleNamespace

    from slimfx.command_checks import UsageError
    from slimfx.commands import _encoder_batches

    class TwoSpecial:
        def num_special_tokens_to_add(self):
            return 2

    loaded = SimpleNamespace(name="minilm-l6", tokenizer=TwoSpecial())
    for seq in (1, 2):
        with pytest.raises(UsageError, match=f"--seq {seq} leaves no room for text: minilm-l6's tokenizer adds 2 "
                                             "special tokens to each row; use --seq 3 or more"):
            _encoder_batches(loaded, batch=2, seq=seq, steps=1)


def test_each_steps_loss_keeps_four_significant_digits():
    """"step 1/8  loss 3.52" beside "loss 3.718": trailing zeros were dropped."""
    from slimfx.commands import _loss

    assert [_loss(v) for v in (3.52, 3.718, 0.04, 12.0)] == ["3.520", "3.718", "0.04000", "12.00"]


def test_ctrl_c_says_after_how_many_steps_training_stopped_and_saves_nothing(artifact, tmp_path, capsys, monkeypatch):
    """It printed `interrupted` alone: slimfx.train's note (the steps done, the adapters restored)
    was dropped."""
    import slimfx.runtime.train as training

    real, steps = training._step, []

    def interrupted_at_the_third(*args):
        if len(steps) == 2:
            raise KeyboardInterrupt
        steps.append(1)
        return real(*args)

    monkeypatch.setattr(training, "_step", interrupted_at_the_third)
    out = tmp_path / "never"
    assert main(["train", "--model", "tiny:llama", "--compiled", str(artifact), "--steps", "5", "--batch", "2",
                 "--seq", "32", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted\n  slimfx.train stopped after 2 of 5 steps; the adapters are restored" in err
    assert not out.exists()
