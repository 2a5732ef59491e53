#!/usr/bin/env bash
# MAD/MSAD ablation for transfer_tiny: four short runs from the same FER+-pretrained stem,
# identical except for the MAD and MSAD drop probabilities, two at a time with one thread each.
# Usage: scripts/run_ablation.sh STEM_CHECKPOINT OUT_DIR [EPOCHS] [MAX_TRAIN_SAMPLES]
set -euo pipefail
stem=$1
out=$2
epochs=${3:-2}
samples=${4:-12800}
mkdir -p "$out"
run() {
    local mad=$1 msad=$2
    OMP_NUM_THREADS=1 python examples/finetune_ferplus.py --data_dir ../shared/ferplus \
        --ir_stem_checkpoint "$stem" --mad_p "$mad" --msad_p "$msad" \
        --label_mode majority --epochs "$epochs" --max_train_samples "$samples" --batch_size 64 \
        --learning_rate 1e-3 --weight_decay 0.05 --warmup_epochs 0.3 --drop_path_rate 0.0 \
        --randaugment 2 3 --random_erasing 0.1 --seed 0 \
        --output_dir "$out/mad${mad}_msad${msad}" > "$out/mad${mad}_msad${msad}.log" 2>&1
}
run 0.6 0.3 & run 0.0 0.0 & wait
run 0.6 0.0 & run 0.0 0.3 & wait
python - "$out" "$epochs" "$samples" "$stem" <<'PY'
import json, sys
from pathlib import Path
out, epochs, samples, stem = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
records = []
for mad, msad in (('0.6', '0.3'), ('0.0', '0.3'), ('0.6', '0.0'), ('0.0', '0.0')):
    results = json.loads((out / f'mad{mad}_msad{msad}' / 'results.json').read_text())
    records.append(dict(
        mad_p=float(mad), msad_p=float(msad), accuracy=results['validation']['accuracy'],
        mean_class_accuracy=results['validation']['mean_class_accuracy'],
        command=f'scripts/run_ablation.sh {stem} {out} {epochs} {samples}',
        description=(f'Short runs on the first {samples} FER2013Train images for {epochs} epochs, from the same '
                     f'FER+-pretrained stem and seed, differing only in the MAD and MSAD drop probabilities; '
                     f'best-epoch majority-vote accuracy on all of FER2013Valid. One seed each; run-to-run '
                     f'variance was not measured, so small differences may be noise.'),
    ))
(out / 'ablation.json').write_text(json.dumps(records, indent=2) + '\n')
print(json.dumps(records, indent=2))
PY
