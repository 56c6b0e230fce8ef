"""Export, after training: each trained stage merged into full weights in the hub layout with its card
(`merge`; `python -m train.export RUN_DIR`), and the hub side: the base's hub id, model cards, the upload (`hub`).
The portable adapter format and the hub checkpoint's own files belong to the model package
(`models/adapters.py`, `models/phi3v/export_files.py`)."""
