#!/usr/bin/env bash
# GPU check: on one CUDA GPU, each part within its own deadline,
#   throughput  BERT-base bf16, batch 256 x 128, dropout 0.1, --compile: tokens/s, MFU and peak memory of
#               train_bert.py (rotary and learned positions), train_bert_ds.py with ds_config.json as shipped, and,
#               with BEFORE=path/to/an/older/train_bert.py, that script with the same flags (before/after);
#   budget      `train_bert.py --time_budget 90s` with the defaults (auto-sized for the budget and this GPU) against
#               --auto_size False (the fixed default shape), evaluated the same way;
#   profile     torch.profiler's top operators of the compiled BERT-base rotary step at batch 256;
#   memory      the older rows: peak memory by precision and ZeRO, and ZeRO-Offload on a capped GPU;
#   ds          where train_bert_ds.py's time goes: the same BERT-base rows side by side, train_bert.py (reference),
#               train_bert_ds.py as shipped, two DeepSpeed variants (benchmarks/gpu_rows.py DS_VARIANTS;
#               DS_VARIANTS="name;name" picks others), train_bert.py --dropout 0, and, while the part's time lasts,
#               the shipped config without DeepSpeed's throughput timer and with its wall_clock_breakdown;
#   trainer     transformers' Trainer on the same BERT-base-shaped RoBERTa MLM (benchmarks/hf_trainer_row.py);
# and write REPORT_DIR/report.md, REPORT_DIR/*.json and REPORT_DIR/logs.tar.gz.
#
#   bash benchmarks/gpu_check.sh REPORT_DIR [PART ...]           # default parts: throughput budget profile
#   bash benchmarks/gpu_check.sh REPORT_DIR --dry-run [PART ...] # anywhere: the same rows, tiny, on the CPU
#
# Data: WikiText-2 and the roberta-base tokenizer from $GPU_CHECK_DATA (default ../shared/data; copy that folder to
# a GPU machine without it). What the machine lacks among deepspeed, datasets, fire, loguru (and transformers at
# the project's pin; accelerate for `trainer`) is installed from ./wheels, made beforehand by the one line in benchmarks/README.md (GPU check).
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT_DIR=${1:?usage: bash benchmarks/gpu_check.sh REPORT_DIR [--dry-run] [PART ...]}
shift
DRY_RUN=()
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=(--dry_run True); shift; fi
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(throughput budget profile)
DATA=${GPU_CHECK_DATA:-../shared/data}
PYTHON=${PYTHON:-python3}
START=$(date +%s)
LOAD_BEFORE=$(uptime)  # figures from a busy machine are not comparable: the report gives the load before and after
mkdir -p "$REPORT_DIR"
REPORT_DIR=$(cd "$REPORT_DIR" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}

