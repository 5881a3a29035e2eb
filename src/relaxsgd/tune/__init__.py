"""``relaxsgd tune``: choose an algorithm's settings for a job, network and budget in the
simulator, with Optuna as the search engine.

Modules: :mod:`.params` (the declaration types algorithms use for their ``search_space``),
:mod:`.space` (an algorithm's space plus the task recipe's training options, narrowed or
fixed by the user), :mod:`.objective` (what a trial scores), :mod:`.trial` (one simulated
trial), :mod:`.study` (the Optuna studies, workers, resume), :mod:`.outputs` (trials.csv,
best configs, plots, report.md), :mod:`.cli` (the subcommand). Nothing heavy is imported
here: algorithm files import :mod:`.params` at module level.
"""
