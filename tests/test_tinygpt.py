"""TinyGPT and the byte-token data of notebooks 06 to 10."""

import math

import pytest
import torch

from workshop import data, models


def test_sizes_and_parameter_counts():
    with torch.device("meta"):
        counts = {size: models.count_parameters(models.tinygpt(size)) for size in models.TINYGPT_SIZES}
    assert counts == {"cpu": 870_656, "small": 25_576_448, "gpu": 303_138_816}
    tied = models.tinygpt("cpu", tie_weights=True)
    assert models.count_parameters(tied) == counts["cpu"] - 256 * 128


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="dim 130 is not divisible by heads 4"):
        models.TinyGPT(dim=130, heads=4)
    with pytest.raises(ValueError, match="unknown TinyGPT size 'huge'"):
        models.get_model("tinygpt", size="huge")
    model = models.tinygpt("cpu", max_seq_len=8)
    with pytest.raises(ValueError, match="9 tokens exceed the model's max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_kv_cache_gives_the_logits_and_tokens_of_the_full_forward():
    torch.manual_seed(0)
    model = models.tinygpt("cpu").eval()
    tokens = torch.randint(256, (2, 20))
    full = model(tokens)
    cache = models.KVCache(model.depth)
    pieces = [model(tokens[:, :12], cache), model(tokens[:, 12:15], cache)]  # a prefill, then a chunk
    pieces += [model(tokens[:, i:i + 1], cache) for i in range(15, 20)]  # then one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 20
    prompt = tokens[:, :5]
    greedy = models.generate(model, prompt, 10)
    assert greedy.shape == (2, 15) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, models.generate(model, prompt, 10, use_cache=False))
    sampled = [models.generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
               for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1])


def test_text_is_deterministic_and_round_trips():
    assert data.make_text(500, seed=1) == data.make_text(500, seed=1) != data.make_text(500, seed=2)
    text = data.make_text(2000)
    assert len(text) >= 2000 and text.count(".\n") > 20
    assert data.decode(data.encode(text)) == text
    assert data.decode(data.encode("Zürich")) == "Zürich"


def test_token_windows_are_shifted_by_one():
    train, test, info = data.get_text_dataset(seq_len=16, num_train_tokens=1000, num_test_tokens=200)
    assert (info.vocab_size, info.num_train_tokens, info.num_test_tokens) == (256, 1000, 200)
    assert len(train) == 999 // 16 and len(test) == 199 // 16
    x, y = train[3]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert torch.equal(train.tokens[48:64], x)


def test_text_file_and_missing_name(tmp_path, monkeypatch):
    (tmp_path / "story.txt").write_text("once upon a time " * 50, encoding="utf-8")
    monkeypatch.setenv("WORKSHOP_DATA", str(tmp_path))
    train, test, info = data.get_text_dataset("story", seq_len=8)
    assert info.name == "story" and info.num_train_tokens == int(0.9 * 850)
    with pytest.raises(ValueError, match="unknown text data set 'nothere'"):
        data.get_text_dataset("nothere")


def test_loss_falls_well_below_uniform():
    torch.manual_seed(0)
    train, _, _ = data.get_text_dataset(seq_len=64, num_train_tokens=40_000)
    model = models.tinygpt("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step, (x, y) in enumerate(data.make_loader(train, 16, shuffle=True)):
        loss = models.lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 30:
            break
    assert loss.item() < 0.6 * math.log(256), loss.item()


def test_decode_flops_and_kv_cache_bytes_match_what_a_decoding_step_does():
    """The formulas of notebook 11 against FlopCounterMode's count of one cached decoding step (matmuls and
    scaled_dot_product_attention) and against the bytes the KVCache holds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = models.tinygpt("cpu").eval()
    cache = models.KVCache(model.depth)
    with torch.no_grad():
        model(torch.randint(256, (1, 20)), cache)  # a prompt of 20 tokens
        # the math backend spells attention as matmuls, which the counter sees (a fused CPU kernel it would not)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.randint(256, (1, 1)), cache)  # the 21st token: t = 21 keys and values per layer
    assert counter.get_total_flops() == models.decode_flops_per_token(model, 21)
    cached = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(cache.keys, cache.values))
    assert cached == models.kv_cache_bytes(model, 21) == 2 * 4 * 21 * 128 * 4
    assert models.decode_flops_per_token("cpu", 21) == models.decode_flops_per_token(model, 21)
    # the GPU size without building it: 24 layers of 1024, a 512-token context in bf16
    assert models.kv_cache_bytes("gpu", 512, bytes_per_element=2) == 2 * 24 * 512 * 1024 * 2
    assert models.decode_flops_per_token("gpu", 512) == 2 * (24 * 12 * 1024**2 + 1024 * 256) + 4 * 24 * 512 * 1024
