"""kombu's Redis key layout, read from kombu itself (no broker needed)."""
from __future__ import annotations

import base64
import json

from kombu.transport.redis import Channel

from exploop.broker import KeyLayout, decode_delivery


def test_default_layout_is_kombus():
    layout = KeyLayout.from_transport_options({"visibility_timeout": 60})
    assert layout.lists("sast.eu") == ["sast.eu", f"sast.eu{Channel.sep}3", f"sast.eu{Channel.sep}6",
                                       f"sast.eu{Channel.sep}9"]
    assert layout.unacked_key == Channel.unacked_key


def test_prefix_and_priority_steps_follow_the_transport_options():
    layout = KeyLayout.from_transport_options({"global_keyprefix": "p:", "priority_steps": [0, 5]})
    assert layout.lists("q") == ["p:q", f"p:q{Channel.sep}5"]
    assert layout.unacked_key == "p:" + Channel.unacked_key
    # BRPOP order: every queue's first step, then the next step (kombu's own order).
    assert layout.consume_order(["a", "b"]) == ["p:a", "p:b", f"p:a{Channel.sep}5", f"p:b{Channel.sep}5"]


def _message(job_id: str, attempt: int, encode: bool) -> str:
    body = json.dumps([[], {"job_id": job_id, "attempt": attempt}, {}])
    if encode:
        return json.dumps({"body": base64.b64encode(body.encode()).decode(),
                           "properties": {"body_encoding": "base64"}})
    return json.dumps({"body": body, "properties": {}})


def test_decode_delivery_reads_queue_and_unacked_forms():
    assert decode_delivery(_message("j1", 2, encode=True)) == ("j1", 2)
    assert decode_delivery(_message("j1", 2, encode=False)) == ("j1", 2)
    unacked = json.dumps([json.loads(_message("j2", 1, encode=True)), "", "sast.eu"])
    assert decode_delivery(unacked) == ("j2", 1)
    assert decode_delivery("not json") is None
    assert decode_delivery(json.dumps({"body": "[]"})) is None
