"""The paper and nothing else: the MAE model (ViT encoder on visible patches, light decoder), masking, and
its losses. Imports only ``config``: no data, no training loop, no Ray."""
