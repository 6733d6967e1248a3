"""Generation: decoding at fixed shapes (eager or compiled with torch.compile, CUDA graphs through
mode="reduce-overhead"), the prompts file that users extend, and whether two decodings agree. Notebook 11
uses it, and times it with `metrics.timed` (tokens/s, latency per token); tensor-parallel generation is
`models.generate` on a model split by `tp.apply_tp` (every rank runs the same loop and gets the same tokens).

    prompts = inference.read_prompts()                         # notebooks/prompts.txt, one a line
    timing = metrics.timed(lambda: models.generate(model, prompt, 64), new_tokens=64, batch_size=1)
    decoder = inference.StaticDecoder(model, compile=True)      # compiled once, at the first call
    tokens = decoder.generate(prompt, 64)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from workshop.base.progress import quiet
from workshop.base.runs import REPO
from workshop.check import Match, agree
from workshop.models import StaticKVCache, TinyGPT

PROMPTS = REPO / "notebooks" / "prompts.txt"


def read_prompts(path: str | Path = PROMPTS) -> list[str]:
    """The prompts of a text file, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}: write one prompt a line (see notebooks/prompts.txt)")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p.strip() and not p.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompt: write one prompt a line")
    return prompts


def next_token(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) tokens: the argmax when temperature is 0, else a sample of softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)


class StaticDecoder:
    """Generation with a StaticKVCache: the prompt is read in one eager forward (prefill), then each
    new token is one call of `step(token, position)`, whose shapes never change. With `compile`
    the step is `torch.compile`d (mode None for the default, "reduce-overhead" for CUDA graphs on a
    GPU): compiled at the first call, then reused for every step of every later generation of the
    same batch size. Greedy decoding gives the tokens of `models.generate`."""

    def __init__(self, model: TinyGPT, *, max_seq_len: int | None = None, compile: bool = False,
                 mode: str | None = None):
        self.model = model
        self.max_seq_len = max_seq_len or model.max_seq_len
        self.cache = StaticKVCache(model.depth, self.max_seq_len)
        self.step = torch.compile(self._step, mode=mode, fullgraph=True) if compile else self._step

    def _step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # (B, 1), (1,) -> (B, V)
        self.cache.input_pos = input_pos
        return self.model(token, self.cache)[:, -1]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        B, T = prompt.shape
        if T + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed max_seq_len {self.max_seq_len}")
        if self.cache.keys[0] is not None and self.cache.keys[0].shape[0] != B:
            self.cache = StaticKVCache(self.model.depth, self.max_seq_len)  # a new batch size: new buffers
        self.cache.input_pos = torch.arange(T, device=prompt.device)
        logits = self.model(prompt, self.cache)[:, -1]  # prefill, eager: the prompt's length varies
        tokens = [prompt]
        # the first step compiles; inductor on CPU then says it found no CUDA, which we know
        with quiet("torch.utils.cpp_extension"):
            for i in range(max_new_tokens):
                tokens.append(next_token(logits, temperature, generator))
                if i + 1 < max_new_tokens:
                    logits = self.step(tokens[-1], torch.tensor([T + i], device=prompt.device))
        return torch.cat(tokens, dim=1)


def encode_prompts(prompts: list[str], device="cpu") -> list[torch.Tensor]:
    """Each prompt as a (1, T) tensor of byte tokens (prompts differ in length: one sequence each)."""
    from workshop.data import encode

    return [encode(p).unsqueeze(0).to(device) for p in prompts]


def same_tokens(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> Match:
    """Do two decodings give the same tokens for every prompt? The detail names the first prompt and
    position that differ. Agreed by all ranks (every rank must call it)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            return agree(Match(False, f"prompt {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"))
        differ = (a != e).nonzero()
        if len(differ):
            return agree(Match(False, f"prompt {i}: first different token at position {differ[0, -1].item()}"))
    if len(actual) != len(expected):
        return agree(Match(False, f"{len(actual)} decodings, expected {len(expected)}"))
    return agree(Match(True))


def words(text: str) -> list[str]:
    """The whole words of `text`, lower case: runs of letters followed by something else (a word cut off at
    the end of a generation is not counted)."""
    return [w.lower() for w in re.findall(r"[A-Za-z]+(?=[^A-Za-z])", text)]


def known_word_share(texts: list[str], vocabulary: set[str]) -> float:
    """The share of the whole words in `texts` that are in `vocabulary`: how much of a generation is made
    of real words of the training text (1.0 when all are; 0.0 when there is no whole word)."""
    found = [w for t in texts for w in words(t)]
    return sum(w in vocabulary for w in found) / len(found) if found else 0.0


def check_decode(decode, model: TinyGPT, prompts: list[torch.Tensor], new_tokens: int) -> Match:
    """Exercise 11.1: a student's `decode(model, prompt, new_tokens)` must continue each prompt with the greedy
    tokens of `models.generate` and, after the prompt, feed the model one token per step (what the KV cache is for).
    The hint names what differs. Every rank runs the same prompts: the verdict is agreed."""
    from workshop.models import generate

    fed: list[int] = []
    hook = model.register_forward_pre_hook(lambda _module, args: fed.append(args[0].shape[1]))
    try:
        for prompt in prompts:
            fed.clear()
            with torch.no_grad():
                got, want = decode(model, prompt, new_tokens), generate(model, prompt, new_tokens)
            calls = list(fed[:len(fed) - new_tokens])  # the student's calls; the reference made `new_tokens`
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                return agree(Match(False, f"for a prompt of {prompt.shape[1]} tokens you returned {shape}, expected "
                                          f"{tuple(want.shape)}: the prompt and {new_tokens} new tokens"))
            if not torch.equal(got, want):
                first = int((got[0] != want[0]).nonzero()[0]) - prompt.shape[1]
                return agree(Match(False, f"new token {first} differs from greedy generation's: pick the argmax of the "
                                          "last position's logits, and feed that token to the same cache"))
            if calls[1:] and max(calls[1:]) > 1:
                return agree(Match(False, f"after the prompt you fed the model {max(calls[1:])} tokens in one step: with "
                                          "the cache, feed only the newest token (the cache holds the others)"))
    finally:
        hook.remove()
    return agree(Match(True))
