"""The tasks of scripts/train.py: data made in code, nothing downloaded.

Every batch is a function of (seed, step) alone, drawn on the CPU from its own torch.Generator:
ours and torch.nn, every rank of a distributed run (each takes its shard of the same global
batch) and a run resumed from a checkpoint all see the same data, whatever the model's RNG did.

- ``adding``: (value, marker) pairs; regress the sum of the two marked values (MSE).
- ``copy``: memorise ``copy_len`` symbols, wait, and after the delimiter emit them (cross-entropy on
  the emitted steps, accuracy).
- ``charlm``: next-character prediction on a text (cross-entropy, accuracy); ``packed``: sequences of
  random lengths, fed to the RNN as a PackedSequence.
"""
import abc
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100  # target of steps that carry no loss (F.cross_entropy's ignore_index)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The data generator of one training step: a mix of (seed, step), so that no step's batch
    depends on the batches before it (a resumed run draws what an uninterrupted one would)."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # [B, T] int64 symbols, or [B, T, F] features
    targets: torch.Tensor  # [B] regression targets, or [B, T] classes with IGNORE where no loss
    lengths: torch.Tensor | None = None  # [B] int64 on the CPU (what pack_padded_sequence takes)

    @property
    def size(self) -> int:
        return self.inputs.shape[0]

    @property
    def tokens(self) -> int:
        """Real time steps: B*T, or the lengths' sum."""
        return int(self.lengths.sum()) if self.lengths is not None else self.inputs.shape[0] * self.inputs.shape[1]

    def shard(self, index: int, parts: int) -> "Batch":
        """Rows [index*B/parts, (index+1)*B/parts): one rank's or one micro-batch's share."""
        if self.size % parts:
            raise ValueError(f"a batch of {self.size} does not split into {parts} equal shards")
        n = self.size // parts
        rows = slice(index * n, (index + 1) * n)
        return Batch(self.inputs[rows], self.targets[rows], None if self.lengths is None else self.lengths[rows])

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """On the training device; floating tensors in the model's dtype; lengths stay on the CPU."""
        def move(t):
            return t.to(device, dtype if t.is_floating_point() else t.dtype)
        return replace(self, inputs=move(self.inputs), targets=move(self.targets))


