"""mae-search: ablations and hyperparameter searches of Masked Autoencoders on Ray, tracked in MLflow.

Layers, each importing only those below it (tests/test_layout.py checks it):
``cli`` -> ``report/`` -> ``search/`` -> ``training/`` -> ``data/``, ``mae/`` -> ``config`` (and its
``parsing``), ``metrics``, ``storage``.
"""
