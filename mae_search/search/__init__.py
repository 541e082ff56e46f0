"""A search on Ray: the space files (space.py), the trial record (record.py) and every file of a search
(search_dir.py), the reference rows shared under a storage root (reference_store.py), the cluster
(cluster.py), Optuna and ASHA (strategy.py), resume checks (resume.py), the run itself (run.py,
interrupt.py, trial.py, seed_run.py, ddp.py), the results table, MLflow tracking (and its catch-up,
track.py) and the live view.
The only part that imports Ray (with data/prepare.py's tasks); imports ``training/`` and below."""