class Task(abc.ABC):
    name = ""
    vocab = 0  # > 0: inputs are symbols (an embedding); else `features` floats per step (a linear layer)
    features = 0
    outputs = 1  # the head's width
    per_step = True  # the head reads every step's output; else the last layer's final states
    has_accuracy = True
    allows_bidirectional = True
    default_seq_len = 32

    def min_seq_len(self) -> int:
        return 1

    def max_seq_len(self) -> int | None:
        return None

    @abc.abstractmethod
    def batch(self, generator: torch.Generator, size: int, seq_len: int) -> Batch:
        """``size`` sequences of ``seq_len`` steps drawn from ``generator``."""

    def count(self, batch: Batch) -> int:
        """How many loss terms the batch has (the denominator of its mean loss)."""
        return int((batch.targets != IGNORE).sum())

    def loss_terms(self, prediction: torch.Tensor, batch: Batch):
        """(sum of the loss terms, number of correct predictions or None): sums, so that shards and
        micro-batches add up to the global batch's."""
        logits = prediction.reshape(-1, prediction.shape[-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 logits: loss in fp32
        targets = batch.targets.reshape(-1)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
        return loss, correct

    def signature(self) -> dict:
        """What a checkpoint must match besides the parameters' shapes."""
        return {"task": self.name}


class AddingTask(Task):
    name = "adding"
    features = 2
    per_step = False
    has_accuracy = False
    default_seq_len = 50

    def min_seq_len(self) -> int:
        return 2

    def batch(self, generator, size, seq_len):
        values = torch.rand(size, seq_len, generator=generator, dtype=torch.float64)
        half = seq_len // 2
        # One marker in each half, as in the original problem: the model must hold the first
        # value over at least one step and usually many.
        first = torch.randint(0, half, (size,), generator=generator)
        second = torch.randint(half, seq_len, (size,), generator=generator)
        markers = torch.zeros(size, seq_len, dtype=torch.float64)
        rows = torch.arange(size)
        markers[rows, first] = 1
        markers[rows, second] = 1
        target = values[rows, first] + values[rows, second]
        return Batch(torch.stack([values, markers], dim=-1), target)

    def count(self, batch):
        return batch.size

    def loss_terms(self, prediction, batch):
        error = prediction.to(torch.promote_types(prediction.dtype, torch.float32)) - batch.targets
        return error.pow(2).sum(), None


class CopyTask(Task):
    """Tokens: 0 blank, 1..symbols the symbols, symbols+1 the delimiter; classes: the symbols."""
    name = "copy"
    default_seq_len = 30

    def __init__(self, copy_len: int = 8, symbols: int = 8):
        if copy_len < 1:
            raise ValueError(f"copy_len must be at least 1, got {copy_len}")
        self.copy_len, self.symbols = copy_len, symbols
        self.vocab, self.outputs = symbols + 2, symbols

    def min_seq_len(self) -> int:
        return 2 * self.copy_len + 1  # the symbols, the delimiter, the answer

    def batch(self, generator, size, seq_len):
        S = self.copy_len
        symbols = torch.randint(1, self.symbols + 1, (size, S), generator=generator)
        inputs = torch.zeros(size, seq_len, dtype=torch.int64)
        inputs[:, :S] = symbols
        inputs[:, seq_len - S - 1] = self.symbols + 1
        targets = torch.full((size, seq_len), IGNORE, dtype=torch.int64)
        targets[:, seq_len - S:] = symbols - 1
        return Batch(inputs, targets)

    def signature(self):
        return {"task": self.name, "copy_len": self.copy_len, "symbols": self.symbols}


class CharLMTask(Task):
    name = "charlm"
    allows_bidirectional = False  # a backward direction would read the character to predict
    default_seq_len = 64

    def __init__(self, text: str, packed: bool = False):
        if len(text) < 2:
            raise ValueError("text: a character language model needs at least two characters of text")
        self.alphabet = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        self.data = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
        self.vocab = self.outputs = len(self.alphabet)
        self.packed = packed

    def max_seq_len(self) -> int:
        return len(self.data) - 1

    def batch(self, generator, size, seq_len):
        starts = torch.randint(0, len(self.data) - seq_len, (size,), generator=generator)
        windows = self.data[starts[:, None] + torch.arange(seq_len + 1)]
        inputs, targets = windows[:, :-1].clone(), windows[:, 1:].clone()
        lengths = None
        if self.packed:
            lengths = torch.randint(max(1, seq_len // 4), seq_len + 1, (size,), generator=generator)
            padding = torch.arange(seq_len) >= lengths[:, None]
            inputs[padding], targets[padding] = 0, IGNORE
        return Batch(inputs, targets, lengths)

    def signature(self):
        return {"task": self.name, "alphabet": self.alphabet}


# --- the default charlm text: made up here, from a fixed seed ---
_SUBJECTS = ["the miller", "a heron", "the old clock", "my neighbour", "the night train", "a small boat",
             "the baker's cat", "every lantern", "the north wind", "a patient gardener", "the copper kettle",
             "two sparrows", "the lighthouse keeper", "a folded map", "the river", "our teacher"]
_VERBS = ["watches", "carries", "forgets", "follows", "mends", "counts", "paints", "remembers", "hides",
          "finds", "crosses", "greets", "sharpens", "weighs", "waters", "answers"]
_OBJECTS = ["the morning fog", "a bundle of letters", "seven green apples", "the broken gate", "an empty jar",
            "the last bridge", "a quiet song", "the wooden stairs", "a pocket of seeds", "the long road home",
            "the sleeping dog", "a spool of thread", "the harbour lights", "an unfinished poem"]
_PLACES = ["by the mill", "under the bridge", "at dawn", "in the rain", "before supper", "near the market",
           "after the storm", "on the hill", "in the garden", "at the station", "beside the fire"]
_LINKS = ["and then", "while", "because", "although", "so", "until"]


def default_corpus(sentences: int = 1500) -> str:
    """About 100 kB of plain sentences from a small grammar: structure for a character model to
    learn (words, spelling, punctuation), generated, so nothing is copied or downloaded."""
    rng = random.Random(20261125)
    lines = []
    for _ in range(sentences):
        clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            clause += f" {rng.choice(_PLACES)}"
        if rng.random() < 0.3:
            clause += f", {rng.choice(_LINKS)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        end = "?" if rng.random() < 0.1 else "."
        lines.append(clause[0].upper() + clause[1:] + end)
    return "\n".join(" ".join(lines[i:i + 4]) for i in range(0, len(lines), 4)) + "\n"


TASKS = ("adding", "copy", "charlm")


def make_task(name: str, *, copy_len: int = 8, text: str | None = None, packed: bool = False) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    if packed and name != "charlm":
        raise ValueError(f"packed: only charlm has sequences of different lengths, got task {name!r}")
    if name == "adding":
        return AddingTask()
    if name == "copy":
        return CopyTask(copy_len)
    return CharLMTask(default_corpus() if text is None else text, packed)
