#!/usr/bin/env bash
# check_requeue.sh - the Slurm flow end to end, on a real cluster (by hand; not pytest or CI).
#
#   scripts/slurm/local-cluster.sh start     # or any cluster where you can submit 2-task jobs
#   scripts/slurm/check_requeue.sh [WORKDIR] # default /tmp/alexnet-slurm-check
#
# Submits scripts/slurm/train.sbatch three times as a 2-task CPU job (gloo DDP, a small
# model on generated JPEGs): one runs straight through; two are preempted in their first
# epoch, one with `scancel --signal=USR1` (Slurm signals every task, as `--signal=USR1@T`
# does) and one with `scancel --batch --signal=USR1` (the batch shell only, as
# `--signal=B:USR1@T` does: train.sbatch passes it on).  Each saves, exits 138, requeues
# itself, waits out Slurm's requeue delay (~2 min by default), resumes and finishes.  A
# fourth is cancelled with a plain `scancel` (SIGTERM to every process of the job, the
# DataLoader workers included, then SIGKILL after KillWait): its tasks save and exit 143,
# the job ends CANCELLED, and the same sbatch again resumes and finishes.  Then it checks
# that all four runs' final weights are bit-identical and prints the logs.
# Exit 0 when they are.  About 6 minutes on 2 cores.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/alexnet-slurm-check}
rm -rf "$work"
mkdir -p "$work"
cd "$work"

python3 - "$work/data" <<'EOF'
import sys, random
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
rng = random.Random(0)
colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
for split, per_class in (("train", 40), ("val", 8)):
    for c, colour in enumerate(colours):
        folder = root / split / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = [tuple(min(255, max(0, v + rng.randint(-60, 60))) for v in colour) for _ in range(80 * 80)]
            img = Image.new("RGB", (80, 80))
            img.putdata(pixels)
            img.save(folder / f"{i}.jpg", quality=90)
EOF

args=(--config "$repo/configs/demo.yaml" --set data.demo=false "data.train_dir=$work/data/train"
      "data.val_dir=$work/data/val" model.num_classes=4 data.batch_size=8 train.epochs=3
      optim.lr=0.002 train.device=cpu train.log_interval=1 dist.backend=gloo data.workers=1)
submit() {  # name, then alexnet-train's --out
    sbatch --parsable --job-name "$1" --nodes 1 --ntasks-per-node 2 --cpus-per-task 1 --gpus-per-node 0 \
        --time 30 --output "$work/$1.out" "$repo/scripts/slurm/train.sbatch" "${args[@]}" --out "$work/$1"
}
state() { scontrol show job "$1" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
wait_done() {
    while true; do
        s=$(state "$1")
        case "$s" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) echo "$s"; return;; esac
        sleep 2
    done
}

preempt() {  # job, scancel options: signal it a few steps into epoch 1, see it requeued
    until grep -q "^epoch 1/3 train 6/" "$work/$2.out" 2>/dev/null; do sleep 0.5; done
    echo "$(date +%T) scancel $3 --signal=USR1 $1"
    scancel $3 --signal=USR1 "$1"
    until grep -q "Restarts=1" <(scontrol show job "$1"); do sleep 1; done
    echo "$(date +%T) job $1 requeued: $(scontrol show job "$1" | grep -o 'JobState=[A-Z]* Reason=[A-Za-z]*')"
}

straight=$(submit straight)
echo "straight run: job $straight"
echo "straight: $(wait_done "$straight")"
tasks=$(submit tasks)
batch=$(submit batch)
echo "preempted runs: job $tasks (signal to the tasks), job $batch (signal to the batch shell)"
preempt "$tasks" tasks ""
preempt "$batch" batch "--batch"
echo "tasks: $(wait_done "$tasks") ($(scontrol show job "$tasks" | grep -o 'Restarts=[0-9]*'))"
echo "batch: $(wait_done "$batch") ($(scontrol show job "$batch" | grep -o 'Restarts=[0-9]*'))"

term=$(submit term)
echo "cancelled run: job $term (plain scancel: SIGTERM to every process)"
until grep -q "^epoch 1/3 train 6/" "$work/term.out" 2>/dev/null; do sleep 0.5; done
echo "$(date +%T) scancel $term"
scancel "$term"
echo "term: $(wait_done "$term")"
grep -q "interrupted by SIGTERM; resumable checkpoint" "$work/term.out" || { echo "term: no checkpoint saved"; exit 1; }
again=$(submit term)
echo "term, submitted again: job $again: $(wait_done "$again")"

for name in straight tasks batch term; do
    echo "---- $name.out (without the per-step lines)"
    grep -v " train [0-9]*/\| val [0-9]*/" "$work/$name.out"
done
python3 - "$work"/{straight,tasks,batch,term}/last.pth <<'EOF'
import sys, torch
a, *others = (torch.load(p, weights_only=True) for p in sys.argv[1:])
same = [all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) for b in others]
print(f"epochs {[s['epoch'] for s in (a, *others)]}; preempted runs' weights bit-identical to straight: {same}")
sys.exit(0 if all(same) and all(s["epoch"] == 3 for s in (a, *others)) else 1)
EOF
