"""What goes into the output directory besides the weights: config, tokenizer, recipe and model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from merge.plan import MergePlan
from merge.vocabulary import copy_tokenizer_files

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_metadata(plan: MergePlan, model_dirs: dict[str, Path | None], out: Path, recipe_text: str, seed: int) -> None:
    """config.json, generation_config.json, tokenizer files, the recipe verbatim and README.md."""
    recipe = plan.recipe
    (out / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    reference_dir = model_dirs.get(plan.reference)
    if reference_dir and (reference_dir / "generation_config.json").is_file():
        shutil.copyfile(reference_dir / "generation_config.json", out / "generation_config.json")
    if plan.vocabulary is not None:
        plan.vocabulary.save(out)
    elif reference_dir:  # the reference's tokenizer, which every model shares
        copy_tokenizer_files(reference_dir, out)
    if recipe.chat_template:
        template = CHATML if recipe.chat_template == "chatml" else recipe.chat_template
        (out / "chat_template.jinja").write_text(template)
        config_path = out / "tokenizer_config.json"
        if config_path.is_file():
            tok_config = json.loads(config_path.read_text())
            tok_config["chat_template"] = template
            config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    (out / "medmerge_recipe.yaml").write_text(recipe_text)
    (out / "README.md").write_text(model_card(plan, recipe_text, seed))


def model_card(plan: MergePlan, recipe_text: str, seed: int) -> str:
    recipe = plan.recipe
    method = recipe.method
    front = {"base_model": plan.models, "library_name": "transformers", "tags": ["merge", "medmerge"]}
    method_line = f"[{method.name}]({method.paper})" if method.paper else method.name
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {recipe.name or (recipe.source_file.stem if recipe.source_file else 'merged model')}",
        "",
        f"A merge of pre-trained language models made with medmerge, using the {method_line} method "
        f"({method.summary}).",
        "",
    ]
    if recipe.layer_scaling is not None:
        scaling = recipe.layer_scaling
        lines += [
            f"The merged task vector is then scaled by layer with [LiNeS](https://arxiv.org/abs/2410.17146): "
            f"{scaling.alpha:g} + {scaling.beta:g}·l/(L−1) at layer l of L, {scaling.alpha:g} outside the layers.",
            "",
        ]
    if recipe.base_model:
        lines += [f"Base model: `{recipe.base_model}`.", ""]
    lines += ["## Models merged", ""] + [f"- `{m}`" for m in plan.models] + [""]
    lines += [
        f"{len(plan.jobs)} tensors, {plan.num_layers} layers"
        + (f", random seed {seed}" if method.random else "")
        + ".",
        "",
    ]
    lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
