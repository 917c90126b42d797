#!/usr/bin/env bash
# The GPU checks of the real path, as one run on a lent machine (about 8 minutes on an H100/H200):
#   1. every file in conf/method/ end to end through the fusion CLI on a random-weight ViT-B/32 (the real sizes)
#      × the 8 TA8 tasks as synthetic HF datasets at 224 px, trainer=gpu with bf16-mixed, 5 optimizer steps each;
#   2. the library's loop (MergeTraining): 1000 layer-wise AdaMerging steps, K = 8, batch 16 per task, bf16-mixed,
#      and 200 in fp32: seconds per 1000 steps, ratio to K plain forward+backward passes, peak memory.
# Needs the project installed (pip install -e .). Results go to OUT (default gpu_checks/): one results.json per
# method under OUT/sweep/<n>/ and the two benchmark JSONs.
#   bash benchmarks/gpu_checks.sh OUT
#   TRAINER=cpu SIZE=tiny STEPS=3 bash benchmarks/gpu_checks.sh /tmp/smoke     # the same script on a CPU, tiny
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_checks}")
TRAINER=${TRAINER:-gpu} SIZE=${SIZE:-vit-b-32} STEPS=${STEPS:-1000}
PRECISION=$([ "$TRAINER" = gpu ] && echo bf16-mixed || echo 32-true)
DEVICE=$([ "$TRAINER" = gpu ] && echo cuda || echo cpu)
mkdir -p "$OUT"
export FUSION_CACHE="$OUT/cache"
python -m fusion.fixtures "$OUT/fixtures" --size "$SIZE" --no-hf --train 64 --test 128 --threads 8 \
    --tasks sun397,stanford_cars,resisc45,eurosat,svhn,gtsrb,mnist,dtd
methods=$(ls conf/method/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | paste -sd, -)
start=$(date +%s)
eval python -m fusion.app -m "method=$methods" modelpool=clip-vit-b32_TA8 taskpool=clip_TA8 "trainer=$TRAINER" \
    "trainer.precision=$PRECISION" trainer.fast_dev_run=5 trainer.enable_progress_bar=false logger=none \
    print_table=false "hydra.sweep.dir=$OUT/sweep" "'hydra.sweep.subdir=\${hydra.job.num}'" \
    "$(python -m fusion.fixtures "$OUT/fixtures" --overrides open_clip)"
echo "every method on $TRAINER: $(( $(date +%s) - start )) s, $(ls "$OUT"/sweep/*/results.json | wc -l) results.json"
MODEL=$([ "$SIZE" = tiny ] && echo "$OUT/fixtures/open_clip/tiny.json" || echo ViT-B-32)
[ "$SIZE" = tiny ] && python -c "import json,sys; json.dump(json.load(open(sys.argv[1]))['model_cfg'], open(sys.argv[2],'w'))" \
    "$OUT/fixtures/open_clip/pretrained/open_clip_config.json" "$MODEL"
python benchmarks/gpu_adamerging_vitb32.py --device "$DEVICE" --model "$MODEL" --steps "$STEPS" --warmup 10 \
    --precision "$PRECISION" --threads 8 --out "$OUT/adamerging_bf16.json"
python benchmarks/gpu_adamerging_vitb32.py --device "$DEVICE" --model "$MODEL" --steps $(( STEPS / 5 )) --warmup 10 \
    --threads 8 --out "$OUT/adamerging_fp32.json"
