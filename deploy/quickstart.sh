#!/usr/bin/env bash
# The README's main job: a SQLite ledger, the embedded SmolLM2-135M and the shipped HORSE hypernet.
# Adds a few well-known facts with new targets, protects one fact, applies one night's batch, shows `ask`
# before and after, the gate's measurements and rejections, and a rollback. Everything lives in a fresh temp dir (or $1).
set -euo pipefail
work="${1:-$(mktemp -d -t horse-ledger-quickstart.XXXXXX)}"
export HORSE_LEDGER_DB="sqlite:///$work/ledger.db"
export HORSE_LEDGER_DATA_DIR="$work"
export HORSE_LEDGER_SNAPSHOT_DIR="$work/snapshots"
# Demo settings, not the production defaults (`horse-ledger init` writes those, commented): a small night
# (20 edits) and a relaxed canary bar. HORSE with the shipped SmolLM2 hypernet moved the greedy next token of
# 40 % of unrelated prompts in a batch of this size (README, "What the quickstart shows"); the
# production bar (0.95) rejects such batches. Protected facts are checked at the production setting.
export HORSE_LEDGER_BATCH_MAX_EDITS=20 HORSE_LEDGER_GATE_MIN_CANARY_AGREEMENT=0.75 HORSE_LEDGER_GATE_BISECT_DEPTH=3
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
hl ask "Lionel Messi plays the sport of" --max-new-tokens 4 --top 3
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 4 --top 3
hl apply
hl status
hl snapshots
# what the night changed (if its edit was published), and what the gate kept (the Eiffel Tower edit moves
# the protected "The capital of France is Paris": bisection rejects it)
hl ask "Lionel Messi plays the sport of" --max-new-tokens 4 --top 3
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 4 --top 3
hl ask "The capital of France is" --max-new-tokens 4 --top 3
hl show 2
hl rollback base
hl ask "Lionel Messi plays the sport of" --snapshot head --max-new-tokens 4 --top 3
hl status
