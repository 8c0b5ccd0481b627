#!/usr/bin/env bash
# GPU check: on one CUDA GPU, in under 8 minutes, measure
#   1. throughput and MFU of BERT-base (12 layers, 768, 12 heads, ff 3072; batch 64 x 128, bf16) with train_bert.py
#      and train_bert_ds.py (ZeRO 0 and 1), torch.compile off and on;
#   2. the peak GPU memory of one model (BERT-base, batch 32 x 128) in fp32, fp16, bf16, ZeRO-1 and ZeRO-1 + CPU
#      optimizer offload;
#   3. a 1.27B-parameter model on the GPU capped at 12 GiB (torch.cuda.set_per_process_memory_fraction): out of
#      memory with ZeRO-1, trains with ZeRO-1 + ZeRO-Offload;
#   4. torch.profiler's top operators of a compiled BERT-base bf16 step;
# and write REPORT_DIR/report.md and REPORT_DIR/report.json (plus one .md/.json per part).
#
#   bash benchmarks/gpu_check.sh REPORT_DIR            # on the GPU machine
#   bash benchmarks/gpu_check.sh REPORT_DIR --dry-run  # anywhere: the same rows with tiny dims on the CPU
#
# The GPU machine needs torch, transformers, tokenizers and tensorboard, and no network: deepspeed, datasets, fire
# and loguru (with the dependencies such a machine lacks) are installed from ./wheels, made beforehand on a machine
# with PyPI access by the one line in benchmarks/README.md (GPU check). It uses no files outside this folder:
# the text is a synthetic corpus made on the spot and the tokenizer a byte-level BPE trained on it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT_DIR=${1:?usage: bash benchmarks/gpu_check.sh REPORT_DIR [--dry-run]}
DRY_RUN=${2:-}
BUDGET_S=${GPU_CHECK_BUDGET_S:-375}  # parts 1-3; with the profile (90 s at most) and the report: 8 minutes
START=$(date +%s)
PYTHON=${PYTHON:-python3}
mkdir -p "$REPORT_DIR"
REPORT_DIR=$(cd "$REPORT_DIR" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}

# 1. What the machine lacks, from ./wheels (--no-deps: the folder holds exactly the missing packages).
if ! "$PYTHON" -c "import deepspeed, datasets, fire, loguru" 2>/dev/null; then
    if ! ls wheels/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed/datasets/fire/loguru are missing and there is no ./wheels folder; prepare it with the" \
             "command in benchmarks/README.md (GPU check)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" wheels/*.whl || exit 2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "import deepspeed, datasets, fire, loguru" || exit 2
fi

if [ "$DRY_RUN" = "--dry-run" ]; then
    MODE=(--dry_run True)
    export DS_ACCELERATOR=cpu
else
    MODE=()
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here; use --dry-run')" \
        || exit 2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$REPORT_DIR/gpu.csv" 2>/dev/null || true
fi

# 2. The three parts, each given what is left of the budget (the benchmark cuts and skips rows at its limit).
run_part() {
    local suite=$1 window=$2 windows=$3 left
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
        echo "| $suite | skipped: the 8-minute budget is spent |" > "$REPORT_DIR/$suite.md"
        return
    fi
    echo "== $suite ($left s left)"
    "$PYTHON" benchmarks/benchmark.py throughput --suite "$suite" --dataset synthetic --tokenizer bpe \
        --window "$window" --windows "$windows" --time_limit_s "$left" --work_dir "$WORK" \
        --markdown_path "$REPORT_DIR/$suite.md" --json_path "$REPORT_DIR/$suite.json" "${MODE[@]}" \
        > "$REPORT_DIR/$suite.log" 2>&1
    tail -n 20 "$REPORT_DIR/$suite.log"
}
run_part gpu 10 2
run_part gpu-memory 3 1
run_part gpu-offload 2 1

# 3. Where a compiled BERT-base step spends its time (torch.profiler, top operators by self time), within 90 s.
echo "== profile"
if [ "$DRY_RUN" = "--dry-run" ]; then PROFILE=(--model upstream --batch_size 4 --max_seq_length 32 --window 2)
else PROFILE=(--model bert-base --local_rank 0 --batch_size 64 --max_seq_length 128 --window 5); fi
timeout 90 "$PYTHON" benchmarks/benchmark.py profile --dtype bf16 --dropout 0.1 --compile True --rows 20 \
    --dataset synthetic --tokenizer bpe "${PROFILE[@]}" > "$REPORT_DIR/profile.log" 2>&1 \
    || echo "(profile did not finish: exit $?)" >> "$REPORT_DIR/profile.log"
sed -n '/ms\/step/,$p' "$REPORT_DIR/profile.log" > "$REPORT_DIR/profile.txt"
"$PYTHON" -c "import sys, torch, transformers, deepspeed, datasets; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed',
deepspeed.__version__, '| datasets', datasets.__version__)" > "$REPORT_DIR/versions.txt" 2>/dev/null

# 4. One report: the three tables and the profile, and their JSON together.
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    [ -s "$REPORT_DIR/gpu.csv" ] && { echo '```'; cat "$REPORT_DIR/gpu.csv"; cat "$REPORT_DIR/versions.txt"; echo '```'; echo; }
    for part in gpu gpu-memory gpu-offload; do
        echo "## $part"
        echo
        cat "$REPORT_DIR/$part.md" 2>/dev/null || echo "(no result)"
        echo
    done
    echo "## profile (bf16 + compile, self time per operator)"
    echo
    echo '```'; cat "$REPORT_DIR/profile.txt"; echo '```'
    echo
    echo "Total: $(( $(date +%s) - START )) s."
} > "$REPORT_DIR/report.md"
"$PYTHON" - "$REPORT_DIR" <<'EOF'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
parts = {part: json.loads((folder / f"{part}.json").read_text())
         for part in ("gpu", "gpu-memory", "gpu-offload") if (folder / f"{part}.json").is_file()}
(folder / "report.json").write_text(json.dumps(parts, indent=2))
EOF
cat "$REPORT_DIR/report.md"
rm -rf "$WORK"
