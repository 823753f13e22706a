from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_DELIVERING: _ClassVar[Phase]
    PHASE_ENCODING: _ClassVar[Phase]
    PHASE_AWAITING_PARITY: _ClassVar[Phase]
    PHASE_READY: _ClassVar[Phase]
    PHASE_COMMITTED: _ClassVar[Phase]
PHASE_UNSPECIFIED: Phase
PHASE_DELIVERING: Phase
PHASE_ENCODING: Phase
PHASE_AWAITING_PARITY: Phase
PHASE_READY: Phase
PHASE_COMMITTED: Phase

class Buffer(_message.Message):
    __slots__ = ("name", "offset", "nbytes", "crc32c")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    nbytes: int
    crc32c: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("step", "rank", "nbytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    nbytes: int
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("segment", "nbytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nbytes: int
    def __init__(self, segment: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class DeliverRequest(_message.Message):
    __slots__ = ("step", "rank", "buffers")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    buffers: _containers.RepeatedCompositeFieldContainer[Buffer]
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., buffers: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ...) -> None: ...

class DeliverReply(_message.Message):
    __slots__ = ("delivered_ranks", "expected_ranks")
    DELIVERED_RANKS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_RANKS_FIELD_NUMBER: _ClassVar[int]
    delivered_ranks: int
    expected_ranks: int
    def __init__(self, delivered_ranks: _Optional[int] = ..., expected_ranks: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("step", "prepare")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    step: int
    prepare: bool
    def __init__(self, step: _Optional[int] = ..., prepare: _Optional[bool] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("committed", "missing_ranks", "missing_stripes", "ready")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_STRIPES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    missing_stripes: _containers.RepeatedScalarFieldContainer[int]
    ready: bool
    def __init__(self, committed: _Optional[bool] = ..., missing_ranks: _Optional[_Iterable[int]] = ..., missing_stripes: _Optional[_Iterable[int]] = ..., ready: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("include_ready",)
    INCLUDE_READY_FIELD_NUMBER: _ClassVar[int]
    include_ready: bool
    def __init__(self, include_ready: _Optional[bool] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("step", "nbytes", "ranks", "committed")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    step: int
    nbytes: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    committed: bool
    def __init__(self, step: _Optional[int] = ..., nbytes: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., committed: _Optional[bool] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("step", "rank")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class LocateReply(_message.Message):
    __slots__ = ("segment", "buffers")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    buffers: _containers.RepeatedCompositeFieldContainer[Buffer]
    def __init__(self, segment: _Optional[str] = ..., buffers: _Optional[_Iterable[_Union[Buffer, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("ok", "problems")
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class DropReply(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class ProgressRequest(_message.Message):
    __slots__ = ("rank", "step", "pid", "leaving")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    pid: int
    leaving: bool
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., pid: _Optional[int] = ..., leaving: _Optional[bool] = ...) -> None: ...

class ProgressReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job", "node", "memory_used", "memory_limit", "expected_ranks", "snapshots", "steps", "peers", "materializations", "block_port")
    JOB_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_RANKS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZATIONS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_PORT_FIELD_NUMBER: _ClassVar[int]
    job: str
    node: int
    memory_used: int
    memory_limit: int
    expected_ranks: _containers.RepeatedScalarFieldContainer[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    steps: _containers.RepeatedCompositeFieldContainer[StepState]
    peers: _containers.RepeatedScalarFieldContainer[str]
    materializations: _containers.RepeatedCompositeFieldContainer[Materialization]
    block_port: int
    def __init__(self, job: _Optional[str] = ..., node: _Optional[int] = ..., memory_used: _Optional[int] = ..., memory_limit: _Optional[int] = ..., expected_ranks: _Optional[_Iterable[int]] = ..., snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StepState, _Mapping]]] = ..., peers: _Optional[_Iterable[str]] = ..., materializations: _Optional[_Iterable[_Union[Materialization, _Mapping]]] = ..., block_port: _Optional[int] = ...) -> None: ...

class MaterializeRequest(_message.Message):
    __slots__ = ("step", "root", "writer_token", "world_size", "keep", "keep_every", "timeout_s")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    WRITER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    root: str
    writer_token: str
    world_size: int
    keep: int
    keep_every: int
    timeout_s: float
    def __init__(self, step: _Optional[int] = ..., root: _Optional[str] = ..., writer_token: _Optional[str] = ..., world_size: _Optional[int] = ..., keep: _Optional[int] = ..., keep_every: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class MaterializeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Materialization(_message.Message):
    __slots__ = ("step", "root", "state", "error")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: int
    root: str
    state: str
    error: str
    def __init__(self, step: _Optional[int] = ..., root: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class StepState(_message.Message):
    __slots__ = ("step", "phase", "reserved_ranks", "delivered_ranks", "blocks_sent", "blocks_to_send", "missing_stripes", "encode_error", "segments")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_RANKS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_RANKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TO_SEND_FIELD_NUMBER: _ClassVar[int]
    MISSING_STRIPES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_ERROR_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: Phase
    reserved_ranks: _containers.RepeatedScalarFieldContainer[int]
    delivered_ranks: _containers.RepeatedScalarFieldContainer[int]
    blocks_sent: int
    blocks_to_send: int
    missing_stripes: _containers.RepeatedScalarFieldContainer[int]
    encode_error: str
    segments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., reserved_ranks: _Optional[_Iterable[int]] = ..., delivered_ranks: _Optional[_Iterable[int]] = ..., blocks_sent: _Optional[int] = ..., blocks_to_send: _Optional[int] = ..., missing_stripes: _Optional[_Iterable[int]] = ..., encode_error: _Optional[str] = ..., segments: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPeersRequest(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peers: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPeersReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RebuildRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: int
    def __init__(self, node: _Optional[int] = ...) -> None: ...

class RebuildReply(_message.Message):
    __slots__ = ("step", "nbytes")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    step: int
    nbytes: int
    def __init__(self, step: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...
