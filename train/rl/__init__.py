"""GRPO's own modules (the stage itself is `train/grpo.py`): sampling G completions per prompt (`rollout`), the
rewards (`rewards`), the loss family equal to TRL's (`losses`), the prefix-sharing layout of a prompt and its
completions (`shared_layout`) and the loader and loss the loop runs (`step`)."""
