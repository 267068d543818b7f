"""Generation from a trained run: continue one prompt, or chat over stdin / stdout.

  python launch.py --experiment=pretrain_small --mode=generate --prompt='def ' \
      --config.sampling.strategy=beam
  printf 'hello\n' | python launch.py --experiment=pretrain_small --mode=chat

The sampling settings are the `sampling` section of the current command line's config, not the
one saved with the run, so they can change between calls. A reply stops at model.max_len: when
the prompt leaves less room than sampling.max_new_tokens, fewer are generated (a note says so).
"""

import sys
from typing import TextIO

import jax
import ml_collections

from research import decoding
from research.errors import UserError
from research import runs


def within_max_len(sampling: ml_collections.ConfigDict, prompt_len: int,
                   max_len: int) -> ml_collections.ConfigDict:
  """`sampling` with max_new_tokens cut to the room that model.max_len leaves after a prompt of
  `prompt_len` tokens (with a note on stderr); a prompt that fills max_len is an error."""
  room = max_len - prompt_len
  if room < 1:
    raise UserError(f'the prompt has {prompt_len} tokens; model.max_len={max_len} leaves no room '
                    'for a reply; shorten it.')
  if sampling.max_new_tokens <= room:
    return sampling
  print(f'note: {room} new tokens at most: model.max_len={max_len} minus the {prompt_len}-token '
        f'prompt (sampling.max_new_tokens={sampling.max_new_tokens})', file=sys.stderr, flush=True)
  sampling = sampling.copy_and_resolve_references()
  sampling.max_new_tokens = room
  return sampling


def generate_main(workdir: str, prompt: str | None, sampling: ml_collections.ConfigDict,
                  seed: int = 0) -> str:
  """Prints and returns the continuation of `prompt` (after BOS) by the run in `workdir`; for an
  encoder-decoder run, the translation of `prompt` (the source; the decoder starts from BOS)."""
  if prompt is None:
    raise UserError('--mode=generate got no prompt; expected text to continue; pass --prompt=TEXT.')
  _, tok, model, params = runs.load_trained(workdir)
  if model.cfg.family == 'encoder_decoder':
    prompts, sources = [[tok.bos_id]], [tok.encode(prompt)]
  else:
    prompts, sources = [tok.encode(prompt, add_bos=True)], None
  sampling = within_max_len(sampling, len(prompts[0]), model.cfg.max_len)
  new = decoding.generate(model, params, tok, prompts, sampling, jax.random.key(seed), sources)[0]
  text = tok.decode(new)
  print(text, flush=True)
  return text


def chat_main(workdir: str, sampling: ml_collections.ConfigDict, stdin: TextIO, stdout: TextIO,
              seed: int = 0) -> None:
  """Chats with the run in `workdir`: one user message per line of `stdin`, one reply each.

  Writes each reply followed by a newline to `stdout`. Stops at EOF or a line '/exit'. When the
  conversation no longer fits the context next to sampling.max_new_tokens, its oldest exchanges
  are dropped.
  """
  _, tok, model, params = runs.load_trained(workdir)
  if model.cfg.family == 'encoder_decoder':
    raise UserError(f'{workdir} holds an encoder-decoder model, which translates one source at a '
                    'time and keeps no conversation; use --mode=generate --prompt=SOURCE.')
  budget = model.cfg.max_len - sampling.max_new_tokens
  key = jax.random.key(seed)
  messages = []
  while (line := _read(stdin, stdout)) and line.strip() != '/exit':
    if not line.strip():
      continue
    messages.append({'role': 'user', 'content': line.strip()})
    while len(messages) > 1 and len(decoding.chat_prompt(tok, messages)) > budget:
      messages = messages[2:]  # The oldest user message and its reply.
    key, sub = jax.random.split(key)
    prompt = decoding.chat_prompt(tok, messages)
    new = decoding.generate(model, params, tok, [prompt],
                            within_max_len(sampling, len(prompt), model.cfg.max_len), sub)
    reply = tok.decode(new[0])
    messages.append({'role': 'assistant', 'content': reply})
    stdout.write(reply + '\n')
    stdout.flush()


def _read(stdin: TextIO, stdout: TextIO) -> str:
  """The next line of `stdin` ('' at EOF), after a '> ' prompt when a person is typing."""
  if stdin.isatty():
    stdout.write('> ')
    stdout.flush()
  return stdin.readline()
