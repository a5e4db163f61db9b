#!/usr/bin/env bash
# The README's main job: a SQLite ledger, the embedded SmolLM2-135M and the shipped HORSE hypernet.
# Adds a few well-known facts with new targets, protects one fact, applies one night's batch, shows `ask`
# before and after, the gate's measurements and rejections, and a rollback. Everything lives in a fresh temp dir (or $1).
set -euo pipefail
work="${1:-$(mktemp -d -t horse-ledger-quickstart.XXXXXX)}"
export HORSE_LEDGER_DB="sqlite:///$work/ledger.db"
export HORSE_LEDGER_DATA_DIR="$work"
export HORSE_LEDGER_SNAPSHOT_DIR="$work/snapshots"
# The default configuration (`horse-ledger init` writes it): routed serving, the production gate. Only the night
# is smaller than a production night (20 edits instead of batch_max_edits = 100), so that the demo takes minutes.
export HORSE_LEDGER_BATCH_MAX_EDITS=20
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
hl protect add --subject France --prompt "The capital of {} is" --target Paris --note "must never change"
# an edit that contradicts the protected fact: the gate rejects it, and only it
hl add --subject France --prompt "The capital of {} is" --target Lyon --target-true Paris --author quickstart
hl add --from "$(dirname "$0")/quickstart-facts.jsonl"
hl ask "Lionel Messi plays the sport of" --max-new-tokens 4 --top 3
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 4 --top 3
hl apply || echo "(apply exited $?: 3 = the night ran and published nothing)"
hl status
hl snapshots
# what the night changed: each edit acts only where its subject is named; the protected fact holds
hl ask "Lionel Messi plays the sport of" --max-new-tokens 4 --top 3
hl ask "The Eiffel Tower is located in the city of" --max-new-tokens 4 --top 3
hl ask "The capital of France is" --max-new-tokens 4 --top 3
hl show 4
# the head as a transformers model dir: loaded with trust_remote_code it serves the same routes as `ask`
hl export head --out "$work/export"
python - "$work/export" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
for prompt in ("Lionel Messi plays the sport of", "The Eiffel Tower is located in the city of", "The capital of France is"):
    ids = tok(prompt, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"[export] {prompt}{tok.decode(gen[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)}")
PY
hl rollback base
hl ask "Lionel Messi plays the sport of" --snapshot head --max-new-tokens 4 --top 3
hl status
