"""Tiny, real Hugging Face models built on the spot: for tests, the offline demo and benchmarks.

`build_tokenizer` trains a small byte-level BPE; `build_model` makes a Mistral- or Llama-shaped causal LM
(hidden 64, a few layers) and saves it like any checkpoint, so every code path (lazy reading, sharded
writing, `lm_eval --model hf`) runs on it exactly as on a 7B model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

CORPUS = [
    "The following are multiple choice questions (with answers) about medical knowledge.",
    "**Question:** Which vitamin deficiency causes scurvy? (A) Vitamin C (B) Vitamin D (C) Vitamin A (D) Iron",
    "**Answer:**(A The heart pumps blood through the arteries and veins of the body.",
    "Insulin is produced by the beta cells of the pancreas and lowers blood glucose.",
    "Aspirin irreversibly inhibits cyclooxygenase; the kidney filters blood; the liver makes bile.",
    "Context: A randomized trial of patients with hypertension. Is the treatment effective? yes no maybe",
    "Question: Options: A. B. C. D. E. [INST] Solve this Multiple Choice Question [/INST] Answer:",
    "anatomy genetics biology medicine clinical knowledge professional nutrition psychology science health",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384, extra_text: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) + list(extra_text), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    arch: str = "mistral",
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    tie_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
):
    """A randomly initialised tiny causal LM (arch: mistral, llama, qwen2 or qwen3) saved with the tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prefix = {"mistral": "Mistral", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config_cls, model_cls = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    save_model(model, tokenizer, out_dir, max_shard_size)
    return model


def save_model(model, tokenizer, out_dir: str | Path, max_shard_size: str | None = None) -> None:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    tokenizer.save_pretrained(str(out_dir))


def perturbed_copy(src_dir: str | Path, out_dir: str | Path, scale: float, seed: int) -> None:
    """A 'fine-tune' of `src_dir`: every floating tensor plus seeded Gaussian noise of std `scale`·std(tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale * float(p.float().std() + 1e-3))
    save_model(model, AutoTokenizer.from_pretrained(str(src_dir)), out_dir)


def finetune_on_answers(
    src_dir: str | Path,
    out_dir: str | Path,
    examples: list[tuple[str, str]],
    steps: int = 150,
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> None:
    """A 'fine-tune' that really learns: train `src_dir` to continue each prompt with its answer (loss on the
    answer tokens only), for a few CPU seconds, and save it to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir))
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), dtype=torch.float32)
    encoded = []
    for prompt, answer in examples:
        context = tokenizer(prompt).input_ids
        full = tokenizer(prompt + answer).input_ids
        labels = [-100] * len(context) + full[len(context) :]
        encoded.append((full, labels))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = [encoded[int(i)] for i in torch.randint(len(encoded), (batch_size,), generator=generator)]
        width = max(len(ids) for ids, _ in batch)
        pad = tokenizer.eos_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    save_model(model, tokenizer, out_dir)


def build_lora(
    base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, safetensors: bool = True, **options
) -> None:
    """A PEFT LoRA adapter for `base_dir` with random (non-zero) A and B and perturbed `modules_to_save`, saved
    to `out_dir`; `options` go to peft's LoraConfig (r, lora_alpha, target_modules, use_rslora, rank_pattern...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **options}
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():  # "train" the modules saved whole, so that replacing them shows
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.01)
    peft_model.save_pretrained(str(out_dir), safe_serialization=safetensors)


def merged_lora_state(base_dir: str | Path, adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of an adapter into its base (`merge_and_unload`, as mergekit runs it): the reference
    that `BASE+ADAPTER` inputs are checked against."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
