#!/bin/bash
# The device runs of 2026-12-06: case lists one after the other under one deadline (resumable).
# Run from a copy of the checkout on the GPU machine (bitsandbytes wheel in $WHEELS):
#   [HARNESS_FLAGS=--sparse-checkpoints] VRAMCALC_COMMIT=<sha> WHEELS=../.whl bash data/measurements/device_run_2026-12-06.sh DEADLINE_S LIST.yaml[@SECONDS]...
# Each list's records go to data/measurements/<gpu>_<list name without h100_/h200_>_2026-12-06.jsonl
# and are copied to $OUT after each list (with its allocator traces, NAME_traces/, if any). The harness resumes from those files on the next call.
set -u
failed=0
t0=$(date +%s)
deadline=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VRAMCALC_COMMIT
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) tag=h200 ;; *H100*) tag=h100 ;; *) tag=gpu ;; esac
{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv; df -h /tmp;
  python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, b.__version__)"; python3 -c "import deepspeed; print(\"deepspeed\", deepspeed.__version__)" 2>&1 | tail -1; } \
    > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
for item in "$@"; do
    list=${item%@*}  # LIST.yaml or LIST.yaml@SECONDS: start no case of it after SECONDS
    cap=99999
    [ "$item" != "$list" ] && cap=${item##*@}
    name=$(basename "$list" .yaml)
    name=${name#h200_}
    name=${name#h100_}
    out=data/measurements/${tag}_${name}_2026-12-06.jsonl
    left=$((deadline - ($(date +%s) - t0)))
    if [ "$left" -lt 170 ]; then echo "[run] no time left for $list"; break; fi
    stop=$((left - 140))
    [ "$cap" -lt "$stop" ] && stop=$cap
    echo "[run] $list -> $out, $left s left, no new case after $stop s"
    timeout --signal=TERM --kill-after=20 $((left - 25)) python3 -m vramcalc_harness "$list" -o "$out" \
        --device cuda --scratch /tmp/vramcalc-scratch --stop-after-s $stop --no-progress ${HARNESS_FLAGS:-}
    rc=$?
    echo "[run] $list: rc $rc"
    [ "$rc" -ne 0 ] && failed=1
    [ -f "$out" ] && cp "$out" "$OUT/"
    [ -d "${out%.jsonl}_traces" ] && cp -r "${out%.jsonl}_traces" "$OUT/"
done
df -h /tmp | tail -1
exit $failed
