"""What `--model medmerge-fusion` needs to evaluate a trained combiner: the combiners (combiners.py), the members'
outputs reduced to the answer options and their cache (features.py), and the FUSION_DIR format (saved.py).
Training them is the application's (`medmerge fuse train`, medmerge/fusion/train.py)."""
