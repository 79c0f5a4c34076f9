"""The I/O floor of a merge: read every tensor of the input models and write one model, with plain safetensors
calls and no arithmetic. `merge_bench.py` times it beside the merges; a merge cannot be faster than this.

    python benchmarks/io_floor.py OUT_DIR MODEL_DIR [MODEL_DIR ...]

Output shards follow the first model's; each is written once its tensors are read (one shard in memory). Every
tensor is copied into memory (safetensors' `get_tensor` only maps the file: a tensor nobody touches is never
read, which made earlier floors count one model's reads, not three).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def weight_map(directory: Path) -> dict[str, str]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(directory / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def copy_through(out: Path, models: list[Path]) -> None:
    maps = [weight_map(m) for m in models]
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(set(maps[0].values())):
        names = [n for n, f in maps[0].items() if f == shard]
        kept = {}
        for model, files in zip(models, maps):
            for file in sorted({files[n] for n in names}):
                with safe_open(model / file, "pt") as f:
                    for name in names:
                        if files[name] == file:
                            # get_tensor maps the file without reading it: clone() reads the bytes into memory
                            tensor = f.get_tensor(name).clone()
                            if model == models[0]:
                                kept[name] = tensor
        save_file(kept, out / shard, metadata={"format": "pt"})


if __name__ == "__main__":
    copy_through(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
