"""Ray Tune over the planner's Plans and over hyper-parameters; measurements written back into a planner profile.

``space`` (what is searched, no Ray) → ``searcher`` (the cost model proposes, measurements correct it) → ``trial``
(one short distgpt run on the trial's placement group) → ``report`` (table, best Plan, profile) ← ``runner``
(``distgpt tune``). Only this package, ``orchestrator/`` and the Ray Serve module import Ray.
"""
