#!/usr/bin/env bash
# The main real-pair job end to end, measured as a user would: train.py on configs/smol_w4a4.yaml writes the export,
# then the evaluation CLI evaluates that export directory (dequantized runtime) with bench/quality.py's protocol
# (WikiText-2 test 16 x 256 windows, 50 held-out prompts per set, greedy 16 tokens), against the FP aligned model.
#   bash bench/smol_w4a4_export.sh [extra train.py overrides]    # writes bench/results/smol_w4a4_export.json
set -euo pipefail
cd "$(dirname "$0")/.."
root=runs/smol_w4a4_bench
rm -rf "$root"
python train.py --config configs/smol_w4a4.yaml --trainer.default_root_dir "$root" "$@"
export_dir=$(ls -d "$root"/*/version_*/export | tail -n 1)
pair=$(python -c "from caq_lightning.zoo import builtin_pair; print(builtin_pair('smol').root)")
python -m caq_lightning.evaluate --model "$export_dir" --runtime dequant --teacher builtin:smol \
    --prompts "$pair/eval_prompts.jsonl" --ppl-text "$pair/heldout.txt" --ppl-windows 16 --seq-len 256 \
    --max-per-set 50 --max-new-tokens 16 --batch-size 16 --quiet --out bench/results/smol_w4a4_export.json
python -m caq_lightning.evaluate --model builtin:smol --teacher builtin:smol \
    --prompts "$pair/eval_prompts.jsonl" --ppl-text "$pair/heldout.txt" --ppl-windows 16 --seq-len 256 \
    --max-per-set 50 --max-new-tokens 16 --batch-size 16 --quiet --out bench/results/smol_w4a4_export_fp.json
