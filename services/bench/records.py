"""What a benchmark run measures, as plain frozen data shared by every runner and the report.

Runners (single process, mesh, torch.distributed.rpc) all reduce to :class:`Measurement`, so the
statistics and the report never depend on which system produced the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SYSTEM_SINGLE = "single"
SYSTEM_MESH_DIRECT = "mesh-direct"
SYSTEM_MESH_RELAY = "mesh-relay"
SYSTEM_TORCH_RPC = "torch-rpc"  # TensorPipe over loopback sockets (uv) + cross-memory attach (cma) for payloads
SYSTEM_TORCH_RPC_SHM = "torch-rpc-shm"  # TensorPipe's defaults: shared-memory transport, which busy-polls
SYSTEMS = (SYSTEM_SINGLE, SYSTEM_MESH_DIRECT, SYSTEM_MESH_RELAY, SYSTEM_TORCH_RPC, SYSTEM_TORCH_RPC_SHM)


@dataclass(frozen=True)
class HopSample:
    """One hop (or, in relay mode, one link) of one request, as the caller of that hop saw it.

    ``hop_ms`` runs from request sent to response received; ``compute_ms`` is the remote forward;
    ``queue_ms`` the remote wait for the compute slot; ``bytes_moved`` what crossed the link in both
    directions (input + mask on the way in, output on the way back).
    """

    hop_ms: float
    compute_ms: float
    queue_ms: float
    bytes_moved: int


@dataclass(frozen=True)
class RequestSample:
    latency_ms: float  # end to end, measured by the caller (client, driver, or around forward)
    hops: tuple[HopSample, ...] = ()


@dataclass(frozen=True)
class Measurement:
    """One closed-loop run: ``requests`` requests at ``concurrency`` in ``wall_s`` seconds."""

    samples: tuple[RequestSample, ...]
    wall_s: float
    concurrency: int
    failures: int = 0
    first_failure: str = ""
    matches_single: bool | None = None  # output bit-identical to the single-process output (None = not checked)
    background_cores: float | None = None  # cores busy with work outside the bench while measuring


@dataclass(frozen=True)
class BenchRow:
    """One line of the results table and one object of the JSON ``results`` list."""

    system: str
    model: str
    concurrency: int
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    throughput_rps: float | None
    ratio_to_single: float | None  # system p50 / single p50 (lower is better, 1.0 = as fast as one process)
    throughput_ratio: float | None  # system throughput / single-process best batch-1 throughput
    compute_ms: float | None  # mean per request of the stages' forward time (summed over hops)
    hop_overhead_ms: float | None  # mean over hops of (hop_ms - compute_ms)
    hop_queue_ms: float | None  # mean over hops of the remote compute-slot wait (part of hop_overhead_ms)
    transfer_gbps: float | None  # bytes moved / (hop_ms - compute_ms - queue_ms), 1 GB = 1e9 bytes
    activation_bytes: int
    batch: int
    seq_len: int
    stages: int
    requests: int
    threads: int
    matches_single: bool | None = None
    background_cores: float | None = None  # other work on the machine during this row's measurement
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["error"] is None:
            del out["error"]
        if not out["extra"]:
            del out["extra"]
        return out


@dataclass(frozen=True)
class WireSizes:
    """Bytes of what travels over each hop of a workload, for the transfer-rate numerator."""

    ids_bytes: int  # token ids: the first stage's input
    mask_bytes: int  # attention mask: sent with every hop
    activation_bytes: int  # hidden states between stages
    output_bytes: int  # the last stage's output (embedding or logits)

    def hop_bytes(self, index: int, stages: int, *, relay: bool = False) -> int:
        """Input + mask in, output back. In relay mode the answer on every link is the final output."""
        inbound = (self.ids_bytes if index == 0 else self.activation_bytes) + self.mask_bytes
        if relay or index == stages - 1:
            return inbound + self.output_bytes
        return inbound + self.activation_bytes


@dataclass(frozen=True)
class Outcome:
    """What one system produced at one concurrency level: a measurement, or why there is none."""

    system: str
    concurrency: int
    measurement: Measurement | None
    threads: int
    error: str | None = None
    note: str = ""
