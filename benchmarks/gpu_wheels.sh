#!/usr/bin/env bash
# Wheels for running benchmarks/gpu_check.sh on a GPU machine that has a CUDA build of torch (with
# triton, numpy, safetensors, psutil, pyyaml, ...) but not this project's other packages, and no
# network: a bare PyTorch image, say. Run it HERE (a machine with network and this repo's .venv);
# it writes the pinned versions (requirements/*.lock) of what gpu_check.sh imports beyond such an
# image into .whl/ (git-ignored), for the GPU machine's Python (default 3.12, x86-64). There:
#
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site PYTHON=python3 bash benchmarks/gpu_check.sh
#
# (how benchmarks/results/gpu_nvidia_h200_* were made). Usage: bash benchmarks/gpu_wheels.sh [--pipeline] [PYVER]
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_PIPELINE=0
if [ "${1:-}" = "--pipeline" ]; then WITH_PIPELINE=1; shift; fi
PYV="${1:-3.12}"
DEST=.whl
PIP=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || { echo "gpu_wheels: no .venv here; run 'make install' first" >&2; exit 2; }
# Found by tracing the imports of every gpu_check part in .venv (python -X importtime / sys.modules after
# importing launchers/train.py's modules, pipeline.run, pipeline.data.common + datasets, pipeline.eval.runner
# + metrics + rouge_score.tokenizers, tests.helpers.tiny, bench_kl/bench_step and their workers' imports),
# mapped to distributions with importlib.metadata.packages_distributions(), minus what a bare CUDA-PyTorch
# image has (torch + filelock, typing-extensions, sympy, networkx, jinja2, fsspec, triton; numpy,
# safetensors, psutil, pyyaml, packaging, tqdm, requests) and minus imports guarded by try/except
# (accelerate, pillow, attrs, tabulate, pytz, cloudpickle, scikit-learn, defusedxml). transformers /
# tokenizers / huggingface_hub too: an image's own versions differ from our pins, and transformers'
# attention interface is what we test. gpu_check.sh checks the same modules (GPU_CHECK_MODULES) first.
NAMES=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions einops msgpack
       hydra-core omegaconf antlr4-python3-runtime transformers huggingface_hub tokenizers httpx2
       httpcore2 h11 truststore sniffio click anyio idna regex dill
       rouge_score nltk six)                                              # eval.metrics' ROUGE tokenizer
# The pipeline part alone also reads data with `datasets` and scores forget quality with scipy (which
# pipeline.eval.metrics imports inside forget_quality_ks only, so the eval part needs none of these): about
# 100 MB of wheels (pyarrow 55 MB, scipy 35 MB), over a device call's 64 MiB carry, so only with
# --pipeline (for a machine whose image lacks them and that can take the transfer); without them
# gpu_check.sh skips that part and says so.
PIPELINE_NAMES=(datasets pyarrow pandas python-dateutil xxhash multiprocess scipy)
[ "$WITH_PIPELINE" = 1 ] && NAMES+=("${PIPELINE_NAMES[@]}")
PLATFORMS=()
for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p "$DEST"
for name in "${NAMES[@]}"; do
  pin=$(grep -ih "^${name}==" requirements/cpu.lock requirements/extras.lock | head -1 || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not pinned in requirements/*.lock" >&2; exit 2; }
  if ! "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$pin" 2>/dev/null; then
    # sdist-only releases (deepspeed, rouge_score, antlr4): a pure-Python wheel built here
    "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DEST" "$pin"
  fi
done
ls -1 "$DEST"
du -sh "$DEST"
