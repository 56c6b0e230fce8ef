"""python -m train.memory RECIPE: the memory planner's command (the planner is train/tools/memory_plan.py)."""

from train.tools.memory_plan import main

if __name__ == "__main__":
    main()
