"""The GitHub Action: which configs an event asks for, merging and publishing them, and the job report.

Modules, one idea each: `inputs` (the action's inputs from INPUT_* env), `events` (the event payload and the
files it changed, via git), `select` (config discovery, target repo naming, which configs to run),
`staleness` (published lock vs the parents' current shas), `dryrun` (plan + license verdict without merging),
`report` (results, step summary, outputs), `runner_log` (everything written to the runner, escaped: log lines,
workflow commands, summary Markdown, outputs), `credentials` (no token on pull-request events) and `run`
(the loop).
"""
