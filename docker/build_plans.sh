#!/usr/bin/env bash
# Build TensorRT plans for a repository made with `littlebig repo --runtime tensorrt`, inside the same
# NGC release the server runs (a plan only loads in the TensorRT version that built it).
# Usage: docker/build_plans.sh REPOSITORY [MAX_BATCH]   (needs a GPU and the NVIDIA container runtime)
set -euo pipefail
repo=$(cd "$1" && pwd)
max_batch=${2:-64}
for model in little big; do
    onnx="$repo/$model/model.onnx"
    [ -f "$onnx" ] || { echo "missing $onnx: make the repository with --runtime tensorrt" >&2; exit 2; }
    # The wire shape (S, S, 3) is fixed; only the batch axis is dynamic.
    shape=$(python3 -c "import onnx,sys; d=onnx.load(sys.argv[1]).graph.input[0].type.tensor_type.shape.dim; print('x'.join(str(x.dim_value) for x in d[1:]))" "$onnx")
    docker run --rm --gpus all -v "$repo:/repo" nvcr.io/nvidia/tritonserver:24.10-py3 \
        /usr/src/tensorrt/bin/trtexec --onnx=/repo/$model/model.onnx --saveEngine=/repo/$model/1/model.plan \
        --minShapes=IMAGE:1x$shape --optShapes=IMAGE:$((max_batch / 2))x$shape --maxShapes=IMAGE:${max_batch}x$shape --fp16
done
