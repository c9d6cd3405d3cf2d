#!/usr/bin/env bash
# The demo's steps as plain commands: adapt DATA to your own ImageFolder tree (DATA/train, DATA/test).
# First create the data once with:  unicom demo -o unicom-demo
# The starting network is the demo's: a random initialisation asked for explicitly (seed 0).
set -euo pipefail
OUT=${OUT:-unicom-demo}
DATA=$OUT/digits
ARCH=$OUT/demo-vit.json
unicom eval-retrieval --model "$ARCH" --random-init --seed 0 --dataset "folder:$DATA/test" --recall-at 1,2,4,8
unicom finetune --model "$ARCH" --random-init --seed 0 --dataset "folder:$DATA" --epochs 3 --batch-size 64 \
  --lr 1e-3 --lr-pfc-weight 10 --m2 0.3 --no-augment --device cpu --output "$OUT/finetune-again"
unicom eval-retrieval --model "$ARCH" --weights "$OUT/finetune-again/model.pt" --dataset "folder:$DATA/test"
unicom embed "$DATA/test" -o "$OUT/features/again.npy" --model "$ARCH" --weights "$OUT/finetune-again/model.pt" --normalize --overwrite
unicom eval-retrieval --embeddings "$OUT/features/again.npy" --dataset "folder:$DATA/test" --vis "$OUT/again.jpg"
