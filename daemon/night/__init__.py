"""The routed night (config `scope = "routed"`, the default): every edited subject has a delta of its own, and
a text gets only the deltas of the subjects it names (horse/route.py).

    run.py      recover → claim → load the head → compute → settle → gate → publish (run_night)
    engine.py   the engine behind a Protocol (SubjectEngine): groups of requests → one factored delta each
    compute.py  the night's edits grouped by subject, each group solved (its earlier edits + the new ones)
    decide.py   settle (efficacy) and the gate's decision, subject by subject (rules: judge.py)
    publish.py  the route file, then one ledger transaction (ledger/chain.py owns every row written)
    routes.py   route files and the head's table (the fold of its chain)

`daemon/cycle.py` keeps the joint night (scope = subject | off), which the fine-tune and MEMIT engines need.
"""
