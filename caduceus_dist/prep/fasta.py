"""Streaming FASTA reader: plain, gzip or BGZF; any line width; soft-masked lower case.

Why streaming: hg38 is 3.1 Gbp, so memory must stay bounded by one record (chr1, 249 Mbp). Each
record is turned straight into token ids by one `bytes.translate` per input chunk (newline removal
and the base-to-id lookup in one C pass), so a record costs one byte per base and no Python loop.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caduceus_dist.model.tokenizer import A_ID, BYTE_TO_ID, IUPAC_AMBIGUOUS, N_ID, UNK_ID
from caduceus_dist.prep.workers import ordered_map
from caduceus_dist.shard_format import SOFTMASK_FLAG

CHUNK_BYTES = 1 << 22
GZIP_MAGIC = b"\x1f\x8b"
BGZF_MAGIC = b"\x1f\x8b\x08\x04"  # gzip, deflate, FEXTRA set
BGZF_GROUP_BYTES = 1 << 20  # compressed bytes per decompression task (~4 MB of sequence)
NEWLINE = ord("\n")
LINE_BREAKS = b"\r\n \t"  # deleted from sequence lines; anything else must be a base letter
INVALID_CODE = 0xFF
OTHER_COMPRESSIONS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class FastaError(ValueError):
    """Malformed FASTA input; the message names the file, line or record and what to do."""


def _translation_table() -> bytes:
    """Bytes -> stored token bytes: ACGTN -> their ids, acgtn -> ids + SOFTMASK_FLAG (docs/shard-format.md);
    other printable bytes map to themselves (>= 32) so the offending letter can be reported; control bytes
    map to INVALID_CODE."""
    table = bytearray(range(256))
    for byte in range(256):
        if BYTE_TO_ID[byte] != UNK_ID:
            table[byte] = BYTE_TO_ID[byte] | (SOFTMASK_FLAG if chr(byte).islower() else 0)
        elif byte < 32 or byte >= 127:
            table[byte] = INVALID_CODE
    return bytes(table)


TRANSLATION = _translation_table()
IUPAC_LETTERS = frozenset(IUPAC_AMBIGUOUS + IUPAC_AMBIGUOUS.lower())


class FastaRecord:
    """One record; while streaming it grows chunk by chunk (`complete` False) and is then finished.

    Bases are stored token bytes (ids, plus SOFTMASK_FLAG where lower case) in a numpy buffer that doubles
    when full (amortised O(1) per base; a bytearray's small over-allocation recopied a whole chromosome
    every few chunks). Growing allocates a new buffer,
    so a view taken earlier (`bases`) stays valid and never blocks the record from growing.
    """

    def __init__(self, name: str, header_line: int):
        self.name, self.header_line = name, header_line  # header_line: 1-based line of the '>' header
        self.iupac_bases = 0  # ambiguity codes other than N, stored as N
        self.complete = False
        self._buffer = np.empty(0, dtype=np.uint8)
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def bases(self) -> np.ndarray:
        """Token ids read so far (a view, no copy)."""
        return self._buffer[:self._length]

    @property
    def tokens(self) -> np.ndarray:
        assert self.complete, "tokens of a record still being read"
        return self.bases

    def extend(self, codes: np.ndarray) -> None:
        end = self._length + len(codes)
        if end > len(self._buffer):
            grown = np.empty(max(end, 2 * len(self._buffer)), dtype=np.uint8)
            grown[:self._length] = self.bases
            self._buffer = grown
        self._buffer[self._length:end] = codes
        self._length = end


def _not_fasta_hint(body: bytes) -> str:
    """Name the file type a user most likely passed as --fasta by mistake, from its first line."""
    first = body.lstrip().split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if len(first) >= 3 and first[1].isdigit() and first[2].isdigit():
        return "It looks like a BED file (contig, start, end): pass it with --bed, and the genome with --fasta. "
    return ""


class _CountingReader:
    """Raw file wrapper that counts the (compressed) bytes consumed, for the progress bar."""

    def __init__(self, fh):
        self._fh, self.consumed = fh, 0

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self.consumed += len(data)
        return data

    def close(self) -> None:
        self._fh.close()


def _bgzf_block_size(buf: bytes, pos: int) -> int:
    """Total size of the BGZF block starting at `pos`, from its 'BC' extra subfield (BGZF, as the SAM/BAM format defines it)."""
    if buf[pos:pos + 4] != BGZF_MAGIC:
        raise zlib.error(f"not a BGZF block at compressed byte offset {pos}")
    xlen = int.from_bytes(buf[pos + 10:pos + 12], "little")
    field, end = pos + 12, pos + 12 + xlen
    while field + 4 <= end:
        length = int.from_bytes(buf[field + 2:field + 4], "little")
        if buf[field:field + 2] == b"BC" and length == 2:
            return int.from_bytes(buf[field + 4:field + 6], "little") + 1
        field += 4 + length
    raise zlib.error(f"gzip member at compressed byte offset {pos} has no BGZF block size")


@dataclass
class BgzfBlocks:
    """Whole BGZF blocks (ending at `ends` within `payload`) for one decompression task."""

    payload: bytes
    ends: list[int]

    @property
    def args(self) -> tuple:
        return self.payload, self.ends


def bgzf_groups(raw) -> Iterator[BgzfBlocks]:
    """Split a BGZF file into groups of whole blocks of ~BGZF_GROUP_BYTES; blocks are independent deflate
    streams, so the groups can be decompressed in parallel."""
    buf, offset = b"", 0
    while True:
        data = raw.read(BGZF_GROUP_BYTES)
        buf += data
        pos, ends = 0, []
        while len(buf) - pos >= 12 and len(buf) - pos >= 12 + int.from_bytes(buf[pos + 10:pos + 12], "little"):
            try:
                size = _bgzf_block_size(buf, pos)
            except zlib.error as exc:
                raise zlib.error(str(exc).replace(f"offset {pos}", f"offset {offset + pos}")) from None
            if pos + size > len(buf):
                break
            pos += size
            ends.append(pos)
        if ends:
            yield BgzfBlocks(buf[:pos], ends)
            buf, offset = buf[pos:], offset + pos
        if not data:
            if buf:
                raise EOFError("compressed file ended inside a BGZF block")
            return


def inflate_bgzf(payload: bytes, ends: list[int]) -> bytes:
    """Worker task: decompress whole BGZF blocks (each a gzip member: zlib checks header, CRC, size)."""
    view, start, out = memoryview(payload), 0, []
    for end in ends:
        out.append(zlib.decompress(view[start:end], wbits=31))
        start = end
    return b"".join(out)


def gunzip_chunks(raw, out_size: int, read_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompress concatenated gzip members (gzip, BGZF) in chunks of at most `out_size` bytes.

    zlib parses the gzip header and checks the CRC in C (the `gzip` module does both in Python, which
    costs ~30% of the reader's time); a file that ends inside a member raises EOFError.
    """
    decompressor, in_member, data = zlib.decompressobj(wbits=31), False, b""
    while True:
        if not data:
            data = raw.read(read_size)
            if not data:
                if not in_member:
                    return
                tail = decompressor.flush()
                if tail:
                    yield tail
                if not decompressor.eof:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached")
                data, decompressor, in_member = decompressor.unused_data, zlib.decompressobj(wbits=31), False
                if not data:
                    return
        in_member = True
        out = decompressor.decompress(data, out_size)
        if decompressor.eof:
            data, decompressor, in_member = decompressor.unused_data, zlib.decompressobj(wbits=31), False
        else:
            data = decompressor.unconsumed_tail
        if out:
            yield out


