"""`python -m ledger` runs the horse-ledger CLI (same as the console script)."""
from ledger.cli import main

main()
