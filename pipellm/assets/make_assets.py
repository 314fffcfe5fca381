"""Regenerate the quickstart assets: sample data, a tiny byte-level BPE tokenizer and a tiny Llama config.

Run from the repository root (CPU only, no network)::

    python -m pipellm.assets.make_assets

It rewrites, next to this script:

* ``data/sample.jsonl`` -- about 300 ``pretrain`` and ``instruct`` records built from a small fixed vocabulary
  (counting, weekdays, animal sounds, colours, one-digit arithmetic, word repetition). The patterns are so
  regular that a model of a few hundred thousand parameters visibly learns them in a few dozen steps, which
  is what the quickstart wants to show.
* ``tiny_llama/`` -- ``tokenizer.json`` + ``tokenizer_config.json`` (a byte-level BPE trained on that data,
  loadable with ``transformers.AutoTokenizer.from_pretrained``) and ``config.json`` (a 4-layer ``LlamaConfig``
  whose vocabulary size and special token ids match the tokenizer).

The output is deterministic: the records come from a seeded ``random.Random`` and BPE training on a fixed
corpus is deterministic, so rerunning changes nothing but (for a different ``transformers`` version) the
version string inside ``config.json``. The committed files are what the quickstart uses; this script only
documents and reproduces how they were made.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from pipellm.data.builtin_template import INSTRUCT_TEMPLATE

ASSETS = Path(__file__).resolve().parent
DATA_FILE = ASSETS / "data" / "sample.jsonl"
MODEL_DIR = ASSETS / "tiny_llama"

SEED = 1234
VOCAB_SIZE = 1024
# Llama's order for the first ids (unk 0, bos 1, eos 2); pad comes next so that it is never a real token.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ANIMAL_SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot"}
THING_COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black",
                 "blood": "red"}
WORDS = ["cat", "sun", "tree", "book", "rain", "fish", "ball", "star"]

# Everyday English, used only to train the tokenizer (not written to the data): the sample data alone has too
# few distinct words for a vocabulary of ~1000, and a quickstart user typing their own prompt should get
# word-sized tokens rather than bytes.
GENERAL_TEXT = """
A small model learns what it sees many times. When you train it for a few steps, the loss goes down and the
answers start to look right. People write questions and answers, stories, letters, lists, notes and code.
The morning was cold, so we made tea, opened the window and listened to the birds in the garden. Children
play outside after school; their parents cook dinner, read the news and talk about work. Every city has
streets, houses, shops, schools, parks, rivers, bridges, trains, buses and cars. In summer the weather is
warm and bright, in winter it is dark and wet. Please tell me how this works and why it matters. Could you
explain the difference between these two ideas? I think the first one is simpler, but the second is more
general. Write a short poem about the sea. Translate this sentence into French. Summarize the following
paragraph in one line. Give three reasons, then choose the best one. The computer stores numbers, letters
and pictures in memory; a program reads them, changes them and writes them back. Water boils at one hundred
degrees and freezes at zero. The earth turns around the sun once a year and around itself once a day. Music,
language, history, science, mathematics, geography, medicine and art are taught in many schools. She walked
slowly across the field, carrying a basket of apples, bread, cheese and eggs. He forgot his keys again and
had to wait for his brother, who came home late that evening. Thank you very much for your help; it was
really useful and I learned something new. Yes, no, maybe, always, never, sometimes, often, usually, today,
tomorrow, yesterday, first, second, third, last, next, before, after, above, below, inside, between, under.
Hello, good morning, good night, how are you, I am fine, see you soon, welcome, sorry, excuse me, goodbye.
"""


def _count_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 8)
    return " ".join(NUMBER_WORDS[start:start + rng.randint(4, 10)]) + "."


def _days_sentence(rng: random.Random) -> str:
    start = rng.randint(0, 6)
    return " ".join(DAYS[(start + i) % 7] for i in range(rng.randint(3, 7))) + "."


def _pretrain_records(rng: random.Random, n: int) -> list[dict]:
    """Short sentences over a tiny vocabulary; each kind of line is a fixed pattern with few free slots."""
    makers = [
        _count_sentence,
        _days_sentence,
        lambda r: " ".join(f"The {a} says {ANIMAL_SOUNDS[a]}." for a in r.sample(sorted(ANIMAL_SOUNDS), 3)),
        lambda r: " ".join(f"The {t} is {THING_COLOURS[t]}." for t in r.sample(sorted(THING_COLOURS), 3)),
        lambda r: (lambda a, b: f"Q: What is {a} plus {b}? A: {a + b}")(r.randint(0, 9), r.randint(0, 9)),
        lambda r: (lambda w: f"{w} {w} {w} {w}.")(r.choice(WORDS)),
    ]
    return [{"type": "pretrain", "text": makers[i % len(makers)](rng)} for i in range(n)]


def _instruct_records(rng: random.Random, n: int) -> list[dict]:
    """Question/answer pairs; about a third carry an ``input`` field, the rest have none."""
    def plus(r):
        a, b = r.randint(0, 9), r.randint(0, 9)
        return {"instruct": f"What is {a} plus {b}?", "output": str(a + b)}

    def minus(r):
        a = r.randint(0, 9)
        b = r.randint(0, a)
        return {"instruct": f"What is {a} minus {b}?", "output": str(a - b)}

    def add_input(r):
        a, b = r.randint(0, 9), r.randint(0, 9)
        return {"instruct": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}

    def repeat_input(r):
        w = r.choice(WORDS)
        return {"instruct": "Repeat the word three times.", "input": w, "output": f"{w} {w} {w}"}

    def sound(r):
        a = r.choice(sorted(ANIMAL_SOUNDS))
        return {"instruct": f"What does the {a} say?", "output": f"The {a} says {ANIMAL_SOUNDS[a]}."}

    def colour(r):
        t = r.choice(sorted(THING_COLOURS))
        return {"instruct": f"What colour is the {t}?", "output": f"The {t} is {THING_COLOURS[t]}."}

    def next_day(r):
        i = r.randint(0, 6)
        return {"instruct": "Which day comes next?", "input": DAYS[i], "output": DAYS[(i + 1) % 7]}

    makers = [plus, minus, add_input, repeat_input, sound, colour, next_day]
    return [{"type": "instruct", **makers[i % len(makers)](rng)} for i in range(n)]


def make_records() -> list[dict]:
    rng = random.Random(SEED)
    records = _pretrain_records(rng, 120) + _instruct_records(rng, 180)
    rng.shuffle(records)
    return records


def make_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, no unknown bytes) that prepends ``<s>`` like Llama's tokenizer does."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=512)


def main() -> None:
    records = make_records()
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    with DATA_FILE.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # The prompt template's fixed words go into the corpus too, so that they become a few tokens each; the
    # general text goes in twice so that its words pass the trainer's min_frequency of 2.
    corpus = [INSTRUCT_TEMPLATE] * 50 + [GENERAL_TEXT] * 2
    corpus += [value for record in records for key, value in record.items() if key != "type"]
    tokenizer = make_tokenizer(corpus)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL_DIR)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(MODEL_DIR)
    print(f"wrote {len(records)} records to {DATA_FILE} and a {len(tokenizer)}-token tokenizer + config to "
          f"{MODEL_DIR}")


if __name__ == "__main__":
    main()
