"""Tiny assets for recipe tests: a byte-level BPE tokenizer trained in-test, a tiny Llama-style
HF checkpoint directory, and small chat / preference data files."""

from __future__ import annotations

import json
import os
import pathlib

import torch

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QA = [
    ("What color is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("Where do fish live?", "Fish live in water."),
    ("What do cats say?", "Cats say meow."),
    ("What is ice?", "Ice is frozen water."),
    ("How many legs has a dog?", "A dog has four legs."),
    ("What is the sun?", "The sun is a star."),
    ("Say hello.", "Hello there, friend!"),
    ("What do bees make?", "Bees make honey."),
    ("Is snow cold?", "Yes, snow is cold."),
    ("What is a rose?", "A rose is a flower."),
]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer_files(out_dir: str, vocab_size: int = 320) -> None:
    """Trains a byte-level BPE on the Q/A text and writes HF tokenizer files into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [f"user {q} assistant {a}" for q, a in QA] * 4 + ["system You are a helpful assistant."]
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML_JINJA,
                "model_max_length": 512,
            },
            f,
        )


def make_tiny_checkpoint(out_dir: str, seed: int = 0, vocab_size: int = 320, tied: bool = True) -> str:
    """A tiny Llama-architecture HF checkpoint (random weights) with the tiny tokenizer."""
    from tinytune.checkpoint import ModelInfo, save_hf_checkpoint
    from tinytune.models import llama_decoder

    make_tokenizer_files(out_dir, vocab_size)
    from tinytune.tokenizers import load_tokenizer

    n_vocab = load_tokenizer(out_dir).vocab_size
    vocab = max(vocab_size, -(-n_vocab // 64) * 64)
    torch.manual_seed(seed)
    hp = dict(
        vocab_size=vocab,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        max_seq_len=256,
        rope_base=10000.0,
        norm_eps=1e-5,
        tie_embeddings=tied,
    )
    model = llama_decoder(**hp)
    with torch.no_grad():  # embeddings large enough that (tied) logits can become confident
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2 if "tok_embeddings" in name else 0.05)
    info = ModelInfo(
        model_type="llama",
        vocab_size=vocab,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        norm_eps=1e-5,
        rope_base=10000.0,
        max_seq_len=256,
        tie_word_embeddings=tied,
    )
    save_hf_checkpoint(model, info, out_dir, tokenizer_dir=out_dir)
    return out_dir


def write_chat_jsonl(path: str, n: int | None = None) -> str:
    """OpenAI-style ``messages`` rows from the Q/A pairs."""
    rows = QA if n is None else (QA * (1 + n // len(QA)))[:n]
    with open(path, "w") as f:
        for q, a in rows:
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    return path


def write_preference_jsonl(path: str) -> str:
    """Preference rows: chosen = the right answer, rejected = another pair's answer."""
    with open(path, "w") as f:
        for i, (q, a) in enumerate(QA):
            wrong = QA[(i + 3) % len(QA)][1]
            f.write(json.dumps({"prompt": q, "chosen": a, "rejected": wrong}) + "\n")
    return path


def tiny_recipe_assets(root) -> dict:
    """The inputs most recipe tests share, written under ``root``: a tiny checkpoint and chat data.

    Returns:
        ``{"root": pathlib.Path, "ckpt": checkpoint dir, "chat": chat JSONL path}``.
    """
    root = pathlib.Path(root)
    return {
        "root": root,
        "ckpt": make_tiny_checkpoint(str(root / "model")),
        "chat": write_chat_jsonl(str(root / "chat.jsonl")),
    }


def tiny_sft_config(assets: dict, out, **over) -> dict:
    """An SFT recipe config on :func:`tiny_recipe_assets`: CPU, fp32, seed 0, the chat data as
    ChatML at 64 tokens; ``over`` adds or replaces top-level keys."""
    cfg = {
        "output_dir": str(out),
        "checkpoint_dir": assets["ckpt"],
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "dataset": {
            "_component_": "tinytune.datasets.chat_dataset",
            "source": assets["chat"],
            "template": "chatml",
            "max_seq_len": 64,
        },
    }
    cfg.update(over)
    return cfg
