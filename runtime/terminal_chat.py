"""`edgeq chat BUNDLE`: a conversation in the terminal, the reply streamed as it is decoded.

The history is the OpenAI-style message list the bundle's chat template renders, so each reply sees the turns
before it. When the history outgrows the context, the oldest turns go (the system message stays) and a note
says so. Commands: /reset (forget the conversation), /exit (or end of input), /help. Ctrl-C during a reply
stops that reply; at the prompt it ends the chat.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

HELP = "commands: /reset forgets the conversation, /exit ends the chat (or Ctrl-D), /help shows this"


def chat_loop(session, system: str | None = None, max_tokens: int = 512, sampling: dict[str, Any] | None = None,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout, prompt: str = "> ") -> int:
    """Read a message, stream the reply, until /exit or end of input; returns the number of replies."""
    sampling = dict(sampling or {})
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    replies = 0
    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return replies
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return replies
        if text == "/reset":
            history = list(start)
            out.write("(conversation reset)\n")
            continue
        if text in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        kept = session.fit_messages(history, max_tokens)
        if len(kept) < len(history):
            out.write(f"(the {len(history) - len(kept)} oldest messages were dropped to fit the context)\n")
            history = kept
        reply = session.stream(history, max_tokens, chat=True, truncate=True, **sampling)
        try:
            for piece in reply:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            reply.close()
            out.write(" (stopped)")
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply.text})
        replies += 1
