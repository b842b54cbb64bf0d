"""What a Forward message that will never be read holds: shared-memory segments to free.

Used wherever a message is dropped rather than delivered: a response for a request nobody waits for
(timed out, cancelled, hedge loser), a request a stream server drops unanswered, an answer it never
wrote because the stream ended. Releasing a segment already consumed is a no-op.
"""

from __future__ import annotations

from services.gen.shardmesh.v1 import worker_pb2
from services.wire import placement


def release_request(request: worker_pb2.ForwardRequest) -> None:
    """A received request dropped unanswered: its input segment, if it really is this request's."""
    if request.HasField("input"):
        placement.release_unread(request.input, request.request_id)


def release_response(response: worker_pb2.ForwardResponse) -> None:
    if response.HasField("output"):
        placement.release(response.output)
    if response.HasField("error") and response.error.HasField("pending_input"):
        placement.release(response.error.pending_input)
