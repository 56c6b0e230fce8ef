"""What every process of a job needs before any model or data: its rank, world and process group
(`processes`, `ranks`), its diagnostics (per-rank logs, Python stacks on a hang: `diagnostics`), and how a command
ends (a user's error as its message and exit status 2, secrets redacted: `command`). It imports only torch and the
standard library, so every package may import it."""
