"""Interactive terminal chat with streaming output.

Type a message and press Enter; the answer streams as it is generated. ``/exit`` (or end of
input) quits, ``/reset`` clears the conversation. Input is read from stdin, so it can be piped:

    printf 'Hello!\\n/exit\\n' | tune run chat --config smollm2/chat
"""

from __future__ import annotations

import contextlib
import sys

import torch
from omegaconf import DictConfig

import tinytune.config
from tinytune.config.recipe_settings import ChatSettings
from tinytune.generation import decode_layout, generate, use_decode_plan
from tinytune.training import load_model_and_tokenizer, setup_device
from tinytune.training.prompting import encode_chat_prompt, get_bound_template, stop_token_ids


class StreamPrinter:
    """Prints decoded text as tokens arrive (decodes the whole reply and prints the new suffix,
    so multi-byte characters split over tokens come out whole)."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text


def recipe_main(cfg: DictConfig) -> list[dict]:
    """Runs the chat loop; returns the conversation (list of messages)."""
    s = ChatSettings.from_config(cfg)  # every key checked before the model loads
    device, dtype, seed = setup_device(s.hardware, training=False)
    _, tokenizer, model, info = load_model_and_tokenizer(s, device, dtype)
    model.eval()
    template = get_bound_template(s.source.template, tokenizer)
    stops = stop_token_ids(tokenizer, template)
    max_new = s.max_new_tokens
    max_len = s.max_seq_len or min(info.max_seq_len, 2048)
    gen = None
    if s.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)

    plan = use_decode_plan(s.decode_plan, max_new)  # auto: one reply's budget pays the set-up back
    print(f"decode plan: {'on' if plan else 'off'} (decode_plan: {s.decode_plan})")
    # decode_layout: fused decode-time weights and a lean decode step (CPU), built once for the session
    with decode_layout(model) if plan else contextlib.nullcontext():
        return _chat_loop(s, model, tokenizer, template, stops, max_len, gen)


def _chat_loop(s: ChatSettings, model, tokenizer, template, stops, max_len: int, gen) -> list[dict]:
    """Reads messages from stdin and streams the replies until /exit or end of input."""
    thinking, max_new, temperature, system = s.enable_thinking, s.max_new_tokens, s.temperature, s.system
    history: list[dict] = []
    print("chat: type a message; /reset clears the conversation, /exit quits.", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        prompt = encode_chat_prompt(tokenizer, template, msgs, thinking)
        while len(prompt) + max_new > max_len and len(history) > 2:  # forget the oldest exchange
            history = history[2:]
            msgs = ([{"role": "system", "content": system}] if system else []) + history
            prompt = encode_chat_prompt(tokenizer, template, msgs, thinking)
        printer = StreamPrinter(tokenizer)
        out = generate(
            model,
            [prompt],
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_tokens=stops,
            pad_id=int(tokenizer.pad_id or 0),
            generator=gen,
            on_token=printer,
        )
        reply = tokenizer.decode(out[0], skip_special_tokens=True)
        if len(reply) > len(printer.shown):
            sys.stdout.write(reply[len(printer.shown) :])
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})
    return history


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
