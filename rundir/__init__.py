"""The run directory's one owner: every file and folder name of its layout and the paths built from them
(`layout`), durable writes (`atomic`), a stage's folder and the run's record (`stage`), which weights a stage holds
(`weights`), the manifests that make a folder trustworthy (`manifest`) and the one-writer lock (`run_lock`).
Every stage, the eval CLI and export ask it; no other module spells a name of the layout (docs/architecture.md)."""
