"""Log-probabilities in the two shapes OpenAI uses: the legacy completions one (parallel lists) and the
chat one (a list of token objects with their top alternatives)."""

from __future__ import annotations

from collections.abc import Callable

# Per generated token: {token_id: logprob} holding the chosen token and the top alternatives.
Entries = list[dict[int, float]]
Decode = Callable[[int], str]


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(token_ids: list[int], entries: Entries, k: int, decode: Decode, offset: int = 0) -> dict:
    tokens = [decode(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [entry[t] for t, entry in zip(token_ids, entries)],
        "top_logprobs": [{decode(i): lp for i, lp in _top(entry, k)} for entry in entries],
        "text_offset": offsets,
    }


def _token_object(token_id: int, logprob: float, decode: Decode) -> dict:
    token = decode(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: Entries, k: int, decode: Decode) -> dict:
    content = []
    for t, entry in zip(token_ids, entries):
        item = _token_object(t, entry[t], decode)
        item["top_logprobs"] = [_token_object(i, lp, decode) for i, lp in _top(entry, k)]
        content.append(item)
    return {"content": content}
