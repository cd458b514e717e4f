"""Tiny random GPT-NeoX and OLMo-2 "suites" on disk: one save_pretrained directory per revision, each with a
small byte-level BPE tokenizer, so tests probe public-suite architectures with no network access."""

from __future__ import annotations

from pathlib import Path

VOCAB = 320
EOS = "<|endoftext|>"
# Revision names in each suite's own style; tokens_per_step 1,000 for Pythia-like, names carry tokens for OLMo-2.
NEOX_REVISIONS = ["step0", "step2", "step8"]
OLMO2_REVISIONS = ["stage1-step0-tokens0K", "stage1-step3-tokens6K"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qkrank.builtin_corpus import load_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d["text"] for d in load_documents()[:200]), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def neox_config():
    from transformers import GPTNeoXConfig

    # Pythia's shape in miniature: partial rotary (a quarter of each head's dims), parallel residual.
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, rotary_pct=0.25, max_position_embeddings=256,
                         use_parallel_residual=True, bos_token_id=0, eos_token_id=0)


def olmo2_config():
    from transformers import Olmo2Config

    # Grouped-query attention (4 query heads, 2 KV heads) to exercise the K-head grouping.
    return Olmo2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build_suite(root: Path, config, revisions: list[str]) -> Path:
    """``root/<revision>/`` for each revision: random weights (seeded by the revision's index) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    for i, revision in enumerate(revisions):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config)
        if config.model_type == "olmo2":
            for layer in model.model.layers:  # OLMo-2: γ away from its init of 1, so the γ datasets are telling
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.data.uniform_(0.5, 1.5)
        model.save_pretrained(root / revision)
        tokenizer.save_pretrained(root / revision)
    return root