# What the machine lacks, from ./wheels (--no-deps: the folder holds exactly the missing packages).
if ! "$PYTHON" -c "import deepspeed, datasets, fire, loguru, accelerate" 2>/dev/null && ls wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" wheels/*.whl || exit 2
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import deepspeed, datasets, fire, loguru" || {
    echo "error: deepspeed/datasets/fire/loguru are missing; prepare ./wheels with the command in benchmarks/README.md" >&2
    exit 2
}
if [ ${#DRY_RUN[@]} -gt 0 ]; then
    export DS_ACCELERATOR=cpu
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here; use --dry-run')" \
        || exit 2
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$REPORT_DIR/gpu.csv" 2>/dev/null
fi
"$PYTHON" -c "import sys, torch, transformers, deepspeed, datasets; print('python', sys.version.split()[0], '| torch',
torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| deepspeed',
deepspeed.__version__, '| datasets', datasets.__version__)" > "$REPORT_DIR/versions.txt" 2>&1
DATA_FLAGS=(--dataset "$DATA/wikitext" --tokenizer "$DATA/roberta-base")

for part in "${PARTS[@]}"; do
    echo "== $part ($(( $(date +%s) - START )) s in)"
    case $part in
        throughput)
            "$PYTHON" benchmarks/gpu_rows.py throughput --out_dir "$REPORT_DIR" --deadline_s 300 \
                ${BEFORE:+--before "$BEFORE"} "${DATA_FLAGS[@]}" "${DRY_RUN[@]}" ;;
        budget)
            "$PYTHON" benchmarks/gpu_rows.py budget --out_dir "$REPORT_DIR" --deadline_s 250 "${DATA_FLAGS[@]}" \
                "${DRY_RUN[@]}" ;;
        profile)
            if [ ${#DRY_RUN[@]} -gt 0 ]; then PROFILE=(--model upstream --batch_size 4 --max_seq_length 32 --window 2)
            else PROFILE=(--model bert-base-rotary --local_rank 0 --batch_size 256 --max_seq_length 128 --window 5); fi
            timeout 150 "$PYTHON" benchmarks/benchmark.py profile --dtype bf16 --dropout 0.1 --compile True --rows 25 \
                "${DATA_FLAGS[@]}" "${PROFILE[@]}" > "$REPORT_DIR/profile.log" 2>&1 \
                || echo "(profile did not finish: exit $?)" >> "$REPORT_DIR/profile.log"
            sed -n '/ms\/step/,$p' "$REPORT_DIR/profile.log" > "$REPORT_DIR/profile.md"
            cat "$REPORT_DIR/profile.md" ;;
        memory)
            for suite in gpu-memory gpu-offload; do
                timeout 200 "$PYTHON" benchmarks/benchmark.py throughput --suite "$suite" --dataset synthetic \
                    --tokenizer bpe --window 3 --windows 1 --time_limit_s 180 --work_dir "$WORK" \
                    --markdown_path "$REPORT_DIR/$suite.md" --json_path "$REPORT_DIR/$suite.json" "${DRY_RUN[@]}" \
                    > "$REPORT_DIR/$suite.log" 2>&1
                cat "$REPORT_DIR/$suite.md"
            done ;;
        ds)
            "$PYTHON" benchmarks/gpu_rows.py ds --out_dir "$REPORT_DIR" --deadline_s "${DS_DEADLINE_S:-280}" \
                ${DS_VARIANTS:+--variants "$DS_VARIANTS"} "${DATA_FLAGS[@]}" "${DRY_RUN[@]}" ;;
        trainer)
            # The row's own deadline: it is killed (and says so) if the compile and 60 steps take longer.
            if ! "$PYTHON" -c "import accelerate" 2>/dev/null; then
                echo "(trainer: accelerate is missing; add its wheel to ./wheels)" | tee "$REPORT_DIR/trainer.md"
            else
                timeout -k 5 "${TRAINER_DEADLINE_S:-120}" "$PYTHON" benchmarks/hf_trainer_row.py --out_dir "$REPORT_DIR" \
                    "${DATA_FLAGS[@]}" "${DRY_RUN[@]}" > "$REPORT_DIR/trainer.log" 2>&1
                status=$?
                if [ $status -eq 124 ] || [ $status -eq 137 ]; then
                    echo "(trainer: cut at its ${TRAINER_DEADLINE_S:-120} s deadline; see trainer.log)" > "$REPORT_DIR/trainer.md"
                elif [ $status -ne 0 ]; then
                    echo "(trainer failed: exit $status; see trainer.log)" > "$REPORT_DIR/trainer.md"
                fi
                cat "$REPORT_DIR/trainer.md"
            fi ;;
        *) echo "error: unknown part '$part' (throughput, budget, profile, memory, ds, trainer)" >&2; exit 2 ;;
    esac
done

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'; cat "$REPORT_DIR/gpu.csv" 2>/dev/null; cat "$REPORT_DIR/versions.txt"
    echo "uptime before: $LOAD_BEFORE"; echo "uptime after:  $(uptime)"; echo '```'
    for part in throughput budget profile gpu-memory gpu-offload ds trainer; do
        [ -f "$REPORT_DIR/$part.md" ] || continue
        echo; echo "## $part"; echo
        if [ "$part" = profile ]; then echo '```'; cat "$REPORT_DIR/$part.md"; echo '```'
        else cat "$REPORT_DIR/$part.md"; fi
    done
    echo; echo "Total: $(( $(date +%s) - START )) s."
} > "$REPORT_DIR/report.md"
(cd "$REPORT_DIR" && tar czf logs.tar.gz ./*.log 2>/dev/null && rm -f ./*.log)
cat "$REPORT_DIR/report.md"
rm -rf "$WORK"
