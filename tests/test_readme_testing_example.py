"""The README's "Testing your own policy" example, run as a user copies it: its MiniLM check
failed 3 runs in 4 at the atol it gave (0.2; int8 moves one outlier channel by up to ≈0.4). The
SmolLM2 example beside it is defined but not called here: it compiles GPTQ and takes minutes."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    section = README.read_text(encoding="utf-8").split("## Testing your own policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_minilm_example_passes_on_several_seeds(tmp_path, monkeypatch):
    code = _example()
    spec = re.search(r"specs/my-minilm\.slim is your file, e\.g\. `(policy .*?)`", code).group(1)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "my-minilm.slim").write_text(spec + "\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    import slimfx.testing

    calls = []
    real = slimfx.testing.check_policy

    def seeded(*args, **kwargs):  # the example as written, over three fixed draws of 100 inputs
        calls.append(kwargs)
        for seed in (1, 2, 3):
            real(*args, **kwargs, seed=seed, max_examples=100)

    namespace["check_policy"] = seeded
    namespace["test_minilm_int8"]()
    assert calls and calls[0]["atol"] > 0
