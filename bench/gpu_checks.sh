#!/usr/bin/env bash
# Every GPU check the CPU machines cannot run, in one call, for a session that is lent a GPU (an H100/H200; the
# step limits add up to 590 s, under the device's 600 s a call). From the repository root:
#     bash bench/gpu_checks.sh          # logs and summary.txt in $OUT (or bench/out/)
# Liger-Kernel for bench.kernels: `pip download liger-kernel --no-deps -d bench/` on a machine with an index first
# (the GPU machine has none; the wheel travels with the working tree). Each step has its own time limit, so one
# that hangs does not cost the others.
set -u
out="${OUT:-bench/out}"
mkdir -p "$out"
run() {  # run LIMIT_S NAME COMMAND...: one step, its output in $out/NAME.log, its status in $out/summary.txt
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/gpu.txt" 2>&1
for wheel in bench/liger_kernel-*.whl; do
    [ -e "$wheel" ] && pip install --no-deps --no-index -q "$wheel" >> "$out/gpu.txt" 2>&1
done
run 180 tests python -m pytest -q -x tests/test_kernels_rope.py tests/test_kernels_cross_entropy.py \
    tests/test_kernels_fused_linear_cross_entropy.py tests/test_kernels_in_models.py tests/test_attention.py \
    tests/test_moe.py tests/test_families.py
run 200 bench_kernels python -m bench.kernels --device cuda --grid pairs --tokens 16384 --iters 5
run 90 bench_fsdp python -m bench.fsdp --device cuda --iters 5
run 50 bench_fsdp_8k python -m bench.fsdp --device cuda --seq 8192 --batch 2 --iters 3 --modes plain "fsdp + AC selective"
run 70 bench_moe python -m bench.moe_vs_hf --device cuda --dtype bf16 --seq 2048 --batch 4 --experts 32 --top_k 4
