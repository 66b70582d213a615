#!/usr/bin/env bash
# The selection benchmark on a CUDA machine: ONNX Runtime's CUDA provider (fps-graph select, --reduce host, plain
# inference) against PyTorch on CUDA (forward hooks, GPS-style forward+backward). Installs nothing: it needs the
# repo's venv with onnxruntime-gpu, and a CUDA build of torch plus transformers (for the PyTorch methods and the
# one-time export). Writes bench/results/*-cuda.{json,md,png}.
#
#   bench/run_cuda.sh            # ViT-B/16 b32 n256 and ResNet-50 b32 n256, then ViT-B/16 samples 64..1024 (~10 min)
#   bench/run_cuda.sh quick      # ViT-B/16 b32 n256 only, 3 repetitions (~3 min on an H100)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

fail() { echo "run_cuda.sh: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this script needs a CUDA GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi sees no GPU"
python - <<'PY' || fail "CUDA is not usable from this environment (see the line above)"
import sys
try:
    import torch
except ImportError:
    sys.exit("torch is not installed")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} does not see a GPU (a CPU build of torch? install a CUDA build)")
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
from fps_graph.runtime.session import cuda_usable
if not cuda_usable():
    sys.exit(f"onnxruntime {ort.__version__}: CUDAExecutionProvider is not usable "
             f"(available: {ort.get_available_providers()}; onnxruntime-gpu with matching CUDA/cuDNN libraries needed)")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, onnxruntime {ort.__version__} CUDA provider OK")
PY

run() { python -m bench.selection --device cuda "$@"; }
run --model vit-b16 --batch-size 32 --samples 256 --reps 3
if [ "${1:-}" != "quick" ]; then
  run --model resnet50 --batch-size 32 --samples 256 --reps 3
  run --model vit-b16 --batch-size 32 --samples 64,256,1024 --reps 3
fi
ls -1 bench/results/*-cuda.*
