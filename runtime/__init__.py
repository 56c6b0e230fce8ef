"""What every process of a job needs before any model or data: its rank, world and process group, and whether the
model's parameters are sharded over them (`processes`); its diagnostics (per-rank logs, Python stacks on a hang:
`diagnostics`); and how a command ends on a user's error (the message alone and exit status 2, secrets redacted:
`user_errors`). It imports only torch and the standard library, so every package may import it."""
