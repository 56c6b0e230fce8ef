"""Command-line tools that are not training stages: the dry run (`dry_run`, `dry_run_grpo`; users run
`python -m train.dry_run`), the memory planner (`memory_plan`; `python -m train.memory`) and what `launch.sh` reads
from a recipe (`launch_plan`)."""
