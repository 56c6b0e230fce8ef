"""DPO's own modules (the stage itself is `train/dpo.py`): the loss family equal to TRL's (`losses`), the
stage's loss on shared-prompt or two-row batches (`stage_loss`), the precomputed reference log-probs
(`reference_cache`) and the held-out preference accuracy (`heldout_accuracy`)."""
