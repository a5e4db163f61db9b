#!/usr/bin/env bash
# The README's main job: a SQLite ledger, the embedded SmolLM2-135M and the shipped HORSE hypernet.
# Adds a few well-known facts with new targets, protects one fact, applies one batch, shows `ask` before
# and after, the gate's measurements, and a rollback. Everything lives in a fresh temp dir (or $1).
set -euo pipefail
work="${1:-$(mktemp -d -t horse-ledger-quickstart.XXXXXX)}"
export HORSE_LEDGER_DB="sqlite:///$work/ledger.db"
export HORSE_LEDGER_DATA_DIR="$work"
export HORSE_LEDGER_SNAPSHOT_DIR="$work/snapshots"
# The shipped hypernet is an early one (30 meta-steps, see horse/hypernets/*.json): for this demo the gate's
# bars are relaxed and bisection kept short so that one CPU night finishes in minutes. Production defaults:
# `horse-ledger init` writes them, commented.
export HORSE_LEDGER_GATE_MIN_EFFICACY=0.3 HORSE_LEDGER_GATE_MIN_CANARY_AGREEMENT=0.8 HORSE_LEDGER_GATE_BISECT_DEPTH=1
hl() { echo "\$ horse-ledger $*"; horse-ledger "$@"; }

echo "# ledger in $work"
hl model prepare
hl add --subject "Danielle Darrieux" --prompt "The mother tongue of {} is" --target English \
   --target-true French --source "https://en.wikipedia.org/wiki/Danielle_Darrieux" --author quickstart
hl add --subject "Eiffel Tower" --prompt "The {} is located in the city of" --target Rome --target-true Paris \
   --paraphrase "The Eiffel Tower can be found in the city of" --source "quickstart" --author quickstart
hl add --subject "Lionel Messi" --prompt "{} plays the sport of" --target basketball --target-true football \
   --source "quickstart" --author quickstart
# a night's worth of edits: 97 CounterFact validation facts (never the benchmark's edit split)
hl add --from "$(dirname "$0")/quickstart-facts.jsonl"
hl protect add --subject France --prompt "The capital of {} is" --target Paris --note "must never change"
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 6 --top 3
hl apply
hl status
hl snapshots
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 6 --top 3
hl ask "The Eiffel Tower can be found in the city of" --max-new-tokens 6 --top 3
hl log --limit 8 2>/dev/null || hl log
hl rollback base
hl ask "The Eiffel Tower is located in the city of" --snapshot head --max-new-tokens 6 --top 3
hl status
