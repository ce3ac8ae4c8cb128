#!/usr/bin/env bash
# The whole CUDA check of minihbt in one run, on a machine with a GPU (issue 16).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [--stages 1,2,3,4,5] [--budget 465] [--force]
#   bash benchmarks/gpu_check.sh --device cpu --smoke      # check the script's code paths on a CPU
#
# Run from the repository root. Writes two files (OUT defaults to ./gpu-check-out):
# OUT/gpu_check.log, everything printed, tee'd as it goes, so a timeout still leaves the
# log; OUT/gpu_check.json, each stage's status, seconds, figures and checks with their
# tolerances, updated after every figure, so a run cut off still leaves what it measured.
# Stages, each under `timeout` (one stage failing or hanging does not stop the others):
#   0  GPU, driver, CuPy, CUDA, torch versions; without a GPU: the one line
#      "gpu_check: no GPU (<reason>)" and exit 3, nothing else run
#   1  the CUDA tests: python -m pytest -q tests -k "cuda or gpu" (not the MPI
#      tests): parity with PyTorch, the fast path against the plain path on the
#      GPU with and without fused kernels, dropout masks, kernels            limit 130 s
#   2  tests/test_kernels.py (again with MINIHBT_FUSED=1 where minihbt/kernels.py
#      still reads it); train.py 3 steps on the tiny fixture, plain /
#      --fused-kernels / --tf32 (where train.py has them), losses compared;
#      benchmarks/gpu_check_nccl.py: a one-rank NCCL communicator            limit 70 s
#   3  python benchmarks/train_step.py --device cuda (XLM-R base shape, random
#      weights, 100 triplets, 32/128 tokens, fp32 and TF32, minihbt vs PyTorch
#      + transformers); then minihbt alone with fused kernels off and on        limit 140 s
#   4  encoding vs sentence-transformers on the GPU; top-100 retrieval of
#      13,000 x 13,000 x 384 vs torch matmul + topk                           limit 90 s
#   5  3 training steps on CPU and GPU, same weights and seeds, compared       limit 75 s
# The stages share --budget seconds (default 465: the run ends within 8 minutes); a stage
# gets min(its limit, what is left). Exit: 0 all stages finished and all checks passed,
# 1 otherwise, 2 a bad option, 3 no GPU.
#
# On the device tool (the working tree travels; ../shared and the internet do not):
#   once, on a machine with ../shared:  python benchmarks/gpu_check.py prepare
#     (fills the git-ignored weights/xlmr-tokenizer/ with the XLM-R tokenizer.json of
#      multilingual-e5-small, 17 MB, and data/xquad-r-en-de/ with XQuAD-R en/de, 1.4 MB)
#   then the run tool (first run; then rerun only the failed stages at once, or give it back):
#     command: bash benchmarks/gpu_check.sh --budget 330
#     carry:   ["weights/xlmr-tokenizer", "data/xquad-r-en-de"]
#     timeout_s: 400
#   Without the carried folders the stages still run, on the tiny fixture's tokenizer and
#   synthetic paragraphs, and say so in their records. A rerun of one stage:
#     command: bash benchmarks/gpu_check.sh --stages 3 --budget 300
# Environment: OUT, PYTHON (default python3, the one that holds PyTorch on the device machine).
set -u

usage() { sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

STAGES=1,2,3,4,5 BUDGET=465 DEVICE=cuda SMOKE=0 FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --stages) [ $# -ge 2 ] || die "--stages needs a value: a comma-separated list of 1-5"; STAGES=$2; shift ;;
    --budget) [ $# -ge 2 ] || die "--budget needs a value: seconds, 60 to 3600"; BUDGET=$2; shift ;;
    --device) [ $# -ge 2 ] || die "--device needs a value: cuda or cpu"; DEVICE=$2; shift ;;
    --smoke) SMOKE=1 ;;
    --force) FORCE=1 ;;
    *) die "unknown option $1 (accepted: --stages, --budget, --device, --smoke, --force, --help)" ;;
  esac
  shift
done
[[ "$STAGES" =~ ^[1-5](,[1-5])*$ ]] || die "--stages $STAGES: expected a comma-separated list of 1-5, e.g. 1,3"
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 60 ] && [ "$BUDGET" -le 3600 ] \
  || die "--budget $BUDGET: expected whole seconds from 60 to 3600"
[ "$DEVICE" = cuda ] || [ "$DEVICE" = cpu ] || die "--device $DEVICE: expected cuda or cpu"
[ "$DEVICE" = cuda ] || [ "$SMOKE" = 1 ] || die "--device cpu is only for --smoke (a check of the code paths)"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "PYTHON=$PY: no such program"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-./gpu-check-out}
if [ -e "$OUT/gpu_check.log" ] || [ -e "$OUT/gpu_check.json" ]; then
  [ "$FORCE" = 1 ] || die "$OUT already holds a run (gpu_check.log/json); pass --force to replace it, or set OUT"
fi
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/gpu_check.json"
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

declare -A LIMIT=([1]=130 [2]=70 [3]=140 [4]=90 [5]=75)
SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)

run_stages() {
  timeout -k 5 60 "$PY" benchmarks/gpu_check.py probe --out "$OUT" --device "$DEVICE"
  local rc=$?
  [ $rc -eq 3 ] && return 3
  [ $rc -eq 0 ] || { echo "gpu_check: stage 0 (probe) failed with exit code $rc"; return 1; }
  local work deadline n left limit start status
  work=$(mktemp -d "${TMPDIR:-/tmp}/minihbt-gpu-check.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  deadline=$((SECONDS + BUDGET - 15))                # 15 s kept for the summary
  for n in ${STAGES//,/ }; do
    left=$((deadline - SECONDS))
    limit=$(( LIMIT[$n] < left ? LIMIT[$n] : left ))
    if [ "$limit" -lt 20 ]; then
      echo "== stage $n: skipped, ${left} s of the budget left"
      "$PY" benchmarks/gpu_check.py status "$n" --out "$OUT" --status "skipped: no time left" --rc 0 \
        --seconds 0 --limit "$limit"
      continue
    fi
    echo "== stage $n (limit ${limit} s) =="
    start=$SECONDS
    timeout -k 10 "$limit" "$PY" benchmarks/gpu_check.py stage "$n" --out "$OUT" --work "$work" \
      --limit "$limit" --device "$DEVICE" "${SMOKE_FLAG[@]}"
    rc=$?
    case $rc in
      0) status=finished ;;
      124|137) status="timed out" ;;
      *) status="failed" ;;
    esac
    echo "== stage $n: $status (exit code $rc, $((SECONDS - start)) s)"
    "$PY" benchmarks/gpu_check.py status "$n" --out "$OUT" --status "$status" --rc "$rc" \
      --seconds "$((SECONDS - start))" --limit "$limit"
  done
  "$PY" benchmarks/gpu_check.py summary --out "$OUT"
}

run_stages 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
