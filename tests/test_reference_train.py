"""The reference-model training: the entry point run tiny (the session's ``tiny_reference_models``),
the fixed data split, the balance loss, the twins' parameter budget."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from moe_onnx.reference import MODEL_NAMES
from moe_onnx.reference.corpus import stdlib_files
from moe_onnx.reference.train import TINY, balance_loss, build, parameter_counts, steps_for


def test_split_is_fixed_sorted_and_disjoint():
    train, held_out = stdlib_files()
    assert held_out and len(train) > 5 * len(held_out)
    assert train == sorted(train) and held_out == sorted(held_out)
    assert not set(train) & set(held_out)
    assert (train, held_out) == stdlib_files()


def test_tiny_run_writes_three_loadable_checkpoints(tiny_reference_models):
    for name in MODEL_NAMES:
        folder = tiny_reference_models / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert tokenizer.get_vocab_size() == model.config.vocab_size == TINY.vocab_size
        assert tokenizer.token_to_id("<|endoftext|>") == 0
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 0
        assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
        record = json.loads((folder / "training.json").read_text())
        assert record["steps"] == 2 and record["tokens_seen"] == 2 * TINY.batch * TINY.context
        assert not set(record["train_files"]) & set(record["heldout_files"])
        assert record["heldout_ppl"] == pytest.approx(np.exp(record["heldout_nll"]))
        assert record["heldout_ppl"] > 1
    record = json.loads((tiny_reference_models / "moe" / "training.json").read_text())
    load = record["expert_load"]["tokens_per_expert"]
    assert len(load) == TINY.layers and all(len(layer) == TINY.experts for layer in load)
    assert len({sum(layer) for layer in load}) == 1  # every layer routes every position top_k times


def test_the_three_models_share_tokenizer_and_data(tiny_reference_models):
    records = [json.loads((tiny_reference_models / n / "training.json").read_text()) for n in MODEL_NAMES]
    for key in ("tokens_seen", "seed", "train_files_digest", "heldout_files_digest", "budget"):
        assert len({json.dumps(r[key]) for r in records}) == 1, key
    tokenizers = {(tiny_reference_models / n / "tokenizer.json").read_bytes() for n in MODEL_NAMES}
    assert len(tokenizers) == 1


def test_minutes_sizes_the_step_count():
    stream = np.arange(4096, dtype=np.int64) % TINY.vocab_size
    torch.set_num_threads(1)
    assert steps_for(0.001, stream, TINY, ["moe"]) >= 1
    assert steps_for(1.0, stream, TINY, ["moe"]) > steps_for(0.01, stream, TINY, ["moe"])


def test_balance_loss_is_one_when_balanced_and_sees_each_layer():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    balanced_TE = torch.eye(8).repeat(4, 1) * 20  # each expert first choice of 4 of the 32 tokens
    assert float(balance_loss((balanced_TE,), top_k=1)) == pytest.approx(1.0, abs=1e-3)
    low_TE = torch.cat([torch.eye(4).repeat(8, 1) * 20, torch.zeros(32, 4)], dim=1)  # experts 0-3 only
    high_TE = low_TE.roll(4, dims=1)  # experts 4-7 only
    # Pooled over the two layers the load is balanced, which is all transformers' aux loss sees.
    assert float(load_balancing_loss_func((low_TE, high_TE), 8, top_k=1)) == pytest.approx(1.0, abs=1e-3)
    assert float(balance_loss((low_TE, high_TE), top_k=1)) == pytest.approx(2.0, abs=1e-3)


def test_twins_match_the_moe_in_active_and_total_parameters():
    counts = {n: parameter_counts(build(n, TINY)) for n in MODEL_NAMES}
    assert counts["dense-active"]["total"] == counts["dense-active"]["active_per_token"]
    assert abs(counts["dense-active"]["total"] / counts["moe"]["active_per_token"] - 1) < 0.05
    assert abs(counts["dense-total"]["total"] / counts["moe"]["total"] - 1) < 0.10
