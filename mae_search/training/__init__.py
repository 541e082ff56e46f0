"""One seed's work on one device or DDP group: pre-training (train.py), the evaluation protocols
(evaluate.py: probe, k-NN, reconstruction, references; finetune.py), checkpoints and the lr schedule.
Imports ``mae/`` and ``data/``; knows nothing of Ray."""
