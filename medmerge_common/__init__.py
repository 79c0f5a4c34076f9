"""What the merge engine (`merge`), the lm-eval plugin (`medmerge_tasks`) and the application (`medmerge`)
share, and nothing else: the user-facing error type (`errors`), output directories that appear whole or not at
all (`outdir`), and the hub reachability probe (`hub`). Standard library only, so any layer may import it.
"""
