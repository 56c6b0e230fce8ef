"""What every training stage shares: the model a stage trains (`model_loading`) and what of it trains
(`trainable`), where it runs (`device`), the optimizer (`optim`), the step loop (`loop`), checkpoints
(`checkpoint`), trackers (`tracking`), callbacks, SFT's token loss and the completion log-probs the preference
stages score (`losses`), SFT's validation loss (`validation_loss`), sequence-parallel groups (`sequence_groups`),
opening and fitting a stage (`trainer`) and the command line the entry points share (`cli`)."""
