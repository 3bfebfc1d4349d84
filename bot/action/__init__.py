"""The GitHub Action: which configs an event asks for, merging and publishing them, and the job report.

Modules, one idea each: `inputs` (the action's inputs from INPUT_* env), `events` (the event payload and the
files it changed, via git), `select` (config discovery, target repo naming, which configs to run),
`staleness` (published lock vs the parents' current shas), `dryrun` (plan + license verdict without merging),
`report` (step summary, outputs, annotations, masking) and `run` (the loop).
"""
