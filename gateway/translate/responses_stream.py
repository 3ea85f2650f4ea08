"""Chat stream chunks -> the Responses API's typed server-sent events, as OpenAI's SDKs parse them.

`StreamEvents` is pure: fed chunks, it opens output items (`response.output_item.added`, then
`response.content_part.added` for text), emits `response.output_text.delta` and
`response.function_call_arguments.delta`, and at the end closes every item (`...done` events) in output order;
a stream that fails first reports what its deltas carried (`partial_output`), never emptied items.
Every event carries the next `sequence_number`, strictly increasing from 0. Item ids follow the same scheme as
a whole answer's (responses_items.py), so a stored streamed response reads like a non-streamed one.
"""

from __future__ import annotations

from typing import Any

import orjson

from backends.base import StreamChunk
from gateway.translate.responses_items import function_call_item, message_item


def sse(event_type: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class StreamEvents:
    def __init__(self, request_id: str) -> None:
        self._rid = request_id
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # by output index
        self._text: list[str] = []
        self._message_at: int | None = None  # output index of the message item, once text arrived
        self._calls: dict[int, int] = {}  # chat tool_call index -> output index
        self._arguments: dict[int, list[str]] = {}  # output index -> argument pieces
        self._finished = False

    def event(self, event_type: str, **fields: Any) -> bytes:
        payload = {"type": event_type, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(event_type, payload)

    def lifecycle(self, event_type: str, response: dict[str, Any]) -> bytes:
        return self.event(event_type, response=response)

    def chunk(self, chunk: StreamChunk) -> list[bytes]:
        out: list[bytes] = []
        text = chunk.delta.get("content")
        if isinstance(text, str) and text:
            out += self._text_delta(text)
        for call in chunk.delta.get("tool_calls") or ():
            out += self._call_delta(call)
        return out

    def _open_message(self) -> list[bytes]:
        self._message_at = len(self._output)
        item = message_item(self._rid, "in_progress", [])
        self._output.append(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self.event("response.output_item.added", output_index=self._message_at, item=item),
            self._part_event("response.content_part.added", part),
        ]

    def _text_delta(self, text: str) -> list[bytes]:
        out = self._open_message() if self._message_at is None else []
        self._text.append(text)
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=f"msg_{self._rid}",
                output_index=self._message_at,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return out

    def _part_event(self, event_type: str, part: dict[str, Any]) -> bytes:
        return self.event(
            event_type, item_id=f"msg_{self._rid}", output_index=self._message_at, content_index=0, part=part
        )

    def _call_delta(self, call: dict[str, Any]) -> list[bytes]:
        out = []
        index = call.get("index", len(self._calls))
        fn = call.get("function") or {}
        at = self._calls.get(index)
        if at is None:
            at = self._calls[index] = len(self._output)
            name = str(fn.get("name") or "")
            item = function_call_item(self._rid, len(self._calls) - 1, str(call.get("id") or ""), name, "")
            item["status"] = "in_progress"
            self._output.append(item)
            self._arguments[at] = []
            out.append(self.event("response.output_item.added", output_index=at, item=item))
        elif fn.get("name") and not self._output[at]["name"]:
            self._output[at]["name"] = str(fn["name"])
        piece = fn.get("arguments")
        if isinstance(piece, str) and piece:
            self._arguments[at].append(piece)
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=self._output[at]["id"],
                    output_index=at,
                    delta=piece,
                )
            )
        return out

    def finish(self, *, incomplete: bool) -> list[bytes]:
        """Close every open item, in output order; `output` is then the final output. An answer with
        neither text nor calls still gets its (empty) message, as a whole answer does."""
        self._finished = True
        out = self._open_message() if not self._output else []
        for at, item in enumerate(self._output):
            if at == self._message_at:
                text = "".join(self._text)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                out.append(
                    self.event(
                        "response.output_text.done",
                        item_id=item["id"],
                        output_index=at,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    )
                )
                out.append(self._part_event("response.content_part.done", part))
                item.update(status="incomplete" if incomplete else "completed", content=[part])
            else:
                arguments = "".join(self._arguments[at])
                item.update(status="completed", arguments=arguments)
                out.append(
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=at,
                        arguments=arguments,
                    )
                )
            out.append(self.event("response.output_item.done", output_index=at, item=item))
        return out

    @property
    def output(self) -> list[dict[str, Any]]:
        return self._output

    def partial_output(self) -> list[dict[str, Any]]:
        """The output as far as it was streamed, for a stream that fails before `finish`: each open item
        with the text or arguments its deltas carried, marked incomplete (after `finish`: `output`)."""
        if self._finished:
            return self._output
        items = []
        for at, item in enumerate(self._output):
            if at == self._message_at:
                part = {"type": "output_text", "text": "".join(self._text), "annotations": [], "logprobs": []}
                items.append({**item, "status": "incomplete", "content": [part]})
            else:
                items.append({**item, "status": "incomplete", "arguments": "".join(self._arguments[at])})
        return items
