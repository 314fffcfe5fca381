"""Talk to a trained model with the template it was trained with: ``python -m pipellm.chat --model DIR``.

``DIR`` is an exported Hugging Face directory or a pipeline checkpoint (a converted directory, a training save
directory with ``latest``, or a tag directory), which is converted into a temporary directory first. Every turn is
a ``conversation`` record encoded by ``pipellm.data.templates.Encoder.prompt_ids``, so the prompt is exactly the
tokens training put before an answer; generation (greedy) stops at the EOS or end-of-turn token training taught
and is streamed as it comes. The oldest rounds are dropped when the conversation outgrows the model's context.
``--prompt`` answers one turn and exits (scripts); without it, lines are read from stdin until EOF or ``/exit``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from pipellm.data.templates import TEMPLATES, Encoder
from pipellm.data.tokenizer import load_tokenizer
from pipellm.errors import PipellmError
from pipellm.models.base import is_reward_config
from pipellm.pipeline.layer_files import follow_latest, has_layer_files


def hf_model_dir(path: str | Path, stack: contextlib.ExitStack) -> Path:
    """A Hugging Face directory for ``path``: itself, or a pipeline checkpoint converted into a temporary
    directory that ``stack`` removes."""
    from pipellm.convert.converters import pp_to_hg

    path = Path(path)
    if not path.is_dir():
        raise PipellmError(f"--model {path} does not exist or is not a directory; pass an exported Hugging Face "
                           f"directory or a pipeline checkpoint directory")
    if has_layer_files(follow_latest(path) or path):
        return pp_to_hg(path, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pipellm-chat-"))) / "hf")
    if not (path / "config.json").is_file():
        raise PipellmError(f"--model {path} has no config.json and no pipeline layer files; pass an exported "
                           f"Hugging Face directory or a pipeline checkpoint directory")
    return path


class Chat:
    """A conversation with one model: its rounds so far, prompted through the training encoder."""

    def __init__(self, model, tokenizer, template: str = "auto", max_new_tokens: int = 256,
                 system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.encoder = Encoder(tokenizer, template)
        self.max_new_tokens, self.system = max_new_tokens, system
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.rounds: list[tuple[str, str]] = []

    def prompt_ids(self, ask: str) -> list[int]:
        """The prompt for ``ask`` after the kept rounds; drops the oldest rounds while it does not fit."""
        while True:
            record = {"type": "conversation", "rounds": [*self.rounds, ("ask", ask)]}
            ids = self.encoder.prompt_ids(record, self.system)
            if len(ids) + self.max_new_tokens <= self.context or not self.rounds:
                break
            self.rounds = self.rounds[2:]  # one (ask, ans) round
        if len(ids) >= self.context:
            raise PipellmError(f"the message is {len(ids)} tokens, beyond the model's context of {self.context}; "
                               f"send a shorter one")
        return ids

    @torch.no_grad()
    def answer_ids(self, ask: str, streamer=None) -> list[int]:
        """The ids the model generates (greedy) after the prompt for ``ask``, up to the stop token it was taught."""
        prompt = torch.tensor([self.prompt_ids(ask)], device=self.model.device)
        pad_id = self.tokenizer.pad_token_id
        output = self.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=min(self.max_new_tokens, self.context - prompt.shape[1]),
                                     do_sample=False, eos_token_id=self.encoder.stop_token_ids(),
                                     pad_token_id=self.encoder.eos_id if pad_id is None else pad_id,
                                     streamer=streamer)
        return output[0, prompt.shape[1]:].tolist()

    def reply(self, ask: str, stream: bool = True) -> str:
        """The model's answer to ``ask`` (streamed to stdout when ``stream``); the round is kept."""
        from transformers import TextStreamer

        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        answer = self.tokenizer.decode(self.answer_ids(ask, streamer), skip_special_tokens=True).strip()
        self.rounds += [("ask", ask), ("ans", answer)]
        return answer

def load_chat(model_dir: Path, template: str, max_new_tokens: int, system: str | None = None) -> Chat:
    """The model (on the GPU when there is one) and tokenizer of a Hugging Face directory, as a ``Chat``."""
    from transformers import AutoModelForCausalLM

    if is_reward_config(json.loads((model_dir / "config.json").read_text())):
        raise PipellmError(f"--model {model_dir} is a reward model: it scores answers and writes none; chat with a "
                           f"causal LM")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except (OSError, ValueError, KeyError) as err:
        raise PipellmError(f"--model {model_dir}: transformers cannot load it as a causal LM "
                           f"({str(err).splitlines()[0]}); pass an exported model directory") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Chat(model.to(device).eval(), load_tokenizer(model_dir), template, max_new_tokens, system)


def converse(chat: Chat, lines) -> None:
    """Answer each line read (streamed), until EOF or ``/exit``."""
    for line in lines:
        ask = line.strip()
        if ask == "/exit":
            return
        if ask:
            chat.reply(ask)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipellm.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported Hugging Face directory or pipeline checkpoint")
    parser.add_argument("--template", default="auto", choices=TEMPLATES, help="the training config's `template`")
    parser.add_argument("--system", default=None, help="a system message (chat templates with a system role)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    args = parser.parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            chat = load_chat(hf_model_dir(args.model, stack), args.template, args.max_new_tokens,
                             args.system)
            if args.prompt is not None:
                chat.reply(args.prompt)
            else:
                print("pipellm chat: type a message, /exit or Ctrl-D to stop", file=sys.stderr)
                converse(chat, sys.stdin)
    except PipellmError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
