"""`medmerge fuse train`: trained output ensembles over frozen members (train.py); the combiners, the members'
cached features and the FUSION_DIR format live in the plugin (medmerge_tasks/fusion), which evaluates them."""
