#!/usr/bin/env bash
# The evaluations in docs/evaluation.md, for a run directory (default runs/flickr8k) and its untrained twin.
set -euo pipefail
R=${1:-runs/flickr8k}
D=${LIGHTCRL_DATA:-../shared/data}
L=${LIGHTCRL_BIN:-.venv/bin/lightcrl}
for U in "" "--untrained"; do
  $L eval --run "$R" $U --task retrieval --data "flickr8k:$D/flickr8k" --split dev
  $L eval --run "$R" $U --task zeroshot --data "imagefolder:$D/cifar10" --split test --limit 2000
  $L eval --run "$R" $U --task geometry --data "flickr8k:$D/flickr8k" --split dev
  $L eval --run "$R" $U --task linear_probe --data "imagefolder:$D/cifar10" --split test --limit 2000 --train-limit 2000
done
$L eval --run "$R" --task sts --data "stsb:$D/sts/STSBenchmark" --split test
$L eval --run "$R" --task linear_probe --data "imagefolder:$D/tinyimagenet" --split test --limit 2000 --train-limit 2000
$L eval --run "$R" --task finetune --data "imagefolder:$D/tinyimagenet" --split test --limit 2000 --train-limit 2000 --epochs 10
$L report "$R"