def _is_bgzf(head: bytes) -> bool:
    try:
        return head.startswith(BGZF_MAGIC) and _bgzf_block_size(head, 0) > 0
    except zlib.error:
        return False


class FastaReader:
    """Iterate `FastaRecord`s of one FASTA file. `consumed_bytes` tracks progress through the file.

    strict=True turns IUPAC ambiguity codes into an error instead of mapping them to N.
    """

    def __init__(self, path: str | os.PathLike, strict: bool = False):
        self.path = Path(path)
        self.strict = strict
        if not self.path.is_file():
            raise FastaError(f"FASTA file {self.path} does not exist; pass --fasta PATH to a .fa or .fa.gz file")
        with open(self.path, "rb") as fh:
            magic = fh.read(6)
        for signature, codec in OTHER_COMPRESSIONS.items():
            if magic.startswith(signature):
                raise FastaError(
                    f"{self.path} is {codec}-compressed; this tool reads plain, gzip or BGZF FASTA. "
                    f"Recompress it with gzip or bgzip"
                )
        self._raw = _CountingReader(open(self.path, "rb"))  # noqa: SIM115 (closed by close())
        self._gzipped = magic.startswith(GZIP_MAGIC)
        with open(self.path, "rb") as fh:
            self._bgzf = self._gzipped and _is_bgzf(fh.read(18))
        self._pool: Executor | None = None
        self._depth = 1

    def use_pool(self, pool: Executor | None, depth: int) -> None:
        """Decompress BGZF input in `pool` (blocks are independent), `depth` groups in flight."""
        self._pool, self._depth = pool, depth

    @property
    def consumed_bytes(self) -> int:
        return self._raw.consumed

    def close(self) -> None:
        self._raw.close()

    def _chunks(self, where: Callable[[], str]) -> Iterator[bytes]:
        decompressed = 0
        if self._bgzf:
            groups = ordered_map(inflate_bgzf, bgzf_groups(self._raw), self._pool, self._depth)
            chunks = (text for _, text in groups)
        elif self._gzipped:
            chunks = gunzip_chunks(self._raw, CHUNK_BYTES)
        else:
            chunks = iter(lambda: self._raw.read(CHUNK_BYTES), b"")
        while True:
            try:
                chunk = next(chunks, b"")
            except (EOFError, zlib.error) as exc:
                raise FastaError(
                    f"{self.path}: the gzip stream is truncated or corrupt ({exc}) after {decompressed} "
                    f"decompressed bytes, while reading {where()}. "
                    f"Re-download or re-compress the file (`gzip -t {self.path}` checks it); shards finished so "
                    "far are kept and a rerun resumes"
                ) from None
            if not chunk:
                return
            decompressed += len(chunk)
            yield chunk

    def __iter__(self) -> Iterator[FastaRecord]:
        """Complete records only."""
        return (record for record in self.stream() if record.complete)

    def stream(self) -> Iterator[FastaRecord]:
        """Yield the current record after every input chunk (growing) and once more when complete, so
        windows can be cut while the rest of a long chromosome is still being decompressed."""
        seen: dict[str, int] = {}
        line = 1  # line number at the current position
        record: FastaRecord | None = None
        header_line = 0
        header_parts: list[bytes] = []
        in_header, at_line_start = False, True

        def where() -> str:
            return f"record {record.name!r} (header on line {record.header_line})" if record else f"line {line}"

        for chunk in self._chunks(where):
            pos = 0
            grew = False
            while pos < len(chunk):
                if in_header:
                    eol = chunk.find(b"\n", pos)
                    header_parts.append(chunk[pos:] if eol < 0 else chunk[pos:eol])
                    if eol < 0:
                        break
                    line += 1
                    pos = eol + 1
                    in_header, at_line_start = False, True
                    record = FastaRecord(self._header_name(b"".join(header_parts), header_line, seen), header_line)
                    header_parts.clear()
                    continue
                gt = chunk.find(b">", pos)
                body = chunk[pos:] if gt < 0 else chunk[pos:gt]
                if body:
                    if record is not None:
                        self._append(record, body.translate(TRANSLATION, LINE_BREAKS))
                        grew = True
                    elif body.strip():
                        raise FastaError(
                            f"{self.path}, line {line}: sequence before the first '>' header. "
                            + _not_fasta_hint(body) + "A FASTA file must start with a '>name' line"
                        )
                    line += np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == NEWLINE)  # 10x bytes.count
                    at_line_start = body.endswith(b"\n")
                if gt < 0:
                    break
                if not at_line_start:
                    raise FastaError(
                        f"{self.path}, line {line}: '>' in the middle of a sequence line of {where()}. "
                        "Headers must start a line"
                    )
                if record is not None:
                    yield self._finish(record)
                    record, grew = None, False
                in_header, header_line, pos = True, line, gt + 1
            if grew and record is not None:
                yield record
        if in_header:
            record = FastaRecord(self._header_name(b"".join(header_parts), header_line, seen), header_line)
        if record is not None:
            yield self._finish(record)
        elif not seen:
            raise FastaError(f"{self.path} holds no FASTA records (no '>' header line); is it the right file?")

    def _header_name(self, header: bytes, header_line: int, seen: dict[str, int]) -> str:
        fields = header.split()
        if not fields:
            raise FastaError(f"{self.path}, line {header_line}: empty header ('>' without a record name)")
        name = fields[0].decode("ascii", errors="replace")
        if name in seen:
            raise FastaError(
                f"{self.path}, line {header_line}: duplicate record name {name!r} (first on line {seen[name]}). "
                "Record names must be unique; rename or remove one of them"
            )
        seen[name] = header_line
        return name

    def _finish(self, record: FastaRecord) -> FastaRecord:
        if not len(record):
            raise FastaError(
                f"{self.path}, line {record.header_line}: record {record.name!r} is empty (a header with no "
                "sequence). Remove the empty record"
            )
        record.complete = True
        return record

    def _append(self, record: FastaRecord, translated: bytes) -> None:
        """Append translated bases (soft-masked ones flagged); IUPAC codes become N (counted, or an error
        under strict), any other byte is always an error naming the record and base position."""
        codes = np.frombuffer(translated, dtype=np.uint8)
        if not codes.size or int(codes.max()) <= N_ID:
            record.extend(codes)
            return
        soft_masked = (codes >= (A_ID | SOFTMASK_FLAG)) & (codes <= (N_ID | SOFTMASK_FLAG))
        odd = np.flatnonzero((codes > N_ID) & ~soft_masked)
        if odd.size:
            bad = ~np.isin(codes[odd], np.frombuffer(bytes(sorted(IUPAC_LETTERS)), dtype=np.uint8))
            if bad.any() or self.strict:
                first = int(odd[int(np.argmax(bad))] if bad.any() else odd[0])
                code = int(codes[first])
                letter = repr(chr(code)) if code != INVALID_CODE else "a control or non-ASCII byte"
                what = "an IUPAC ambiguity code (--strict forbids them)" if not bad.any() else "not a nucleotide letter"
                raise FastaError(
                    f"{self.path}: record {record.name!r} (header on line {record.header_line}) has {letter} at "
                    f"base {len(record) + first + 1} (1-based), which is {what}. Fix the FASTA"
                    + ("" if bad.any() else " or run without --strict to map IUPAC codes to N")
                )
            codes = codes.copy()
            codes[odd] = N_ID
            record.iupac_bases += len(odd)
        record.extend(codes)
