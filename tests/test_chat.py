"""``python -m pipellm.chat``: prompts are the training encoder's tokens, history stays within the context, and a
tiny model trained on one conversation answers it through the CLI (from a pipeline checkpoint) and stops at EOS."""
import subprocess
import sys
import types

import pytest
import torch

from pipellm.chat import Chat
from pipellm.data.templates import Encoder
from pipellm.data.tokenizer import load_tokenizer
from pipellm.errors import PipellmError
from pipellm.quickstart import REPO, TINY_LLAMA
from test_data import CHATML, chat_tokenizer

QUESTION, ANSWER = "What is 3 plus 4?", "3 plus 4 is 7"


def fake_model(context=512):
    return types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=context))


def training_prefix(encoder, rounds):
    """The training tokens of a conversation up to its last answer."""
    ids, trained = encoder.encode({"type": "conversation", "rounds": rounds})
    start = max(i for i in range(1, len(ids)) if trained[i] and not trained[i - 1])
    return ids[:start]


@pytest.mark.parametrize("template", ["builtin", "chat"])
def test_prompts_are_the_training_tokens(template):
    tokenizer = load_tokenizer(TINY_LLAMA) if template == "builtin" else chat_tokenizer(CHATML)
    chat = Chat(fake_model(), tokenizer, template, max_new_tokens=8)
    assert chat.encoder.template == template
    encoder = Encoder(tokenizer, template)
    assert chat.prompt_ids(QUESTION) == training_prefix(encoder, [("ask", QUESTION), ("ans", ANSWER)])
    chat.rounds = [("ask", QUESTION), ("ans", ANSWER)]
    two = [("ask", QUESTION), ("ans", ANSWER), ("ask", "and 2 plus 2?"), ("ans", "4")]
    assert chat.prompt_ids("and 2 plus 2?") == training_prefix(encoder, two)


def test_system_message_goes_in_front_of_the_chat_template():
    tokenizer = chat_tokenizer(CHATML)
    chat = Chat(fake_model(), tokenizer, "chat", max_new_tokens=8, system="Be brief.")
    expected = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                             tokenize=False)
    assert chat.prompt_ids(QUESTION) == tokenizer.encode(expected, add_special_tokens=False)
    with pytest.raises(PipellmError, match="--system"):
        Chat(fake_model(), tokenizer, "builtin", system="Be brief.").prompt_ids(QUESTION)


def test_oldest_rounds_are_dropped_to_fit_the_context():
    tokenizer = load_tokenizer(TINY_LLAMA)
    encoder = Encoder(tokenizer, "builtin")
    rounds = [("ask", QUESTION), ("ans", ANSWER), ("ask", "hi"), ("ans", "hello")]
    last = training_prefix(encoder, rounds[2:] + [("ask", "bye"), ("ans", "x")])
    chat = Chat(fake_model(context=len(last) + 8), tokenizer, "builtin", max_new_tokens=8)
    chat.rounds = list(rounds)
    assert chat.prompt_ids("bye") == last
    assert chat.rounds == rounds[2:]


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_pp_model, tmp_path_factory):
    """The tiny llama overfit on one conversation (builtin template, the training encoder's labels), as a
    pipeline checkpoint."""
    from transformers import AutoModelForCausalLM

    from pipellm.convert.converters import hg_to_pp

    hf_dir, _ = tiny_pp_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    encoder = Encoder(load_tokenizer(hf_dir), "builtin")
    ids, labels = encoder.labels({"type": "conversation", "rounds": [("ask", QUESTION), ("ans", ANSWER)]})
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    root = tmp_path_factory.mktemp("chat")
    model.save_pretrained(root / "hf")
    load_tokenizer(hf_dir).save_pretrained(root / "hf")
    return root / "hf", hg_to_pp(root / "hf", root / "pp")


def test_trained_model_answers_and_stops_at_eos(trained_checkpoint):
    from transformers import AutoModelForCausalLM

    hf_dir, _ = trained_checkpoint
    chat = Chat(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), load_tokenizer(hf_dir), "builtin",
                max_new_tokens=40)
    new = chat.answer_ids(QUESTION)
    assert new[-1] == chat.encoder.eos_id and len(new) < 40  # stopped at the EOS training taught
    assert chat.reply(QUESTION, stream=False) == ANSWER


def run_chat(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "pipellm.chat", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_answers_from_a_pipeline_checkpoint(trained_checkpoint):
    _, pp_dir = trained_checkpoint
    result = run_chat("--model", str(pp_dir), "--template", "builtin", "--prompt", QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ANSWER
    result = run_chat("--model", str(pp_dir), "--template", "builtin", stdin=f"{QUESTION}\n/exit\nignored\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ANSWER


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_model_dir_is_one_line(tmp_path, make):
    if make == "empty":
        (tmp_path / "m").mkdir()
    result = run_chat("--model", str(tmp_path / "m"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--model" in result.stderr
